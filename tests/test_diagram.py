"""The train stage's architecture diagram (tasks.train.write_diagram) with the real Graphviz.

The diagram is drawn after training, so a Graphviz failure there would throw the trained model
away: every net of the book's table must be drawn, and a dot that fails must only skip it.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from nets import create_model
from tasks.modeling import build_training_model
from tasks.train import write_diagram

# the book's table (ResNet v1 by depth, ResNet v2, DenseNet-BC); Debian 12's Graphviz (2.42.2)
# aborted on ResNet32, 44, 56 and 110 v1 with Keras' default orthogonal edges
BOOK_NETS = ["resnet20_v1", "resnet32_v1", "resnet44_v1", "resnet56_v1", "resnet110_v1",
             "resnet56_v2", "resnet110_v2", "densenet_bc_100_k12"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

needs_dot = pytest.mark.skipif(shutil.which("dot") is None,
                               reason="Graphviz's dot is not installed (scripts/test-data.sh)")


def _training_model(name: str):
    net = create_model(name, input_shape=(32, 32, 3), num_classes=10)
    mean = np.zeros((32, 32, 3), "float32")
    return build_training_model(net, mean, np.ones_like(mean), shift=0.1, flip=True,
                                crop_pad=0, seed=0)


@needs_dot
@pytest.mark.parametrize("name", BOOK_NETS)
def test_every_net_of_the_book_table_gets_its_diagram(name, tmp_path):
    path = tmp_path / "architecture.png"
    assert write_diagram(_training_model(name), path) is None
    assert path.read_bytes().startswith(PNG_SIGNATURE)


def test_a_failing_graphviz_skips_the_diagram_and_says_why(tmp_path, monkeypatch):
    # a real executable named dot that fails as Debian 12's Graphviz did: a message, an abort
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    dot = bin_dir / "dot"
    dot.write_text("#!/bin/sh\necho \"dot: maze.c:313: chkSgraph: Assertion failed.\" >&2\n"
                   "kill -ABRT $$\n")
    dot.chmod(dot.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    path = tmp_path / "architecture.png"
    reason = write_diagram(_training_model("resnet20_v1"), path)
    assert reason is not None
    assert reason.startswith(f"Graphviz could not draw {path}")
    assert "-6" in reason  # dot's exit status: killed by SIGABRT
    assert not Path(path).exists()
