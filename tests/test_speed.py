"""The speed settings: validation, what ``auto`` resolves to, and what a run records."""

from __future__ import annotations

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
                                       ("threads", 0), ("jit_compile", "sometimes")])
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
