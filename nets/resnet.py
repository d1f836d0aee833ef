"""ResNet v1 and v2 for CIFAR-sized inputs, as built in the Keras book.

v1: He et al. 2015, section 4.2 (post-activation basic units, depth 6n+2). v2: He et al. 2016,
"Identity Mappings in Deep Residual Networks" (pre-activation bottleneck units, depth 9n+2). The
registered variants (``resnet{20,32,44,56,110,1202}_v1``, ``resnet{56,110,164,1001}_v2``) are
stated in :mod:`nets.catalog`.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import keras

from nets.layers import SubsampleZeroPad

SHORTCUTS = ("projection", "zero_pad")
STAGE_FILTERS = (16, 32, 64)
# v2: every stage ends wider than its bottleneck convs (64, 128, 256 output channels)
V2_STAGE_OUTPUTS = (64, 128, 256)
WIDTHS = ("book", "paper")


def raise_recursion_limit(layers_on_path: int) -> None:
    """Raise Python's recursion limit for a graph whose longest path has ``layers_on_path`` layers.

    Keras maps a functional graph recursively, one Python frame per layer on the longest path
    (keras/src/ops/function.py, _build_map_helper), and the default limit is 1000. Twice the
    path plus the default leaves room for the caller's own frames. The limit is never lowered.
    """
    needed = 2 * layers_on_path + 1000
    if sys.getrecursionlimit() < needed:
        sys.setrecursionlimit(needed)


def ensure_recursion_limit(depth: int) -> None:
    """Raise Python's recursion limit enough for Keras to walk a ``depth``-layer ResNet v1 graph."""
    # ResNet-1202 chains ~4200 layers, far past the default limit of 1000. load_model walks
    # the graph again, so the limit stays raised; a process that only loads a saved
    # ResNet-1202 must call this first.
    raise_recursion_limit(7 * 3 * ((depth - 2) // 6) + 10)  # 7 layers per unit, stem and head


def _conv(filters: int, kernel_size: int, *, l2: float, name: str, strides: int = 1) -> Any:
    """A Conv2D with the book's ``resnet_layer`` settings: same padding, he_normal, L2, bias."""
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        kernel_initializer="he_normal",
        kernel_regularizer=keras.regularizers.L2(l2) if l2 else None,
        name=name,
    )


def stem(x: Any, filters: int, *, l2: float, name: str) -> Any:
    """conv3x3-BN-ReLU at full resolution before the first stage."""
    x = _conv(filters, 3, l2=l2, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.Activation("relu", name=f"{name}_relu")(x)


def shortcut_block(x: Any, filters: int, *, shortcut: str, l2: float, name: str) -> Any:
    """Identity path for a unit that halves the feature map and changes the width."""
    if shortcut == "projection":
        # the book projects with a bare 1x1 conv: no BN, no activation, so the added
        # term is linear like the identity it replaces
        return _conv(filters, 1, strides=2, l2=l2, name=f"{name}_shortcut")(x)
    return SubsampleZeroPad(filters, name=f"{name}_shortcut")(x)


def residual_unit(
    x: Any, filters: int, *, strides: int, shortcut: str, l2: float, name: str
) -> Any:
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut, then ReLU after the addition."""
    y = _conv(filters, 3, strides=strides, l2=l2, name=f"{name}_conv1")(x)
    y = keras.layers.BatchNormalization(name=f"{name}_bn1")(y)
    y = keras.layers.Activation("relu", name=f"{name}_relu1")(y)
    y = _conv(filters, 3, l2=l2, name=f"{name}_conv2")(y)
    y = keras.layers.BatchNormalization(name=f"{name}_bn2")(y)
    if strides != 1 or x.shape[-1] != filters:
        x = shortcut_block(x, filters, shortcut=shortcut, l2=l2, name=name)
    x = keras.layers.Add(name=f"{name}_add")([x, y])
    # v1 activates after the sum, so the identity path is not a clean identity; v2
    # moves this ReLU into the branch
    return keras.layers.Activation("relu", name=f"{name}_out")(x)


def stage(
    x: Any, filters: int, units: int, *, strides: int, shortcut: str, l2: float, name: str
) -> Any:
    """``units`` residual units of one width; only the first one may downsample."""
    for unit in range(1, units + 1):
        x = residual_unit(
            x,
            filters,
            strides=strides if unit == 1 else 1,
            shortcut=shortcut,
            l2=l2,
            name=f"{name}_unit{unit}",
        )
    return x


def resnet_v1(
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    depth: int,
    name: str,
    shortcut: str = "projection",
    l2: float = 1e-4,
) -> keras.Model:
    """ResNet v1 for small images: a 16-filter stem, three stages of 16/32/64 filters, softmax.

    He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016
    (arXiv:1512.03385), section 4.2, with the layer choices of Atienza, "Advanced Deep
    Learning with Keras", chapter 2: biased convolutions, ``he_normal`` initialization,
    L2 weight decay on every convolution, ReLU after the residual addition.

    Args:
        input_shape: (height, width, channels), channels last; height and width must be
            known (the head pools the whole final feature map).
        num_classes: size of the softmax output.
        depth: total weighted layers, ``6n + 2`` with ``n >= 1`` residual units per stage
            (20, 32, 44, 56, 110, 1202 in the paper).
        name: the model's name; layer names are fixed and do not depend on it.
        shortcut: how the identity path follows a downsampling unit: ``"projection"``
            (the book's default, a 1x1 stride-2 conv) or ``"zero_pad"`` (the paper's
            option A, parameter-free subsampling plus zero channels).
        l2: L2 weight-decay factor for every convolution kernel; 0 disables it.

    Returns:
        An uncompiled functional ``keras.Model`` named ``name`` with a softmax output
        of shape ``(batch, num_classes)``.

    Raises:
        ValueError: ``depth`` is not ``6n + 2`` with ``n >= 1``, ``shortcut`` is not one of
            :data:`SHORTCUTS`, or the spatial input size is unknown.
    """
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"resnet_v1 depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth!r}")
    if shortcut not in SHORTCUTS:
        raise ValueError(
            f"resnet_v1 shortcut must be one of {', '.join(SHORTCUTS)}, got {shortcut!r}"
        )
    height, width = input_shape[0], input_shape[1]
    if height is None or width is None:
        raise ValueError(f"resnet_v1 needs a known height and width, got {input_shape!r}")
    units = (depth - 2) // 6

    ensure_recursion_limit(depth)

    inputs = keras.Input(shape=tuple(input_shape), name="inputs")
    x = stem(inputs, STAGE_FILTERS[0], l2=l2, name="stem")
    for index, filters in enumerate(STAGE_FILTERS, start=1):
        x = stage(
            x,
            filters,
            units,
            strides=1 if index == 1 else 2,
            shortcut=shortcut,
            l2=l2,
            name=f"stage{index}",
        )

    # the book hard-codes pool_size=8 for 32x32 inputs; two stride-2 "same" convs leave
    # ceil(size / 4) pixels, and pooling all of them keeps other input sizes working
    pool_size = (math.ceil(height / 4), math.ceil(width / 4))
    x = keras.layers.AveragePooling2D(pool_size=pool_size, name="head_pool")(x)
    x = keras.layers.Flatten(name="head_flatten")(x)
    outputs = keras.layers.Dense(
        num_classes, activation="softmax", kernel_initializer="he_normal", name="predictions",
        dtype="float32",  # the softmax in float32 under mixed precision too
    )(x)
    return keras.Model(inputs, outputs, name=name)


# --- ResNet v2 --------------------------------------------------------------------------


def preact_bottleneck_unit(
    x: Any, inner: int, outer: int, *, strides: int, preact: bool, l2: float, name: str
) -> Any:
    """BN-ReLU-conv1x1(inner), BN-ReLU-conv3x3(inner), BN-ReLU-conv1x1(outer), plus the shortcut.

    ``preact=False`` drops the first BN-ReLU (the network's first unit, whose input the stem
    has just normalized and activated). A unit that changes the shape projects its shortcut
    with a bare 1x1 conv at the unit's stride; the sum is not activated, so the identity path
    runs clean from the stem to the head.
    """
    y = x
    if preact:
        y = keras.layers.BatchNormalization(name=f"{name}_bn1")(y)
        y = keras.layers.Activation("relu", name=f"{name}_relu1")(y)
    # the stride sits on the first 1x1 conv, as in the book; many later implementations move
    # it to the 3x3 so that the 1x1 does not simply skip three pixels in four
    y = _conv(inner, 1, strides=strides, l2=l2, name=f"{name}_conv1")(y)
    y = keras.layers.BatchNormalization(name=f"{name}_bn2")(y)
    y = keras.layers.Activation("relu", name=f"{name}_relu2")(y)
    y = _conv(inner, 3, l2=l2, name=f"{name}_conv2")(y)
    y = keras.layers.BatchNormalization(name=f"{name}_bn3")(y)
    y = keras.layers.Activation("relu", name=f"{name}_relu3")(y)
    y = _conv(outer, 1, l2=l2, name=f"{name}_conv3")(y)
    if strides != 1 or x.shape[-1] != outer:
        # the book projects the raw sum (not its BN-ReLU), with no BN and no activation
        x = _conv(outer, 1, strides=strides, l2=l2, name=f"{name}_shortcut")(x)
    return keras.layers.Add(name=f"{name}_add")([x, y])


def resnet_v2(
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    depth: int,
    name: str,
    widths: str = "book",
    l2: float = 1e-4,
) -> keras.Model:
    """ResNet v2 for small images: pre-activation bottleneck units, outputs 64/128/256, softmax.

    He, Zhang, Ren, Sun, "Identity Mappings in Deep Residual Networks", ECCV 2016
    (arXiv:1603.05027), with the layers of Atienza, "Advanced Deep Learning with Keras",
    chapter 2 (``resnet_v2``): a conv3x3(16)-BN-ReLU stem; three stages of ``n`` bottleneck
    units; the first unit of each stage projects its shortcut with a 1x1 conv, and those of
    stages 2 and 3 halve the map (stride 2 on their first 1x1 conv); no ReLU after any
    addition; a BN-ReLU head before the average pool. Convolutions are biased, ``he_normal``,
    with L2 weight decay.

    Args:
        input_shape: (height, width, channels), channels last, height and width known.
        num_classes: size of the softmax output.
        depth: total weighted layers, ``9n + 2`` with ``n >= 1`` units per stage (56, 110,
            164, 1001).
        name: the model's name; layer names are fixed and do not depend on it.
        widths: width of the bottleneck convs. ``"book"`` (the default): the stage's input
            width, 16/64/128, as the book's code builds it; ``"paper"``: a quarter of the
            stage's output, 16/32/64, as the paper's ResNet-164 (1.7 M parameters). The
            outputs are 64/128/256 either way.
        l2: L2 weight-decay factor for every convolution kernel; 0 disables it.

    Returns:
        An uncompiled functional ``keras.Model`` named ``name`` with a softmax output of
        shape ``(batch, num_classes)``.

    Raises:
        ValueError: ``depth`` is not ``9n + 2`` with ``n >= 1``, ``widths`` is not one of
            :data:`WIDTHS`, or the spatial input size is unknown.
    """
    if not isinstance(depth, int) or depth < 11 or (depth - 2) % 9:
        raise ValueError(f"resnet_v2 depth must be 9n+2 (56, 110, 164, 1001, ...), got {depth!r}")
    if widths not in WIDTHS:
        raise ValueError(f"resnet_v2 widths must be one of {', '.join(WIDTHS)}, got {widths!r}")
    height, width = input_shape[0], input_shape[1]
    if height is None or width is None:
        raise ValueError(f"resnet_v2 needs a known height and width, got {input_shape!r}")
    units = (depth - 2) // 9

    raise_recursion_limit(10 * 3 * units + 10)  # 10 layers per unit, stem and head

    inputs = keras.Input(shape=tuple(input_shape), name="inputs")
    x = stem(inputs, STAGE_FILTERS[0], l2=l2, name="stem")
    channels = STAGE_FILTERS[0]
    for index, outer in enumerate(V2_STAGE_OUTPUTS, start=1):
        inner = channels if widths == "book" else outer // 4
        for unit in range(1, units + 1):
            x = preact_bottleneck_unit(
                x,
                inner,
                outer,
                strides=2 if index > 1 and unit == 1 else 1,
                preact=not (index == 1 and unit == 1),
                l2=l2,
                name=f"stage{index}_unit{unit}",
            )
        channels = outer

    # the sums are never normalized inside the stages; the head does it once
    x = keras.layers.BatchNormalization(name="head_bn")(x)
    x = keras.layers.Activation("relu", name="head_relu")(x)
    pool_size = (math.ceil(height / 4), math.ceil(width / 4))
    x = keras.layers.AveragePooling2D(pool_size=pool_size, name="head_pool")(x)
    x = keras.layers.Flatten(name="head_flatten")(x)
    outputs = keras.layers.Dense(
        num_classes, activation="softmax", kernel_initializer="he_normal", name="predictions",
        dtype="float32",  # the softmax in float32 under mixed precision too
    )(x)
    return keras.Model(inputs, outputs, name=name)
