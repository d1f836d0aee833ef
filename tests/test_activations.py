"""Activation statistics: what the callback records through a real fit, and its plots."""

from __future__ import annotations

import keras
import matplotlib.pyplot as plt
import numpy as np
import pytest

from tasks.activations import (
    HIST_BINS,
    ActivationStats,
    build_probe,
    default_layers,
    plot_stats,
    stats_rows,
    summarize,
    summary_tensor,
)
from tasks.modeling import build_training_model

EPOCHS, BATCH, N = 2, 4, 12  # 3 batches an epoch, 6 steps


def _tiny_net(name: str = "tiny") -> keras.Model:
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.Activation("relu", name="relu1")(x)
    x = keras.layers.Conv2D(6, 3, activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs, name=name)


def _data(dtype="float32"):
    rng = np.random.default_rng(0)
    if dtype == "uint8":
        x = rng.integers(0, 256, (N, 8, 8, 3)).astype("uint8")
    else:
        x = rng.normal(0.0, 2.0, (N, 8, 8, 3)).astype("float32")
    return x, np.arange(N) % 3


def _compile(model: keras.Model) -> keras.Model:
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss="sparse_categorical_crossentropy", jit_compile=False)
    return model


def _direct(values: np.ndarray):
    x = np.asarray(values, np.float64).ravel()
    in_range = np.count_nonzero((x >= 0) & (x <= 10))
    return np.mean(x), np.std(x, ddof=1), np.mean(np.asarray(values) <= 0.05), in_range


def test_a_real_fit_records_every_step_and_the_right_numbers():
    keras.utils.set_random_seed(0)
    net = _compile(_tiny_net())
    x, y = _data()
    sample = x[:5]
    stats = ActivationStats(sample)
    net.fit(x, y, batch_size=BATCH, epochs=EPOCHS, verbose=0, callbacks=[stats])
    assert list(stats.stats) == ["relu1", "conv2", "predictions"]  # post-activation outputs
    for record in stats.stats.values():
        assert record.steps == list(range(EPOCHS * N // BATCH))
        assert len(record.mean) == len(record.std) == len(record.near_zero) == len(record.hist)
        assert all(0.0 <= share <= 1.0 for share in record.near_zero)
    # the last record was taken after the last batch: the weights have not changed since
    for name, record in stats.stats.items():
        direct = keras.Model(net.input, net.get_layer(name).output)(sample, training=False)
        values = keras.ops.convert_to_numpy(direct)
        mean, std, near_zero, in_range = _direct(values)
        assert record.mean[-1] == pytest.approx(mean, rel=1e-5, abs=1e-7)
        assert record.std[-1] == pytest.approx(std, rel=1e-5, abs=1e-7)
        assert record.near_zero[-1] == pytest.approx(near_zero)
        assert record.hist[-1].shape == (HIST_BINS,)
        assert int(record.hist[-1].sum()) == in_range
        # float32 on the device against float64 here: a value on a bin edge may change bins
        reference = np.histogram(values, bins=HIST_BINS, range=(0, 10))[0]
        assert np.abs(record.hist[-1] - reference).sum() <= 2
    relu = stats.stats["relu1"]
    assert int(relu.hist[-1].sum()) == sample.shape[0] * 8 * 8 * 6  # ReLU outputs lie in [0, 10]
    assert 0.0 < relu.near_zero[-1] < 1.0


def test_every_and_chosen_layers():
    net = _compile(_tiny_net())
    x, y = _data()
    stats = ActivationStats(x[:2], layer_names=["conv1", "bn1"], every=4)
    net.fit(x, y, batch_size=BATCH, epochs=EPOCHS, verbose=0, callbacks=[stats])
    assert list(stats.stats) == ["conv1", "bn1"]  # a flat model: paths are bare names
    assert stats.stats["conv1"].steps == [0, 4]
    # conv outputs are signed: near zero counts every value <= 0.05 (fastai's test), the
    # histogram only the values inside [0, 10]
    record = stats.stats["conv1"]
    assert int(record.hist[-1].sum()) < 2 * 8 * 8 * 6
    with pytest.raises(ValueError, match="not found; layers: conv1, bn1"):
        build_probe(net, ["nope"])


def test_nested_training_model_is_probed_inside():
    keras.utils.set_random_seed(1)
    net = _tiny_net()
    mean, std = np.array([0.4, 0.5, 0.6]), np.array([0.2, 0.25, 0.3])
    model = _compile(build_training_model(net, mean, std, shift=0.1, flip=True, seed=0))
    assert default_layers(model) == ["tiny/relu1", "tiny/conv2", "tiny/predictions"]
    # a path or a unique bare name, in the outer or the inner model
    assert list(build_probe(model, ["tiny/conv1", "scale", "bn1"]).output) == [
        "tiny/conv1", "scale", "tiny/bn1"]
    x, y = _data("uint8")
    sample = x[:4]
    stats = ActivationStats(sample)
    model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, verbose=0, callbacks=[stats])
    assert list(stats.stats) == default_layers(model)
    assert stats.stats["tiny/conv2"].steps == list(range(EPOCHS * N // BATCH))
    # the inner layer's activations on the probe batch, computed without the wrapper:
    # scale and normalise by hand, then run the inner net up to the layer (inference mode)
    normalised = ((sample.astype("float32") / 255.0 - mean) / std).astype("float32")
    for path in stats.stats:
        layer = net.get_layer(path.split("/")[1])
        values = keras.ops.convert_to_numpy(
            keras.Model(net.input, layer.output)(normalised, training=False))
        record = stats.stats[path]
        direct_mean, direct_std, near_zero, in_range = _direct(values)
        assert record.mean[-1] == pytest.approx(direct_mean, rel=1e-4, abs=1e-6)
        assert record.std[-1] == pytest.approx(direct_std, rel=1e-4, abs=1e-6)
        assert record.near_zero[-1] == pytest.approx(near_zero)
        assert int(record.hist[-1].sum()) == in_range


def test_summaries_range_and_threshold():
    values = np.array([-1.0, 0.0, 0.05, 0.06, 5.0, 10.0, 11.0], "float32")
    mean, std, near_zero, counts = summarize(values)
    assert mean == pytest.approx(values.mean()) and std == pytest.approx(values.std(ddof=1))
    assert near_zero == pytest.approx(3 / 7)  # -1, 0 and 0.05
    # -1 and 11 are left out; 10 (the top edge) counts in the last bin
    assert counts.sum() == 5 and counts[0] == 3 and counts[20] == 1 and counts[-1] == 1
    on_device = keras.ops.convert_to_numpy(summary_tensor(values))
    np.testing.assert_allclose(on_device[:3], [mean, std, near_zero], rtol=1e-6)
    np.testing.assert_array_equal(on_device[3:], counts)
    # NaN is neither near zero nor counted
    with_nan = keras.ops.convert_to_numpy(summary_tensor(np.array([np.nan, 1.0], "float32")))
    assert with_nan[2] == 0.0 and with_nan[3:].sum() == 1


def test_rows_and_plots(tmp_path):
    net = _compile(_tiny_net())
    x, y = _data()
    stats = ActivationStats(x[:2])
    net.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[stats])
    rows = stats_rows(stats.stats)
    assert len(rows) == 3 * 3
    assert set(rows[0]) == {"step", "layer", "mean", "std", "near_zero"}
    assert [row["step"] for row in rows] == sorted(row["step"] for row in rows)
    paths = plot_stats(stats.stats, tmp_path / "plots")
    assert [p.name for p in paths] == ["activation_stats.png", "colour_dim.png"]
    assert all(p.exists() and p.stat().st_size > 1000 for p in paths)
    assert plt.get_fignums() == []


def test_training_mode_uses_batch_statistics_and_leaves_the_model_alone():
    net = _compile(_tiny_net())
    x, y = _data()
    sample = x[:4]
    stats = ActivationStats(sample, layer_names=["bn1", "relu1"], training=True)
    net.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[stats])
    moving = [v.numpy().copy() for v in net.non_trainable_variables]
    stats.record(99)
    assert all(np.array_equal(a, v.numpy()) for a, v in zip(moving, net.non_trainable_variables,
                                                            strict=True))
    # normalised by the sample's own batch statistics, as the training pass does
    bn = keras.ops.convert_to_numpy(
        keras.Model(net.input, net.get_layer("bn1").output)(sample, training=True))
    assert stats.stats["bn1"].mean[-1] == pytest.approx(float(bn.mean()), abs=1e-5)
    assert stats.stats["bn1"].std[-1] == pytest.approx(float(bn.std(ddof=1)), rel=1e-4)
