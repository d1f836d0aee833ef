"""The speed settings: validation, what ``auto`` resolves to, and what a run records."""

from __future__ import annotations

import os
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml

from tasks import speed as speed_module
from tasks.config import ParamsError, SpeedParams, parse_params
from tasks.preprocess import Prepared

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def float32_afterwards():
    yield
    keras.config.set_dtype_policy("float32")  # the policy is process-wide


def raw_params(**speed) -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["speed"] = {**raw["speed"], **speed}
    return raw


@pytest.mark.parametrize("key,value", [("precision", "float8"), ("steps_per_execution", 0),
                                       ("threads", 0), ("jit_compile", "sometimes"),
                                       ("backend", "mxnet"), ("fused_kernels", "sometimes")])
def test_bad_speed_settings_name_the_key(key, value):
    with pytest.raises(ParamsError, match=rf"speed\.{key}"):
        parse_params(raw_params(**{key: value}))


def test_params_yaml_defaults_are_auto():
    speed = parse_params(raw_params()).speed
    assert (speed.precision, speed.jit_compile, speed.steps_per_execution) == ("auto", "auto", 1)


@pytest.mark.parametrize("flags,expected", [({"avx2", "amx_bf16", "amx_tile"}, "mixed_bfloat16"),
                                            ({"avx512f", "avx512_bf16"}, "mixed_bfloat16"),
                                            ({"avx2", "fma"}, "float32"), (set(), "float32")])
def test_auto_precision_on_a_cpu_follows_its_bfloat16_support(monkeypatch, flags, expected):
    monkeypatch.setattr(speed_module, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(speed_module, "accelerator", lambda: None)
    assert speed_module.resolve_precision("auto") == expected
    assert speed_module.resolve_precision("float32") == "float32"  # explicit values stay


def test_this_machines_flags_are_read():
    # /proc/cpuinfo exists on the Linux machines the suite runs on; every x86-64 CPU has sse2
    assert "sse2" in speed_module.cpu_flags()


def tiny_prepared(images: int = 64) -> Prepared:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (images, 16, 16, 3), dtype=np.uint8)
    y = rng.integers(0, 3, images)
    mean, std = np.full((16, 16, 3), 0.5, "float32"), np.full((16, 16, 3), 0.25, "float32")
    return Prepared(x, y, x[:16], y[:16], x[:16], y[:16], mean, std, ["a", "b", "c"],
                    "pixel_mean", "test")


def test_mixed_precision_run_computes_in_bfloat16_with_a_float32_softmax(tmp_path):
    from tasks.train import train

    raw = raw_params(precision="mixed_bfloat16", jit_compile=False)
    raw["model"]["names"] = ["simple_cnn"]
    raw["train"] = {**raw["train"], "epochs": 1, "batch_size": 16}
    params = parse_params(raw)
    result = train(params, tiny_prepared(), tmp_path / "model.keras", verbose=0)
    assert result.speed["precision"] == "mixed_bfloat16"
    net = result.model.layers[-1]
    convs = [layer for layer in net.layers if isinstance(layer, keras.layers.Conv2D)]
    assert convs and all(layer.compute_dtype == "bfloat16" for layer in convs)
    assert all(layer.variable_dtype == "float32" for layer in convs)
    assert net.get_layer("predictions").compute_dtype == "float32"
    assert result.model.output.dtype == "float32"
    assert np.isfinite(result.history["loss"][0])


def test_speed_settings_reach_compile(tmp_path):
    from tasks.train import train

    raw = raw_params(precision="float32", jit_compile=True, steps_per_execution=4)
    raw["model"]["names"] = ["simple_cnn"]
    raw["train"] = {**raw["train"], "epochs": 1, "batch_size": 16}
    result = train(parse_params(raw), tiny_prepared(), tmp_path / "model.keras", verbose=0)
    assert result.model.jit_compile is True  # the augmentation does not veto XLA
    assert result.model.steps_per_execution == 4
    assert result.speed == {**result.speed, "precision": "float32", "jit_compile": True,
                            "steps_per_execution": 4}
    assert SpeedParams().precision == "auto"


# --- speed.backend ----------------------------------------------------------------------------


def test_auto_backend_leaves_keras_choice_alone(monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "something-else")
    assert speed_module.select_backend("auto") is None
    assert os.environ["KERAS_BACKEND"] == "something-else"


def test_a_backend_keras_does_not_run_on_is_refused_once_keras_is_imported():
    other = "jax" if keras.backend.backend() != "jax" else "tensorflow"
    with pytest.raises(ValueError, match=r"speed\.backend = '\w+'.*new process"):
        speed_module.select_backend(other)
    assert speed_module.select_backend(keras.backend.backend()) == keras.backend.backend()


def test_a_missing_backend_package_names_the_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(ValueError, match=r"speed\.backend = 'torch' needs torch.*pip install"):
        speed_module.select_backend("torch")


def test_the_train_stage_trains_under_the_backend_params_name(tmp_path):
    """``python -m tasks.train`` with ``speed.backend: jax`` and KERAS_BACKEND=tensorflow in
    its environment: the param wins, and params.json records it."""
    pytest.importorskip("jax", reason="install the test extra (jax[cpu]) to test JAX")
    import json
    import subprocess
    import sys

    from tasks.preprocess import save_prepared
    from tests.conftest import stage_environment

    raw = raw_params(backend="jax", jit_compile=False)
    raw["model"]["names"] = ["simple_cnn"]
    raw["train"] = {**raw["train"], "epochs": 1, "batch_size": 16}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    save_prepared(tiny_prepared(), tmp_path / "prepared")
    env = {**stage_environment(), "KERAS_BACKEND": "tensorflow"}
    done = subprocess.run(
        [sys.executable, "-m", "tasks.train", "--params", str(tmp_path / "params.yaml"),
         "--data", str(tmp_path / "prepared"), "--out", str(tmp_path / "model"),
         "--live", str(tmp_path / "live"), "--plots", str(tmp_path / "plots")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    recorded = json.loads((tmp_path / "model" / "params.json").read_text())["speed"]
    assert recorded["backend"] == "jax"
