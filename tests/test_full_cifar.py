"""One epoch of ResNet20 v1 over all 50,000 CIFAR-10 training images (JPEG class folders), on CPU.

Slow (minutes on a laptop CPU): run with `pytest -m slow tests/test_full_cifar.py -s`. It goes
through the real pipeline with the shared archive as an imagefolder source and checks that
evaluate reports on all 10,000 test images; the epoch time is printed and kept in
models/resnet20_v1/params.json.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import SHARED, run, scratch_repo, stage_environment

ARCHIVE = SHARED / "datasets" / "cifar10-jpeg.tar.gz"


@pytest.mark.slow
def test_one_epoch_on_all_of_cifar10(tmp_path):
    if not ARCHIVE.exists():
        pytest.skip(f"{ARCHIVE} not found (the CIFAR-10 JPEG archive beside the checkout)")
    env = stage_environment()
    repo = scratch_repo(tmp_path / "repo", env,
                        {"data.source": str(ARCHIVE), "train.epochs": 1})
    result = run(["dvc", "repro"], repo, env)
    evaluation = json.loads((repo / "metrics/evaluate/resnet20_v1.json").read_text())
    run_info = json.loads((repo / "models/resnet20_v1/params.json").read_text())
    assert run_info["train_images"] == 50_000
    assert evaluation["test"]["images"] == 10_000
    assert evaluation["test"]["accuracy"] > 0.2  # one epoch is far above chance (0.1)
    print(f"\n{result.stdout.splitlines()[-1] if result.stdout else ''}")
    print(f"epoch: {run_info['seconds_per_epoch']:.1f} s for 50,000 images; test accuracy "
          f"{evaluation['test']['accuracy']:.4f} on 10,000")
