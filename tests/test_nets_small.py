"""Tests for the small MNIST CNNs (nets/small.py) and the hand-sign ResNet-50 (nets/resnet50.py).

Parameter counts are derived here from the layer arithmetic, independently of Keras, and
the published totals are checked as literals, so a lost bias, a missing BN or a wrong
padding (which changes the flattened width) shows up as an exact mismatch.
"""

from __future__ import annotations

import functools

import keras
import numpy as np
import pytest

import nets
from nets.resnet50 import resnet50
from nets.small import mnist_cnn, simple_cnn, ynet

SMALL_MODELS = ("mnist_cnn", "ynet", "simple_cnn", "resnet50")


@functools.cache
def _built(name: str, **overrides: object) -> keras.Model:
    """One build per (model, overrides); a ``training=True`` call may move BN statistics."""
    keras.utils.set_random_seed(0)
    return nets.create_model(name, **overrides)


def _count(weights: list) -> int:
    return sum(int(np.prod(w.shape)) for w in weights)


def _batch(shape: tuple[int, ...], n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *shape), dtype=np.float32)


def _predict(model: keras.Model, x: object) -> np.ndarray:
    return keras.ops.convert_to_numpy(model(x, training=False))


# --- parameter counts from the layer arithmetic ------------------------------------------


def conv(k: int, cin: int, cout: int) -> int:
    return k * k * cin * cout + cout  # kernel + bias


def dense(fan_in: int, units: int) -> int:
    return fan_in * units + units


def bn(channels: int) -> tuple[int, int]:
    return 2 * channels, 2 * channels  # gamma, beta / moving mean, moving variance


def expected_mnist_cnn(size: int = 28, channels: int = 1, classes: int = 10) -> int:
    # valid 3x3 convs and 2x2 pools: 28 -> 26 -> 13 -> 11 -> 5 -> 3
    side = ((size - 2) // 2 - 2) // 2 - 2
    return conv(3, channels, 64) + 2 * conv(3, 64, 64) + dense(side * side * 64, classes)


def expected_ynet(size: int = 28, channels: int = 1, classes: int = 10) -> int:
    # same-padded convs, so only the three pools shrink the map: 28 -> 14 -> 7 -> 3
    branch = conv(3, channels, 32) + conv(3, 32, 64) + conv(3, 64, 128)
    side = size // 2 // 2 // 2
    return 2 * branch + dense(side * side * 2 * 128, classes)


def expected_simple_cnn(widths: list[int], channels: int = 1) -> tuple[int, int]:
    """The chapter's conv(ni, nf, ks): stride-2 conv with bias, then BN; 5x5 first, 3x3 after."""
    trainable = non_trainable = 0
    cin = channels
    for index, cout in enumerate(widths):
        trainable += conv(5 if index == 0 else 3, cin, cout)
        bn_t, bn_nt = bn(cout)
        trainable += bn_t
        non_trainable += bn_nt
        cin = cout
    return trainable, non_trainable


def expected_resnet50(channels: int = 3, classes: int = 6) -> tuple[int, int]:
    trainable = conv(7, channels, 64)
    non_trainable = 0

    def add_bn(c: int) -> None:
        nonlocal trainable, non_trainable
        bn_t, bn_nt = bn(c)
        trainable += bn_t
        non_trainable += bn_nt

    add_bn(64)
    cin = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        out = 4 * width
        for block in range(blocks):
            trainable += conv(1, cin, width) + conv(3, width, width) + conv(1, width, out)
            for c in (width, width, out):
                add_bn(c)
            if block == 0:  # projection shortcut: 1x1 conv + BN
                trainable += conv(1, cin, out)
                add_bn(out)
            cin = out
    trainable += dense(2048, classes)
    return trainable, non_trainable


def test_published_totals_match_the_derivations() -> None:
    # the totals printed by model.summary() in the book and the tutorial
    assert expected_mnist_cnn() == 80_266
    assert expected_ynet() == 208_394
    assert sum(expected_resnet50()) == 23_600_006
    assert expected_resnet50()[1] == 53_120


def test_mnist_cnn_param_count_is_exact() -> None:
    model = _built("mnist_cnn")
    assert model.count_params() == expected_mnist_cnn() == 80_266
    assert model.non_trainable_weights == []


@pytest.mark.parametrize("two_inputs", [False, True])
def test_ynet_param_count_is_exact(two_inputs: bool) -> None:
    model = _built("ynet", two_inputs=two_inputs)
    assert model.count_params() == expected_ynet() == 208_394
    assert len(model.inputs) == (2 if two_inputs else 1)


def test_simple_cnn_param_count_is_exact() -> None:
    model = _built("simple_cnn")
    # the chapter's model: conv(1, 8, ks=5), conv(8, 16), conv(16, 32), conv(32, 64), conv(64, 10)
    trainable, non_trainable = expected_simple_cnn([8, 16, 32, 64, 10])
    assert _count(model.trainable_weights) == trainable == 30_542
    assert _count(model.non_trainable_weights) == non_trainable == 260


def test_resnet50_param_count_is_exact() -> None:
    model = _built("resnet50")
    trainable, non_trainable = expected_resnet50()
    assert _count(model.trainable_weights) == trainable
    assert _count(model.non_trainable_weights) == non_trainable == 53_120
    assert model.count_params() == 23_600_006


# --- forward passes and input sizes -------------------------------------------------------


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_inference_is_a_probability_distribution(name: str) -> None:
    entry = nets.get_entry(name)
    model = _built(name)
    probs = _predict(model, _batch(entry.input_shape))

    assert probs.shape == (2, entry.num_classes)
    assert np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert model.name == name


def test_registered_shapes() -> None:
    for name in ("mnist_cnn", "ynet", "simple_cnn"):
        entry = nets.get_entry(name)
        assert (entry.input_shape, entry.num_classes) == ((28, 28, 1), 10), name
    entry = nets.get_entry("resnet50")
    assert (entry.input_shape, entry.num_classes) == ((64, 64, 3), 6)


def test_ynet_shared_input_equals_the_books_two_inputs_fed_the_same_image() -> None:
    single = _built("ynet")
    double = ynet(input_shape=(28, 28, 1), num_classes=10, name="ynet2", two_inputs=True)
    for layer in single.layers:
        if layer.weights:
            double.get_layer(layer.name).set_weights(layer.get_weights())
    images = _batch((28, 28, 1), seed=4)

    np.testing.assert_allclose(_predict(double, [images, images]), _predict(single, images), atol=1e-6)
    assert [t.name for t in double.inputs] == ["left_inputs", "right_inputs"]


@pytest.mark.parametrize(("size", "classes"), [(32, 3), (224, 1000), (48, 2)])
def test_resnet50_other_sizes(size: int, classes: int) -> None:
    model = resnet50(input_shape=(size, size, 3), num_classes=classes, name="r50")
    probs = _predict(model, _batch((size, size, 3), n=1))

    assert probs.shape == (1, classes)
    assert np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    # the head pools the whole final map, so the count does not depend on the size
    assert model.get_layer("avg_pool").output.shape == (None, 1, 1, 2048)
    assert model.count_params() == sum(expected_resnet50(classes=classes))


def test_resnet50_non_square_and_grey_inputs() -> None:
    model = resnet50(input_shape=(32, 64, 1), num_classes=4, name="r50")
    assert model.get_layer("res5c_out").output.shape == (None, 1, 2, 2048)
    assert model.get_layer("avg_pool").pool_size == (1, 2)
    assert model.count_params() == sum(expected_resnet50(channels=1, classes=4))


@pytest.mark.parametrize("shape", [(16, 16, 3), (31, 64, 3), (64, 20, 3)])
def test_resnet50_rejects_inputs_below_32(shape: tuple) -> None:
    with pytest.raises(ValueError, match=rf"at least 32x32, got {shape[0]}x{shape[1]}"):
        resnet50(input_shape=shape, num_classes=6, name="r50")


def test_resnet50_rejects_16x16_through_the_registry() -> None:
    with pytest.raises(ValueError, match="16x16"):
        nets.create_model("resnet50", input_shape=(16, 16, 3))


@pytest.mark.parametrize(
    ("size", "widths"),
    [(28, [8, 16, 32, 64, 10]), (32, [8, 16, 32, 64, 10]), (64, [8, 16, 32, 64, 128, 10]), (3, [8, 10])],
)
def test_simple_cnn_stacks_stride2_layers_down_to_one_pixel(size: int, widths: list[int]) -> None:
    model = simple_cnn(input_shape=(size, size, 3), num_classes=10, name="s")
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]

    assert [c.filters for c in convs] == widths
    assert convs[-1].output.shape == (None, 1, 1, 10)
    trainable, non_trainable = expected_simple_cnn(widths, channels=3)
    assert _count(model.trainable_weights) == trainable
    assert _count(model.non_trainable_weights) == non_trainable
    probs = _predict(model, _batch((size, size, 3)))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_small_nets_reject_too_small_inputs() -> None:
    with pytest.raises(ValueError, match="at least 18x18, got 17x28"):
        mnist_cnn(input_shape=(17, 28, 1), num_classes=10, name="m")
    mnist_cnn(input_shape=(18, 18, 1), num_classes=10, name="m")  # the smallest that fits
    with pytest.raises(ValueError, match="at least 8x8, got 7x7"):
        ynet(input_shape=(7, 7, 1), num_classes=10, name="y")
    with pytest.raises(ValueError, match="at least 2x2, got 1x1"):
        simple_cnn(input_shape=(1, 1, 1), num_classes=10, name="s")


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("mnist_cnn", {"dropout": 1.5}, "dropout.*1.5"),
        ("mnist_cnn", {"filters": 0}, "filters.*got 0"),
        ("ynet", {"two_inputs": "yes"}, "two_inputs.*'yes'"),
        ("ynet", {"kernel_size": -3}, "kernel_size.*-3"),
        ("simple_cnn", {"first_kernel_size": 4}, "odd.*got 4"),
        ("simple_cnn", {"filters": 2.5}, "filters.*2.5"),
    ],
)
def test_bad_arguments_raise_naming_them(name: str, overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        nets.create_model(name, **overrides)


# --- the layers follow the sources --------------------------------------------------------


def test_mnist_cnn_layers_follow_the_book() -> None:
    model = _built("mnist_cnn")
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [c.padding for c in convs] == ["valid"] * 3
    assert [c.output.shape[1] for c in convs] == [26, 11, 3]
    assert model.get_layer("dropout").rate == pytest.approx(0.3)


def test_ynet_dilates_only_the_right_branch() -> None:
    model = _built("ynet")
    for side, dilation in (("left", (1, 1)), ("right", (2, 2))):
        for index, filters in enumerate((32, 64, 128), start=1):
            layer = model.get_layer(f"{side}_conv{index}")
            assert layer.dilation_rate == dilation
            assert layer.padding == "same"
            assert layer.filters == filters
            assert model.get_layer(f"{side}_dropout{index}").rate == pytest.approx(0.4)
    assert model.get_layer("concat").output.shape == (None, 3, 3, 256)
    assert model.get_layer("dropout").rate == pytest.approx(0.4)


def test_simple_cnn_layers_follow_the_chapter() -> None:
    model = _built("simple_cnn")
    first = model.get_layer("conv1_conv")
    assert first.kernel_size == (5, 5) and first.strides == (2, 2)
    assert model.get_layer("conv1_pad").padding == ((2, 2), (2, 2))
    assert model.get_layer("conv2_conv").kernel_size == (3, 3)
    bn_layer = model.get_layer("conv5_bn")
    assert bn_layer.momentum == pytest.approx(0.9) and bn_layer.epsilon == pytest.approx(1e-5)
    names = [layer.name for layer in model.layers]
    assert "conv5_relu" not in names and "conv4_relu" in names  # no ReLU on the class scores


def test_resnet50_stride_and_map_sizes_follow_the_tutorial() -> None:
    model = _built("resnet50")
    assert model.get_layer("conv1").output.shape == (None, 32, 32, 64)
    assert model.get_layer("pool1").output.shape == (None, 15, 15, 64)
    assert model.get_layer("res2c_out").output.shape == (None, 15, 15, 256)
    assert model.get_layer("res3d_out").output.shape == (None, 8, 8, 512)
    assert model.get_layer("res4f_out").output.shape == (None, 4, 4, 1024)
    assert model.get_layer("res5c_out").output.shape == (None, 2, 2, 2048)
    assert model.get_layer("avg_pool").pool_size == (2, 2)
    assert model.get_layer("res3a_branch2a").strides == (2, 2)
    assert model.get_layer("res3a_branch1").strides == (2, 2)
    assert model.get_layer("res2a_branch2a").strides == (1, 1)
    assert model.get_layer("res3a_branch2b").padding == "same"
    assert sum(isinstance(layer, keras.layers.Add) for layer in model.layers) == 16


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mnist_cnn", ["inputs", "conv1", "pool1", "conv3", "flatten", "dropout", "predictions"]),
        ("ynet", ["left_conv1", "right_pool3", "concat", "flatten", "dropout", "predictions"]),
        ("simple_cnn", ["conv1_pad", "conv1_conv", "conv1_bn", "conv1_relu", "conv5_bn", "predictions"]),
        (
            "resnet50",
            [
                "conv1_pad",
                "conv1",
                "bn_conv1",
                "pool1",
                "res2a_branch2a",
                "bn2a_branch2a",
                "res2a_branch1",
                "bn2a_branch1",
                "res2a_add",
                "res4f_branch2c",
                "res5c_out",
                "avg_pool",
                "predictions",
            ],
        ),
    ],
)
def test_layer_names_are_stable_and_unique(name: str, expected: list[str]) -> None:
    names = [layer.name for layer in _built(name).layers]
    assert len(names) == len(set(names))
    for layer_name in expected:
        assert layer_name in names, layer_name


# --- persistence and training ------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("mnist_cnn", ()),
        ("ynet", ()),
        ("ynet", (("two_inputs", True),)),
        ("simple_cnn", ()),
        ("resnet50", ()),
    ],
    ids=["mnist_cnn", "ynet", "ynet_two_inputs", "simple_cnn", "resnet50"],
)
def test_keras_file_round_trip(name: str, overrides: tuple, tmp_path) -> None:
    model = _built(name, **dict(overrides))
    images = _batch(nets.get_entry(name).input_shape, seed=2)
    x = [images, images] if dict(overrides).get("two_inputs") else images
    path = tmp_path / "model.keras"

    model.save(path)
    loaded = keras.saving.load_model(path)  # default safe_mode

    expected = _predict(model, x)
    assert np.all(np.isfinite(expected))
    np.testing.assert_array_equal(_predict(loaded, x), expected)
    assert loaded.name == name
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in model.layers]


@pytest.mark.parametrize("name", SMALL_MODELS)
def test_one_training_step_changes_the_weights(name: str) -> None:
    keras.utils.set_random_seed(3)
    entry = nets.get_entry(name)
    model = nets.create_model(name)
    model.compile(
        optimizer=keras.optimizers.Adam(),
        loss="sparse_categorical_crossentropy",
        jit_compile=False,
        # tracing ResNet-50's training graph takes ~40 s on two cores against ~2 s for one
        # eager step; it has only stock layers, and the small nets still run as a graph
        run_eagerly=name == "resnet50",
    )
    batch = 2 if name == "resnet50" else 4
    rng = np.random.default_rng(3)
    images = rng.random((batch, *entry.input_shape), dtype=np.float32)
    labels = rng.integers(0, entry.num_classes, size=(batch,))
    kernels = {w.path: w.numpy() for w in model.weights if w.path.endswith("kernel")}

    loss = model.train_on_batch(images, labels)

    assert np.isfinite(loss)
    changed = {
        w.path
        for w in model.weights
        if w.path in kernels and not np.array_equal(w.numpy(), kernels[w.path])
    }
    assert changed == set(kernels)
