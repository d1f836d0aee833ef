"""The export stage on a model trained with the speed settings a bfloat16 machine resolves to."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from tasks.config import parse_params
from tasks.modeling import load_model
from tests.test_speed import raw_params, tiny_prepared


@pytest.fixture(autouse=True)
def float32_afterwards():
    yield
    keras.config.set_dtype_policy("float32")  # the policy is process-wide


def test_a_bfloat16_model_trained_through_xla_exports(tmp_path):
    # speed.precision and speed.jit_compile resolve to these on a CPU with AVX512-BF16 or AMX
    from tasks.export import TOLERANCE, export
    from tasks.train import train

    raw = raw_params(precision="mixed_bfloat16", jit_compile=True)
    raw["model"]["names"] = ["simple_cnn"]
    raw["train"] = {**raw["train"], "epochs": 1, "batch_size": 16}
    prepared = tiny_prepared()
    train(parse_params(raw), prepared, tmp_path / "model.keras", verbose=0)
    keras.config.set_dtype_policy("float32")  # as the export stage's own process starts

    # the situation the stage meets: with its saved compile settings the trained model predicts
    # through XLA, which rounds bfloat16 otherwise than the exports' graph does
    compiled = load_model(tmp_path / "model.keras")
    assert compiled.jit_compile is True
    images = prepared.x_test
    through_xla = np.asarray(compiled.predict(images, verbose=0))
    plain = np.asarray(load_model(tmp_path / "model.keras", compile=False).predict(images, verbose=0))
    assert np.abs(through_xla - plain).max() > TOLERANCE

    record = export(tmp_path / "model.keras", images, tmp_path / "export")
    assert record["keras_max_abs_diff"] <= TOLERANCE
    assert record["saved_model_max_abs_diff"] <= TOLERANCE
    assert json.loads((tmp_path / "export/check.json").read_text()) == record
    exported = keras.saving.load_model(tmp_path / "export/model.keras")
    assert exported.layers[-1].compute_dtype == "float32"  # the net's float32 softmax
    assert np.abs(np.asarray(exported.predict(images, verbose=0)) - plain).max() <= TOLERANCE
