"""DenseNet-BC for CIFAR-sized inputs (Huang et al. 2017), as built in the Keras book.

The registered variants (``densenet_bc_100_k12``, ``densenet_bc_250_k24``,
``densenet_bc_190_k40``) are stated in :mod:`nets.catalog`.
"""

from __future__ import annotations

import math
from typing import Any

import keras

from nets.resnet import raise_recursion_limit

DENSE_BLOCKS = 3
# layers on the longest path through one bottleneck layer: BN, ReLU, conv, dropout, BN,
# ReLU, conv, dropout, concatenate
LAYERS_PER_BOTTLENECK = 9


def _conv(filters: int, kernel_size: int, *, l2: float, name: str) -> Any:
    """A Conv2D as the book's DenseNet builds it: same padding, he_normal, bias; L2 decay added."""
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        padding="same",
        kernel_initializer="he_normal",
        kernel_regularizer=keras.regularizers.L2(l2) if l2 else None,
        name=name,
    )


def _dropout(x: Any, rate: float | None, *, name: str) -> Any:
    return keras.layers.Dropout(rate, name=name)(x) if rate else x


def bn_relu(x: Any, *, name: str, suffix: str = "") -> Any:
    """BatchNormalization then ReLU, named ``{name}_bn{suffix}`` and ``{name}_relu{suffix}``."""
    x = keras.layers.BatchNormalization(name=f"{name}_bn{suffix}")(x)
    return keras.layers.Activation("relu", name=f"{name}_relu{suffix}")(x)


def bottleneck_layer(
    x: Any, growth_rate: int, *, dropout: float | None, l2: float, name: str
) -> Any:
    """BN-ReLU-conv1x1(4k)-[dropout]-BN-ReLU-conv3x3(k)-[dropout], concatenated to the input."""
    y = bn_relu(x, name=name, suffix="1")
    y = _conv(4 * growth_rate, 1, l2=l2, name=f"{name}_conv1")(y)
    y = _dropout(y, dropout, name=f"{name}_drop1")
    y = bn_relu(y, name=name, suffix="2")
    y = _conv(growth_rate, 3, l2=l2, name=f"{name}_conv2")(y)
    y = _dropout(y, dropout, name=f"{name}_drop2")
    return keras.layers.Concatenate(name=f"{name}_concat")([x, y])


def dense_block(
    x: Any, layers: int, growth_rate: int, *, dropout: float | None, l2: float, name: str
) -> Any:
    """``layers`` bottleneck layers; each adds ``growth_rate`` channels at the same resolution."""
    for index in range(1, layers + 1):
        x = bottleneck_layer(x, growth_rate, dropout=dropout, l2=l2, name=f"{name}_layer{index}")
    return x


def transition(x: Any, filters: int, *, dropout: float | None, l2: float, name: str) -> Any:
    """BN-conv1x1(filters)-[dropout]-AveragePooling2D(2): compress the channels, halve the map."""
    # the book's transition has no ReLU between the BN and the conv (the paper's has one)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    x = _conv(filters, 1, l2=l2, name=f"{name}_conv")(x)
    x = _dropout(x, dropout, name=f"{name}_drop")
    return keras.layers.AveragePooling2D(pool_size=2, name=f"{name}_pool")(x)


def densenet_bc(
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    depth: int = 100,
    growth_rate: int = 12,
    compression: float = 0.5,
    dropout: float | None = None,
    name: str,
    l2: float = 0.0,
) -> keras.Model:
    """DenseNet-BC (bottleneck and compression) for small images: three dense blocks, softmax.

    Huang, Liu, van der Maaten, Weinberger, "Densely Connected Convolutional Networks", CVPR
    2017 (arXiv:1608.06993), with the layers of Atienza, "Advanced Deep Learning with Keras",
    chapter 2 (listing 2.5):

    - stem: BN-ReLU-conv3x3(2k) on the input, concatenated with the input itself;
    - three dense blocks of ``(depth - 4) / 6`` bottleneck layers each
      (BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k), concatenated to their input);
    - after blocks 1 and 2 a transition, BN-conv1x1-AveragePooling2D(2), whose width is
      ``floor(compression * c)``, where ``c`` counts the channels the stem's conv and the
      bottleneck layers produced (the book's bookkeeping: the image channels the stem passes
      through are not counted, which gives the paper's widths, 108 and 150 for BC-100 k=12);
    - head: average pooling over the whole final map, Flatten, Dense softmax.

    Convolutions are biased and ``he_normal``, with L2 weight decay (the paper's 1e-4; the
    book's listing has none).

    Args:
        input_shape: (height, width, channels), channels last; height and width known and at
            least 4 (the two transitions halve them).
        num_classes: size of the softmax output.
        depth: ``6n + 4`` with ``n >= 1`` bottleneck layers per block (100, 190, 250).
        growth_rate: ``k``, the channels each bottleneck layer adds; at least 1.
        compression: ``theta`` in (0, 1], the fraction of channels a transition keeps.
        dropout: rate of the dropout after every conv of the bottleneck layers and
            transitions; ``None`` or 0 builds no dropout layers. The training recipe sets it:
            the book and the paper use 0.2 only when training without data augmentation.
        name: the model's name; layer names are fixed and do not depend on it.
        l2: L2 factor on every convolution kernel; 0 (the book) disables it.

    Returns:
        An uncompiled functional ``keras.Model`` named ``name`` with a softmax output of
        shape ``(batch, num_classes)``.

    Raises:
        ValueError: ``depth`` is not ``6n + 4`` with ``n >= 1``; ``growth_rate``,
            ``compression`` or ``dropout`` is out of range; a transition would keep no
            channel; or the spatial input size is unknown or below 4.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
        raise ValueError(f"densenet_bc depth must be 6n+4 (100, 190, 250, ...), got {depth!r}")
    if isinstance(growth_rate, bool) or not isinstance(growth_rate, int) or growth_rate < 1:
        raise ValueError(f"densenet_bc growth_rate must be an integer >= 1, got {growth_rate!r}")
    if not 0 < compression <= 1:
        raise ValueError(f"densenet_bc compression must be in (0, 1], got {compression!r}")
    if dropout is not None and not 0 <= dropout < 1:
        raise ValueError(f"densenet_bc dropout must be None or in [0, 1), got {dropout!r}")
    height, width = input_shape[0], input_shape[1]
    if height is None or width is None or height < 4 or width < 4:
        raise ValueError(
            f"densenet_bc needs a known height and width of at least 4, got {input_shape!r}"
        )
    layers = (depth - 4) // 6

    raise_recursion_limit(LAYERS_PER_BOTTLENECK * DENSE_BLOCKS * layers + 20)

    inputs = keras.Input(shape=tuple(input_shape), name="inputs")
    x = bn_relu(inputs, name="stem")
    x = _conv(2 * growth_rate, 3, l2=l2, name="stem_conv")(x)
    x = keras.layers.Concatenate(name="stem_concat")([inputs, x])
    grown = 2 * growth_rate  # channels made by convs so far, as the book counts them

    for block in range(1, DENSE_BLOCKS + 1):
        x = dense_block(
            x, layers, growth_rate, dropout=dropout, l2=l2, name=f"block{block}"
        )
        if block == DENSE_BLOCKS:
            break
        filters = math.floor((grown + layers * growth_rate) * compression)
        if filters < 1:
            raise ValueError(
                f"densenet_bc compression {compression!r} leaves transition {block} no channels"
            )
        x = transition(x, filters, dropout=dropout, l2=l2, name=f"transition{block}")
        grown = filters

    # the book pools the raw concatenation; the paper applies BN-ReLU first
    x = keras.layers.AveragePooling2D(pool_size=tuple(x.shape[1:3]), name="head_pool")(x)
    x = keras.layers.Flatten(name="head_flatten")(x)
    outputs = keras.layers.Dense(
        num_classes, activation="softmax", kernel_initializer="he_normal", name="predictions",
        dtype="float32",  # the softmax in float32 under mixed precision too
    )(x)
    return keras.Model(inputs, outputs, name=name)
