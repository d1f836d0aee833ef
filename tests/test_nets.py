"""Tests for the model registry and the ResNet v1, ResNet v2 and DenseNet-BC builders.

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
from nets.densenet import densenet_bc
from nets.layers import SubsampleZeroPad
from nets.resnet import raise_recursion_limit, resnet_v1, resnet_v2

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


def _models_built_by(builder: object, spelling: str) -> list:
    return [
        _params(name)
        for name in nets.list_models()
        if nets.get_entry(name).builder in (builder, spelling)
    ]


RESNET_V2_MODELS = _models_built_by(resnet_v2, "nets.resnet:resnet_v2")
DENSENET_MODELS = _models_built_by(densenet_bc, "nets.densenet:densenet_bc")


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


# --- ResNet v2 --------------------------------------------------------------------------

# He et al. 2016 ("Identity Mappings"), CIFAR-10: ResNet-164 1.7 M, ResNet-1001 10.2 M, both with
# bottlenecks a quarter of the stage output wide (16/32/64). The book's resnet_v2 makes them as
# wide as the stage input (16/64/128), so its counts are not comparable with these; the "1.7M"
# the book prints for ResNet110 is the v1 figure of the 2015 paper's Table 6.
PUBLISHED_V2_PAPER_WIDTHS = {164: 1.7e6, 1001: 10.2e6}


def _conv_params(k: int, cin: int, cout: int) -> int:
    return k * k * cin * cout + cout  # kernel + bias


def expected_resnet_v2_params(
    depth: int, *, widths: str = "book", in_channels: int = 3, num_classes: int = 10
) -> tuple[int, int]:
    """(trainable, non_trainable) parameters of ResNet v2, from the layer arithmetic alone."""
    n = (depth - 2) // 9
    trainable = _conv_params(3, in_channels, 16) + 2 * 16
    non_trainable = 2 * 16
    stage_in = cin = 16
    for stage, out in enumerate((64, 128, 256)):
        inner = stage_in if widths == "book" else out // 4
        for unit in range(n):
            bn_channels = [inner, inner]
            if stage or unit:  # the network's first unit has no leading BN-ReLU
                bn_channels.append(cin)
            trainable += 2 * sum(bn_channels)
            non_trainable += 2 * sum(bn_channels)
            trainable += (
                _conv_params(1, cin, inner) + _conv_params(3, inner, inner) + _conv_params(1, inner, out)
            )
            if unit == 0:  # bare 1x1 projection
                trainable += _conv_params(1, cin, out)
            cin = out
        stage_in = out
    trainable += 2 * 256 + 256 * num_classes + num_classes  # head BN, Dense
    non_trainable += 2 * 256
    return trainable, non_trainable


@pytest.mark.parametrize("name", RESNET_V2_MODELS)
def test_resnet_v2_param_count_is_exact(name: str) -> None:
    model = _built(name)
    trainable, non_trainable = expected_resnet_v2_params(_depth(name))

    assert _count(model.trainable_weights) == trainable
    assert _count(model.non_trainable_weights) == non_trainable
    assert model.count_params() == trainable + non_trainable


def test_known_counts_for_resnet_v2() -> None:
    # pinned, so that the counter and the builder cannot drift together; these are the totals
    # the layers of the book's listing 2.4 add up to
    assert sum(expected_resnet_v2_params(56)) == 1_673_738
    assert sum(expected_resnet_v2_params(110)) == 3_323_210


def test_resnet_v2_paper_widths_match_the_paper() -> None:
    model = resnet_v2(input_shape=(32, 32, 3), num_classes=10, depth=20, name="r20", widths="paper")
    trainable, non_trainable = expected_resnet_v2_params(20, widths="paper")
    assert _count(model.trainable_weights) == trainable
    assert _count(model.non_trainable_weights) == non_trainable
    assert [model.get_layer(f"stage{s}_unit1_conv2").filters for s in (1, 2, 3)] == [16, 32, 64]
    # the paper's figures are rounded trainable counts of bias-free convs: ResNet-164 lands
    # 0.9% above 1.7 M (0.2% without the biases), ResNet-1001 2.0% above 10.2 M (1.3%)
    for depth, published in PUBLISHED_V2_PAPER_WIDTHS.items():
        trainable, _ = expected_resnet_v2_params(depth, widths="paper")
        assert abs(trainable - published) / published < 0.025, depth


def test_resnet_v2_architecture() -> None:
    model = _built("resnet56_v2")
    names = [layer.name for layer in model.layers]

    assert len(names) == len(set(names))
    for expected in (
        "stem_conv",
        "stem_bn",
        "stem_relu",
        "stage1_unit1_conv1",
        "stage1_unit1_shortcut",
        "stage1_unit2_bn1",
        "stage2_unit1_relu1",
        "stage3_unit6_conv3",
        "stage3_unit6_add",
        "head_bn",
        "head_relu",
        "head_pool",
        "head_flatten",
        "predictions",
    ):
        assert expected in names, expected
    # the stem has just applied BN-ReLU, so the first unit starts with its conv
    assert "stage1_unit1_bn1" not in names and "stage1_unit1_relu1" not in names
    assert model.get_layer("stage1_unit1_conv1").input is model.get_layer("stem_relu").output
    assert sorted(n for n in names if n.endswith("_shortcut")) == [
        f"stage{s}_unit1_shortcut" for s in (1, 2, 3)
    ]
    assert sum(isinstance(layer, keras.layers.Add) for layer in model.layers) == 3 * 6
    # no activation after any addition: the sums feed only BN, convs, the next Add or the head
    for layer in model.layers:
        inputs = layer.input if isinstance(layer.input, list) else [layer.input]
        if any(isinstance(t._keras_history.operation, keras.layers.Add) for t in inputs):
            assert isinstance(
                layer, keras.layers.BatchNormalization | keras.layers.Conv2D | keras.layers.Add
            ), layer.name

    # bottleneck widths 16/64/128, outputs 64/128/256; stride 2 on the first 1x1 conv
    assert [model.get_layer(f"stage{s}_unit1_conv2").filters for s in (1, 2, 3)] == [16, 64, 128]
    assert [model.get_layer(f"stage{s}_unit2_conv3").filters for s in (1, 2, 3)] == [64, 128, 256]
    for stage, stride in ((1, 1), (2, 2), (3, 2)):
        for layer in (f"stage{stage}_unit1_conv1", f"stage{stage}_unit1_shortcut"):
            assert model.get_layer(layer).strides == (stride, stride), layer
        assert model.get_layer(f"stage{stage}_unit1_conv2").strides == (1, 1)
        assert model.get_layer(f"stage{stage}_unit2_conv1").strides == (1, 1)
    shortcut = model.get_layer("stage2_unit1_shortcut")
    assert shortcut.kernel_size == (1, 1) and shortcut.activation is keras.activations.linear
    # the book projects the raw sum, not its BN-ReLU
    assert shortcut.input is model.get_layer("stage1_unit6_add").output
    assert model.get_layer("stage3_unit6_add").output.shape == (None, 8, 8, 256)
    assert model.get_layer("head_pool").pool_size == (8, 8)

    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 1 + 3 * 6 * 3 + 3
    for conv in convs:
        assert conv.padding == "same" and conv.use_bias
        assert isinstance(conv.kernel_initializer, keras.initializers.HeNormal)
        assert conv.kernel_regularizer.l2 == pytest.approx(1e-4)
    assert len(model.losses) == len(convs)


@pytest.mark.parametrize("depth", [57, 2, 0, 30, 110.0])
def test_resnet_v2_bad_depth_raises_naming_it(depth: object) -> None:
    with pytest.raises(ValueError, match=rf"9n\+2.*got {depth}\b"):
        resnet_v2(input_shape=(32, 32, 3), num_classes=10, depth=depth, name="bad")


def test_resnet_v2_bad_depth_and_widths_through_the_registry() -> None:
    with pytest.raises(ValueError, match="got 57"):
        nets.create_model("resnet56_v2", depth=57)
    with pytest.raises(ValueError, match="'wide'") as excinfo:
        nets.create_model("resnet56_v2", widths="wide")
    assert "book" in str(excinfo.value) and "paper" in str(excinfo.value)


# --- DenseNet-BC ------------------------------------------------------------------------

# Huang et al. 2017, Table 2 (C10): DenseNet-BC L=100 k=12 0.8 M, L=250 k=24 15.3 M, L=190 k=40
# 25.6 M. Those are trainable weights of the paper's Torch models, whose convs have no bias and
# whose stem has no BN; the book's convs keep Keras' bias, which adds 0.17% to BC-250 and 0.13% to
# BC-190. Tolerances: 0.8 M has one significant digit, so anything in [0.75 M, 0.85 M) prints as
# 0.8 M (BC-100 is 3.2% below); the others have three digits (half a unit is 0.33% and 0.2%),
# plus the biases: 1% for both.
PUBLISHED_DENSENET = {(100, 12): (0.8e6, 0.0625), (250, 24): (15.3e6, 0.01), (190, 40): (25.6e6, 0.01)}


def expected_densenet_bc_params(
    depth: int,
    growth_rate: int,
    *,
    compression: float = 0.5,
    in_channels: int = 3,
    num_classes: int = 10,
) -> tuple[int, int]:
    """(trainable, non_trainable) parameters of the book's DenseNet-BC, from the arithmetic."""
    n, k = (depth - 4) // 6, growth_rate
    bn_channels = [in_channels]  # the stem's BN normalizes the image itself
    trainable = _conv_params(3, in_channels, 2 * k)
    channels = in_channels + 2 * k  # the stem concatenates the image and its conv
    counted = 2 * k  # the book's num_filters_bef_dense_block leaves out the image channels
    for block in range(3):
        for _ in range(n):
            bn_channels += [channels, 4 * k]
            trainable += _conv_params(1, channels, 4 * k) + _conv_params(3, 4 * k, k)
            channels += k
            counted += k
        if block < 2:
            out = int(counted * compression)
            bn_channels.append(channels)
            trainable += _conv_params(1, channels, out)
            channels = counted = out
    trainable += 2 * sum(bn_channels) + channels * num_classes + num_classes
    return trainable, 2 * sum(bn_channels)


@pytest.mark.parametrize("name", DENSENET_MODELS)
def test_densenet_bc_param_count_is_exact(name: str) -> None:
    entry = nets.get_entry(name)
    depth, k = entry.defaults["depth"], entry.defaults["growth_rate"]
    model = _built(name)
    trainable, non_trainable = expected_densenet_bc_params(depth, k)

    assert _count(model.trainable_weights) == trainable
    assert _count(model.non_trainable_weights) == non_trainable
    assert model.count_params() == trainable + non_trainable
    published, tolerance = PUBLISHED_DENSENET[(depth, k)]
    assert abs(trainable - published) / published < tolerance


def test_known_counts_for_densenet_bc() -> None:
    # pinned, as above: the layers of the book's listing 2.5 (DenseNet-BC-100, k=12, 10 classes)
    assert sum(expected_densenet_bc_params(100, 12)) == 797_788
    assert expected_densenet_bc_params(100, 12)[0] == 774_376


def test_densenet_bc_architecture() -> None:
    model = _built("densenet_bc_100_k12")
    names = [layer.name for layer in model.layers]

    assert len(names) == len(set(names))
    for expected in (
        "stem_bn",
        "stem_relu",
        "stem_conv",
        "stem_concat",
        "block1_layer1_bn1",
        "block1_layer1_conv1",
        "block1_layer1_relu2",
        "block1_layer1_conv2",
        "block1_layer1_concat",
        "transition1_bn",
        "transition1_conv",
        "transition1_pool",
        "transition2_pool",
        "block3_layer16_concat",
        "head_pool",
        "head_flatten",
        "predictions",
    ):
        assert expected in names, expected
    assert not any(n.startswith(("block1_layer17", "block4", "transition3")) for n in names)
    # the book's transition has no ReLU, its head pools the raw concatenation, and the
    # registered variant has no dropout
    assert "transition1_relu" not in names and "head_bn" not in names
    assert not any(isinstance(layer, keras.layers.Dropout) for layer in model.layers)
    assert model.get_layer("stem_bn").input is model.get_layer("inputs").output

    # the paper's widths: 2k + 16k = 216 -> 108; 108 + 192 = 300 -> 150; 150 + 192 = 342
    assert model.get_layer("stem_conv").filters == 24
    assert model.get_layer("stem_concat").output.shape == (None, 32, 32, 27)
    assert model.get_layer("block1_layer16_concat").output.shape == (None, 32, 32, 219)
    assert model.get_layer("transition1_conv").filters == 108
    assert model.get_layer("transition2_conv").filters == 150
    assert model.get_layer("transition2_pool").output.shape == (None, 8, 8, 150)
    assert model.get_layer("head_flatten").output.shape == (None, 342)
    assert model.get_layer("head_pool").pool_size == (8, 8)
    assert model.get_layer("block2_layer3_conv1").filters == 48
    assert model.get_layer("block2_layer3_conv2").kernel_size == (3, 3)

    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 1 + 3 * 16 * 2 + 2
    for conv in convs:
        assert conv.padding == "same" and conv.use_bias and conv.strides == (1, 1)
        assert isinstance(conv.kernel_initializer, keras.initializers.HeNormal)
        # the book's listing has no weight decay; the paper recipe adds it via model_options
        assert conv.kernel_regularizer is None
    assert len(model.losses) == 0


def test_densenet_bc_dropout_is_optional() -> None:
    def build(dropout: float | None) -> keras.Model:
        return densenet_bc(
            input_shape=(16, 16, 3), num_classes=4, depth=16, growth_rate=4, dropout=dropout, name="dn"
        )

    with_dropout, without, zero = build(0.2), build(None), build(0)
    dropouts = [layer for layer in with_dropout.layers if isinstance(layer, keras.layers.Dropout)]

    # after both convs of every bottleneck layer (3 blocks x 2 layers) and both transitions
    assert len(dropouts) == 3 * 2 * 2 + 2
    assert {layer.rate for layer in dropouts} == {0.2}
    assert "transition1_drop" in [layer.name for layer in dropouts]
    for model in (without, zero):
        assert not any(isinstance(layer, keras.layers.Dropout) for layer in model.layers)
    assert with_dropout.count_params() == without.count_params() == sum(
        expected_densenet_bc_params(16, 4, in_channels=3, num_classes=4)
    )


@pytest.mark.parametrize(
    ("input_shape", "num_classes", "compression"),
    [((28, 28, 1), 10, 0.5), ((30, 30, 3), 7, 1.0), ((64, 48, 3), 5, 0.3)],
)
def test_densenet_bc_other_inputs(input_shape: tuple, num_classes: int, compression: float) -> None:
    model = densenet_bc(
        input_shape=input_shape,
        num_classes=num_classes,
        depth=10,
        growth_rate=6,
        compression=compression,
        name="dn",
    )
    batch = np.random.default_rng(4).random((2, *input_shape), dtype=np.float32)

    probs = keras.ops.convert_to_numpy(model(batch))

    assert probs.shape == (2, num_classes)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert model.get_layer("head_pool").output.shape[1:3] == (1, 1)
    trainable, non_trainable = expected_densenet_bc_params(
        10, 6, compression=compression, in_channels=input_shape[-1], num_classes=num_classes
    )
    assert model.count_params() == trainable + non_trainable


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"depth": 101}, "got 101"),
        ({"depth": 99}, "got 99"),
        ({"depth": 4}, "got 4"),
        ({"growth_rate": 0}, "growth_rate.*got 0"),
        ({"compression": 0}, "compression.*got 0"),
        ({"compression": 1.5}, "compression.*got 1.5"),
        ({"dropout": 1.0}, "dropout.*got 1.0"),
        ({"input_shape": (2, 2, 3)}, r"got \(2, 2, 3\)"),
    ],
)
def test_densenet_bc_bad_arguments_raise_naming_them(overrides: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        nets.create_model("densenet_bc_100_k12", **overrides)


def test_densenet_bc_bad_depth_names_the_rule() -> None:
    with pytest.raises(ValueError, match=r"6n\+4.*got 101\b"):
        densenet_bc(input_shape=(32, 32, 3), num_classes=10, depth=101, name="bad")


# --- every ResNet v2 and DenseNet-BC variant: persistence -------------------------------


# the shallowest variant of each family by default; the deeper ones repeat its layer types and
# add only build and load time (10-25 s each on two cores), so they run with the slow set
ROUND_TRIP_DEFAULT = ("resnet56_v2", "densenet_bc_100_k12")
ROUND_TRIP_MODELS = [
    param
    if param.id in ROUND_TRIP_DEFAULT
    else pytest.param(*param.values, marks=pytest.mark.slow, id=param.id)
    for param in RESNET_V2_MODELS + DENSENET_MODELS
]


@pytest.mark.parametrize("name", ROUND_TRIP_MODELS)
def test_keras_file_round_trip_of_every_variant(name: str, tmp_path) -> None:
    entry = nets.get_entry(name)
    model = _built(name)
    batch = np.random.default_rng(5).random((2, *entry.input_shape), dtype=np.float32)
    path = tmp_path / "model.keras"

    model.save(path)
    loaded = keras.saving.load_model(path)

    assert loaded.name == name
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in model.layers]
    # batch statistics are finite for every variant; the untrained moving statistics are not
    # for ResNet-1001 v2 (its unnormalized sums double with every unit), so inference is only
    # compared, NaN for NaN
    for training in (True, False):
        expected = keras.ops.convert_to_numpy(model(batch, training=training))
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(loaded(batch, training=training)), expected
        )
        if training:
            assert np.all(np.isfinite(expected))


# --- training and deep graphs -----------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet56_v2", "densenet_bc_100_k12"])
def test_one_training_step_changes_the_weights_of(name: str) -> None:
    keras.utils.set_random_seed(6)
    model = nets.create_model(name)
    # eagerly: tracing the train step of a 190- or 350-layer graph costs 30-90 s on two
    # cores, the eager step 4-7 s, and both run the same layers and optimizer
    model.compile(
        optimizer=keras.optimizers.Adam(),
        loss="sparse_categorical_crossentropy",
        jit_compile=False,
        run_eagerly=True,
    )
    rng = np.random.default_rng(6)
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


def test_v2_and_densenet_builders_raise_the_recursion_limit() -> None:
    before = sys.getrecursionlimit()
    try:
        sys.setrecursionlimit(1000)
        raise_recursion_limit(3000)
        assert sys.getrecursionlimit() == 7000
        raise_recursion_limit(10)
        assert sys.getrecursionlimit() == 7000  # never lowered

        sys.setrecursionlimit(1000)
        resnet_v2(input_shape=(8, 8, 3), num_classes=2, depth=11, name="r11")
        assert sys.getrecursionlimit() == 2 * (10 * 3 + 10) + 1000
        sys.setrecursionlimit(1000)
        densenet_bc(input_shape=(8, 8, 3), num_classes=2, depth=10, growth_rate=2, name="d10")
        assert sys.getrecursionlimit() == 2 * (9 * 3 + 20) + 1000
    finally:
        sys.setrecursionlimit(before)


def test_an_option_the_builder_does_not_take_is_named() -> None:
    with pytest.raises(ValueError, match=r"'simple_cnn' does not take option\(s\) shortcut"):
        nets.create_model("simple_cnn", shortcut="projection")
