"""Tests for the model registry and the ResNet v1 builder.

Parameter counts are derived here from the layer arithmetic, independently of Keras, so a
changed layer (a lost bias, a BN on the projection, a wrong stage width) shows up as an
exact mismatch rather than a drift inside a tolerance.
"""

from __future__ import annotations

import functools
import sys

import keras
import numpy as np
import pytest

import nets
from nets.layers import SubsampleZeroPad
from nets.resnet import resnet_v1

# Table 6 of He et al. 2015 (CIFAR-10), in parameters
PUBLISHED_PARAMS = {20: 0.27e6, 32: 0.46e6, 44: 0.66e6, 56: 0.85e6, 110: 1.7e6, 1202: 19.4e6}


def _params(name: str) -> object:
    entry = nets.get_entry(name)
    marks = [pytest.mark.slow] if entry.slow else []
    return pytest.param(name, marks=marks, id=name)


ALL_MODELS = [_params(name) for name in nets.list_models()]


def _is_resnet_v1(name: str) -> bool:
    # the registry accepts the builder itself or its lazy "module:function" spelling
    return nets.get_entry(name).builder in (resnet_v1, "nets.resnet:resnet_v1")


RESNET_V1_MODELS = [_params(name) for name in nets.list_models() if _is_resnet_v1(name)]


@functools.cache
def _built(name: str, shortcut: str | None = None) -> keras.Model:
    """One build per (model, shortcut), shared by tests that do not fit it.

    A ``training=True`` call still moves the BN statistics, so no test may rely on their
    initial values.
    """
    keras.utils.set_random_seed(0)
    overrides = {} if shortcut is None else {"shortcut": shortcut}
    return nets.create_model(name, **overrides)


def _count(weights: list) -> int:
    return sum(int(np.prod(w.shape)) for w in weights)


def expected_resnet_v1_params(
    depth: int,
    *,
    in_channels: int = 3,
    num_classes: int = 10,
    shortcut: str = "projection",
) -> tuple[int, int]:
    """(trainable, non_trainable) parameters of ResNet v1, from the layer arithmetic alone."""

    def conv(k: int, cin: int, cout: int) -> int:
        return k * k * cin * cout + cout  # kernel + bias

    def bn(c: int) -> tuple[int, int]:
        return 2 * c, 2 * c  # gamma, beta / moving mean, moving variance

    n = (depth - 2) // 6
    trainable = conv(3, in_channels, 16)
    non_trainable = 0
    bn_t, bn_nt = bn(16)
    trainable += bn_t
    non_trainable += bn_nt

    cin = 16
    for filters in (16, 32, 64):
        for _ in range(n):
            trainable += conv(3, cin, filters) + conv(3, filters, filters)
            for _ in range(2):
                bn_t, bn_nt = bn(filters)
                trainable += bn_t
                non_trainable += bn_nt
            if cin != filters and shortcut == "projection":
                trainable += conv(1, cin, filters)
            cin = filters
    trainable += 64 * num_classes + num_classes
    return trainable, non_trainable


def projection_params() -> int:
    """The two 1x1 projection convs (16->32, 32->64) that option A replaces."""
    return (16 * 32 + 32) + (32 * 64 + 64)


def _depth(name: str) -> int:
    return nets.get_entry(name).defaults["depth"]


# --- every registered model -------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_MODELS)
def test_forward_pass_is_a_probability_distribution(name: str) -> None:
    entry = nets.get_entry(name)
    model = _built(name)
    batch = np.random.default_rng(0).random((2, *entry.input_shape), dtype=np.float32)

    # batch statistics, because an untrained network's BN moving statistics are the
    # identity: in inference mode every v1 unit then adds its branch unnormalized, the
    # activations grow geometrically with depth and ResNet-1202 overflows to NaN at init
    probs = keras.ops.convert_to_numpy(model(batch, training=True))

    assert probs.shape == (2, entry.num_classes)
    assert np.all(np.isfinite(probs))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert model.name == name


def test_registry_lists_the_paper_depths() -> None:
    expected = {f"resnet{d}_v1" for d in PUBLISHED_PARAMS}
    assert expected <= set(nets.list_models())
    assert expected <= {param.id for param in RESNET_V1_MODELS}
    assert nets.get_entry("resnet1202_v1").slow
    assert not nets.get_entry("resnet110_v1").slow


def test_unknown_model_name_lists_known_names() -> None:
    with pytest.raises(ValueError, match="resnet21_v1") as excinfo:
        nets.create_model("resnet21_v1")
    for known in nets.list_models():
        assert known in str(excinfo.value)


# --- ResNet v1 parameter counts ---------------------------------------------------------


@pytest.mark.parametrize("name", RESNET_V1_MODELS)
def test_resnet_v1_projection_param_count_is_exact(name: str) -> None:
    model = _built(name)
    trainable, non_trainable = expected_resnet_v1_params(_depth(name))

    assert _count(model.trainable_weights) == trainable
    assert _count(model.non_trainable_weights) == non_trainable
    assert model.count_params() == trainable + non_trainable
    # the published figures are rounded to two significant digits (1.7M covers
    # 1.65M-1.75M), and the book's projection adds two 1x1 convs and conv biases on top
    # of the paper's option A, so ResNet-110 lands 2.5% above "1.7M"
    published = PUBLISHED_PARAMS[_depth(name)]
    assert abs(model.count_params() - published) / published < 0.03


@pytest.mark.parametrize("name", RESNET_V1_MODELS)
def test_resnet_v1_zero_pad_param_count_is_exact(name: str) -> None:
    zero_pad = _built(name, "zero_pad")
    projection = _built(name)
    trainable, non_trainable = expected_resnet_v1_params(_depth(name), shortcut="zero_pad")

    assert _count(zero_pad.trainable_weights) == trainable
    assert _count(zero_pad.non_trainable_weights) == non_trainable
    assert projection.count_params() - zero_pad.count_params() == projection_params()
    # option A is the paper's own configuration, and the paper counts trainable weights
    published = PUBLISHED_PARAMS[_depth(name)]
    assert abs(trainable - published) / published < 0.02


def test_known_counts_for_resnet20() -> None:
    # the Keras book's model summary for ResNet20 v1 prints these totals
    assert expected_resnet_v1_params(20) == (273_066, 1_376)
    assert sum(expected_resnet_v1_params(20, shortcut="zero_pad")) == 271_786


# --- ResNet v1 architecture -------------------------------------------------------------


def test_layer_names_are_stable_and_unique() -> None:
    model = _built("resnet20_v1")
    names = [layer.name for layer in model.layers]

    assert len(names) == len(set(names))
    for expected in (
        "stem_conv",
        "stem_bn",
        "stem_relu",
        "stage1_unit1_conv1",
        "stage1_unit1_bn1",
        "stage1_unit1_relu1",
        "stage1_unit1_conv2",
        "stage1_unit1_bn2",
        "stage1_unit1_add",
        "stage1_unit1_out",
        "stage2_unit1_shortcut",
        "stage3_unit1_shortcut",
        "stage3_unit3_out",
        "head_pool",
        "head_flatten",
        "predictions",
    ):
        assert expected in names, expected
    # only the two downsampling units need a shortcut layer
    assert sorted(n for n in names if n.endswith("_shortcut")) == [
        "stage2_unit1_shortcut",
        "stage3_unit1_shortcut",
    ]
    assert sum(isinstance(layer, keras.layers.Add) for layer in model.layers) == 9


def test_layers_follow_the_book() -> None:
    model = _built("resnet20_v1")
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]

    assert len(convs) == 1 + 2 * 9 + 2
    for conv in convs:
        assert conv.padding == "same"
        assert conv.use_bias
        assert isinstance(conv.kernel_initializer, keras.initializers.HeNormal)
        assert isinstance(conv.kernel_regularizer, keras.regularizers.L2)
        assert conv.kernel_regularizer.l2 == pytest.approx(1e-4)
    assert model.get_layer("stage1_unit1_conv1").strides == (1, 1)
    assert model.get_layer("stage2_unit1_conv1").strides == (2, 2)
    assert model.get_layer("stage3_unit1_conv1").strides == (2, 2)
    assert model.get_layer("stage2_unit2_conv1").strides == (1, 1)
    shortcut = model.get_layer("stage2_unit1_shortcut")
    assert shortcut.kernel_size == (1, 1) and shortcut.strides == (2, 2)
    assert shortcut.activation is keras.activations.linear
    assert model.get_layer("stage3_unit3_out").output.shape == (None, 8, 8, 64)
    assert model.get_layer("head_pool").pool_size == (8, 8)
    assert len(model.losses) == len(convs)  # one L2 term per kernel


def test_l2_zero_disables_regularization() -> None:
    model = resnet_v1(input_shape=(32, 32, 3), num_classes=10, depth=8, name="r8", l2=0)
    assert model.losses == []


@pytest.mark.parametrize(
    ("input_shape", "num_classes", "shortcut"),
    [((28, 28, 1), 10, "projection"), ((64, 64, 3), 7, "projection"), ((30, 30, 3), 5, "zero_pad")],
)
def test_other_input_sizes(input_shape: tuple, num_classes: int, shortcut: str) -> None:
    model = resnet_v1(
        input_shape=input_shape, num_classes=num_classes, depth=8, name="r8", shortcut=shortcut
    )
    batch = np.random.default_rng(1).random((2, *input_shape), dtype=np.float32)

    probs = keras.ops.convert_to_numpy(model(batch))

    assert probs.shape == (2, num_classes)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    # the head must pool the whole final map, whatever its size
    assert model.get_layer("head_pool").output.shape == (None, 1, 1, 64)
    trainable, non_trainable = expected_resnet_v1_params(
        8, in_channels=input_shape[-1], num_classes=num_classes, shortcut=shortcut
    )
    assert model.count_params() == trainable + non_trainable


@pytest.mark.parametrize("depth", [21, 2, 0, 19, 25])
def test_bad_depth_raises_naming_it(depth: int) -> None:
    with pytest.raises(ValueError, match=rf"6n\+2.*got {depth}\b"):
        resnet_v1(input_shape=(32, 32, 3), num_classes=10, depth=depth, name="bad")


def test_bad_depth_through_the_registry() -> None:
    with pytest.raises(ValueError, match="21"):
        nets.create_model("resnet20_v1", depth=21)


def test_unknown_shortcut_raises_naming_it_and_the_options() -> None:
    with pytest.raises(ValueError, match="option_b") as excinfo:
        nets.create_model("resnet20_v1", shortcut="option_b")
    assert "projection" in str(excinfo.value)
    assert "zero_pad" in str(excinfo.value)


# --- the option A layer -----------------------------------------------------------------


@pytest.mark.parametrize("size", [4, 5])
def test_subsample_zero_pad_on_a_known_tensor(size: int) -> None:
    x = np.arange(2 * size * size * 3, dtype=np.float32).reshape(2, size, size, 3)
    layer = SubsampleZeroPad(5)

    out = keras.ops.convert_to_numpy(layer(x))

    half = (size + 1) // 2
    expected = np.zeros((2, half, half, 5), dtype=np.float32)
    expected[..., :3] = x[:, ::2, ::2, :]
    np.testing.assert_array_equal(out, expected)
    assert layer.compute_output_shape((None, size, size, 3)) == (None, half, half, 5)
    assert layer.count_params() == 0


def test_subsample_zero_pad_config_round_trip() -> None:
    layer = SubsampleZeroPad(32, name="sc")
    clone = SubsampleZeroPad.from_config(layer.get_config())
    assert clone.filters == 32 and clone.name == "sc"
    assert keras.saving.get_registered_name(SubsampleZeroPad) == "deepnets>SubsampleZeroPad"


def test_subsample_zero_pad_refuses_to_drop_channels() -> None:
    with pytest.raises(ValueError, match="16"):
        SubsampleZeroPad(8)(np.zeros((1, 4, 4, 16), dtype=np.float32))


# --- persistence and training -----------------------------------------------------------


@pytest.mark.parametrize("shortcut", ["projection", "zero_pad"])
def test_keras_file_round_trip(shortcut: str, tmp_path) -> None:
    model = _built("resnet20_v1", shortcut)
    batch = np.random.default_rng(2).random((2, 32, 32, 3), dtype=np.float32)
    path = tmp_path / "model.keras"

    model.save(path)
    loaded = keras.saving.load_model(path)

    expected = keras.ops.convert_to_numpy(model(batch, training=False))
    assert np.all(np.isfinite(expected))
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(loaded(batch, training=False)), expected
    )
    assert loaded.name == "resnet20_v1"
    assert type(loaded.get_layer("stage2_unit1_shortcut")) is type(
        model.get_layer("stage2_unit1_shortcut")
    )


def test_one_training_step_changes_the_weights() -> None:
    keras.utils.set_random_seed(3)
    model = nets.create_model("resnet20_v1")
    model.compile(
        optimizer=keras.optimizers.Adam(),
        loss="sparse_categorical_crossentropy",
        jit_compile=False,
    )
    rng = np.random.default_rng(3)
    images = rng.random((4, 32, 32, 3), dtype=np.float32)
    labels = rng.integers(0, 10, size=(4,))
    kernels = {w.path: w.numpy() for w in model.weights if w.path.endswith("kernel")}
    moving_mean = model.get_layer("stem_bn").moving_mean.numpy()

    loss = model.train_on_batch(images, labels)

    assert np.isfinite(loss)
    changed = {
        w.path
        for w in model.weights
        if w.path in kernels and not np.array_equal(w.numpy(), kernels[w.path])
    }
    assert changed == set(kernels)
    assert not np.array_equal(model.get_layer("stem_bn").moving_mean.numpy(), moving_mean)


def test_recursion_limit_is_raised_for_deep_graphs_and_never_lowered() -> None:
    from nets.resnet import ensure_recursion_limit

    before = sys.getrecursionlimit()
    try:
        sys.setrecursionlimit(1000)
        ensure_recursion_limit(1202)
        raised = sys.getrecursionlimit()
        assert raised > 2 * 7 * 3 * 200  # two frames per layer on ResNet-1202's longest path
        sys.setrecursionlimit(raised + 5000)
        ensure_recursion_limit(20)
        assert sys.getrecursionlimit() == raised + 5000
    finally:
        sys.setrecursionlimit(before)
