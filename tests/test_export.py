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
    assert np.abs(np.asarray(exported.predict(images, verbose=0)) - plain).max() <= TOLERANCE


def _exportable_nets():
    from nets.registry import get_entry, list_models

    small = ("mnist_cnn", "simple_cnn", "ynet")  # a few seconds each; the others up to 2 minutes
    return [pytest.param(name, marks=() if name in small else pytest.mark.slow)
            for name in list_models() if not get_entry(name).slow]


@pytest.mark.parametrize("name", _exportable_nets())
def test_every_net_exports_in_bfloat16(name, tmp_path):
    from nets.registry import create_model
    from tasks.export import TOLERANCE, export
    from tasks.modeling import AUGMENT_PREFIX, build_training_model

    keras.config.set_dtype_policy("mixed_bfloat16")
    net = create_model(name, num_classes=10)
    shape = net.input_shape[1:]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, *shape), dtype=np.uint8)
    mean, std = np.full(shape, 0.5, "float32"), np.full(shape, 0.25, "float32")
    model = build_training_model(net, mean, std, shift=0.1, flip=True, seed=1)
    model.compile("adam", "sparse_categorical_crossentropy", jit_compile=False)
    model.fit(images, rng.integers(0, 10, 32), batch_size=16, epochs=1, verbose=0)
    model.save(tmp_path / "model.keras")
    keras.config.set_dtype_policy("float32")  # as the export stage's own process starts

    record = export(tmp_path / "model.keras", images[:20], tmp_path / "export")
    assert record["keras_max_abs_diff"] <= TOLERANCE
    assert record["saved_model_max_abs_diff"] <= TOLERANCE
    exported = keras.saving.load_model(tmp_path / "export/model.keras")
    assert not any(layer.name.startswith(AUGMENT_PREFIX) for layer in exported.layers)
    computes = {layer.compute_dtype for layer in exported.layers[-1].layers}
    assert "bfloat16" in computes  # still the trained model's mixed policy


@keras.saving.register_keras_serializable(package="test_export")
class OffsetOnBuild(keras.layers.Layer):
    """Adds a number chosen when the layer is built and kept outside its weights, so a saved and
    reloaded copy predicts otherwise: the kind of custom layer the export check exists for."""

    builds = 0

    def build(self, input_shape):
        OffsetOnBuild.builds += 1
        self.offset = float(OffsetOnBuild.builds)

    def call(self, x):
        return x + self.offset


def test_an_export_that_predicts_otherwise_stops_the_stage_and_writes_nothing(tmp_path, capsys):
    from tasks.export import main

    inputs = keras.Input((8, 8, 3), dtype="uint8", name="image")
    x = keras.layers.Rescaling(1 / 255, name="scale")(inputs)
    x = OffsetOnBuild(name="offset")(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(3, activation="softmax")(x)
    keras.Model(inputs, outputs).save(tmp_path / "model.keras")
    images = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data/data.npz", x_test=images)

    code = main(["--model", str(tmp_path / "model.keras"), "--data", str(tmp_path / "data"),
                 "--out", str(tmp_path / "export")])
    assert code == 1
    message = capsys.readouterr().err
    assert "the .keras export predicts differently from the trained model" in message
    assert f"Nothing was written to {tmp_path / 'export'}" in message and "get_config" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "model.keras"]
