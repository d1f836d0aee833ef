"""Every net trains one step under the TensorFlow backend (every registered variant but the
very deep ones) and under the JAX backend. Each group runs in one subprocess, since Keras picks
its backend at import.

Variants of one builder differ only in numbers, so the default run takes each builder's
shallowest variant (one eager step of every deeper variant costs minutes on a CPU); the slow
run takes every variant."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

import nets
from tests.conftest import ROOT, stage_environment


def _per_builder(names: list[str]) -> list[str]:
    first: dict[str, str] = {}
    for name in sorted(names, key=_size):
        first.setdefault(str(nets.get_entry(name).builder), name)
    return sorted(first.values())


def _size(name: str) -> int:
    entry = nets.get_entry(name)
    return int(entry.defaults.get("depth", 0))


REGISTERED = [name for name in nets.list_models() if not nets.get_entry(name).slow]
# one compiled JAX step of DenseNet-BC-100 took 106 s here (XLA on 2 CPU cores; 253 s eagerly);
# it runs with -m slow
SLOW_UNDER_JAX = {"densenet_bc_100_k12"}
ONE_PER_BUILDER = [n for n in _per_builder(REGISTERED) if n not in SLOW_UNDER_JAX]
DEEPER = [name for name in nets.list_models() if name not in ONE_PER_BUILDER]

SCRIPT = r"""
import json, sys
import numpy as np
import keras
import nets
from tasks.modeling import build_training_model

results = {"backend": keras.backend.backend()}
for name in sys.argv[1:]:
    entry = nets.get_entry(name)
    shape = entry.input_shape
    net = nets.create_model(name)
    model = build_training_model(net, np.zeros(shape, "float32"), np.ones(shape, "float32"),
                                 shift=0.1, flip=True, seed=0)
    # TensorFlow eagerly: one step does not repay tracing the graph. JAX compiled: its eager
    # mode compiles every primitive on its own, which took 2.3 times as long here in all
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                  run_eagerly=keras.backend.backend() != "jax")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, *shape), dtype=np.uint8)
    y = rng.integers(0, entry.num_classes, 2)
    before = [np.array(w) for w in net.trainable_weights]
    loss = float(model.train_on_batch(x, y))
    changed = any(not np.array_equal(a, np.array(w)) for a, w in zip(before, net.trainable_weights))
    results[name] = {"loss": loss, "changed": changed}
print("RESULTS " + json.dumps(results))
"""


JAX_MISSING = "install the test extra (jax[cpu]) to test JAX"


def _start(backend: str, names: list[str]) -> subprocess.Popen:
    env = stage_environment()
    env["KERAS_BACKEND"] = backend
    return subprocess.Popen([sys.executable, "-c", SCRIPT, *names], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _results(processes: dict[str, subprocess.Popen]) -> dict[str, dict]:
    """Each subprocess's RESULTS line; every subprocess is ended before this returns."""
    try:
        found = {}
        for backend, process in processes.items():
            stdout, stderr = process.communicate(timeout=3600)
            assert process.returncode == 0, f"{backend}: {stderr[-3000:]}"
            line = next(line for line in stdout.splitlines() if line.startswith("RESULTS "))
            found[backend] = json.loads(line.removeprefix("RESULTS "))
        return found
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()


def _run_under(backend: str, names: list[str]) -> dict:
    if backend == "jax":
        pytest.importorskip("jax", reason=JAX_MISSING)
    return _results({backend: _start(backend, names)})[backend]


@pytest.fixture(scope="module")
def default_runs() -> dict[str, dict]:
    """The default run's TensorFlow and JAX subprocesses, side by side: most of each one's
    time is single-threaded (eager steps, tracing, XLA compiles), and CI has two cores."""
    processes = {"tensorflow": _start("tensorflow", REGISTERED)}
    if importlib.util.find_spec("jax") is not None:
        processes["jax"] = _start("jax", ONE_PER_BUILDER)
    return _results(processes)


@pytest.fixture(scope="module")
def tf_results(default_runs) -> dict:
    return default_runs["tensorflow"]


@pytest.fixture(scope="module")
def jax_results(default_runs) -> dict:
    if "jax" not in default_runs:
        pytest.skip(JAX_MISSING)
    return default_runs["jax"]


@pytest.fixture(scope="module")
def jax_results_deeper() -> dict:
    return _run_under("jax", DEEPER)


def _check(outcome: dict, name: str) -> None:
    assert outcome["changed"], f"{name}: no weight changed"
    assert math.isfinite(outcome["loss"]) and outcome["loss"] > 0


def test_every_builder_is_covered():
    builders = {str(nets.get_entry(name).builder) for name in nets.list_models()}
    covered = {str(nets.get_entry(name).builder) for name in [*ONE_PER_BUILDER, *SLOW_UNDER_JAX]}
    assert covered == builders


def test_the_subprocesses_really_used_their_backends(tf_results, jax_results):
    assert (tf_results["backend"], jax_results["backend"]) == ("tensorflow", "jax")


@pytest.mark.parametrize("name", REGISTERED)
def test_one_training_step_under_tensorflow(tf_results, name):
    _check(tf_results[name], name)


@pytest.mark.parametrize("name", ONE_PER_BUILDER)
def test_one_training_step_under_jax(jax_results, name):
    _check(jax_results[name], name)


# the module fixture steps every deeper variant in one subprocess (up to its 3600 s limit),
# inside the first test's setup: the suite's 900 s per-test limit would cut it short
@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("name", DEEPER)
def test_one_training_step_under_jax_deeper_variants(jax_results_deeper, name):
    _check(jax_results_deeper[name], name)


VERY_DEEP = [name for name in nets.list_models() if nets.get_entry(name).slow]


@pytest.fixture(scope="module")
def tf_results_very_deep() -> dict:
    return _run_under("tensorflow", VERY_DEEP)


@pytest.mark.slow
@pytest.mark.timeout(3600)  # as above
@pytest.mark.parametrize("name", VERY_DEEP)
def test_one_training_step_under_tensorflow_very_deep(tf_results_very_deep, name):
    _check(tf_results_very_deep[name], name)
