"""ResNet-50 (He et al. 2015, table 1) as built in the deeplearning.ai hand-signs tutorial.

The registered variant (``resnet50``, 64x64x3 inputs and 6 classes, the SIGNS data set)
is stated in :mod:`nets.catalog`.
"""

from __future__ import annotations

from typing import Any

import keras

# (filters of the three convolutions, identity blocks after the convolutional block,
# stride of the convolutional block) for stages 2 to 5
STAGES = (
    ((64, 64, 256), 2, 1),
    ((128, 128, 512), 3, 2),
    ((256, 256, 1024), 5, 2),
    ((512, 512, 2048), 2, 2),
)
MIN_SIZE = 32  # the network downsamples by 32 before the head


def _conv(filters: int, kernel_size: int, *, name: str, strides: int = 1, padding: str = "valid") -> Any:
    """A biased Conv2D with the tutorial's ``glorot_uniform`` kernels."""
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding=padding,
        kernel_initializer="glorot_uniform",
        name=name,
    )


def _bn(name: str) -> Any:
    return keras.layers.BatchNormalization(axis=-1, name=name)


def _main_path(
    x: Any, filters: tuple[int, int, int], kernel_size: int, *, strides: int, name: str
) -> Any:
    """1x1 (stride ``strides``) - BN - ReLU - kxk same - BN - ReLU - 1x1 - BN, no final ReLU."""
    filters1, filters2, filters3 = filters
    y = _conv(filters1, 1, strides=strides, name=f"res{name}_branch2a")(x)
    y = _bn(f"bn{name}_branch2a")(y)
    y = keras.layers.Activation("relu", name=f"res{name}_branch2a_relu")(y)
    y = _conv(filters2, kernel_size, padding="same", name=f"res{name}_branch2b")(y)
    y = _bn(f"bn{name}_branch2b")(y)
    y = keras.layers.Activation("relu", name=f"res{name}_branch2b_relu")(y)
    y = _conv(filters3, 1, name=f"res{name}_branch2c")(y)
    return _bn(f"bn{name}_branch2c")(y)


def identity_block(
    x: Any, filters: tuple[int, int, int], *, kernel_size: int = 3, name: str
) -> Any:
    """Bottleneck block whose shortcut is the identity; ``x`` must have ``filters[2]`` channels.

    ``name`` is the tutorial's stage number and block letter (``"2b"``): layers are named
    ``res2b_branch2a``, ``bn2b_branch2a``, ..., ``res2b_add``, ``res2b_out``.
    """
    if x.shape[-1] != filters[2]:
        raise ValueError(
            f"identity_block {name} needs {filters[2]} input channels, got {x.shape[-1]}"
        )
    y = _main_path(x, filters, kernel_size, strides=1, name=name)
    x = keras.layers.Add(name=f"res{name}_add")([y, x])
    return keras.layers.Activation("relu", name=f"res{name}_out")(x)


def convolutional_block(
    x: Any, filters: tuple[int, int, int], *, kernel_size: int = 3, strides: int = 2, name: str
) -> Any:
    """Bottleneck block whose shortcut is a strided 1x1 conv and BN (``res{name}_branch1``).

    The stride sits on the first 1x1 convolution of the main path and on the shortcut,
    as in the tutorial (and the original Caffe model).
    """
    y = _main_path(x, filters, kernel_size, strides=strides, name=name)
    shortcut = _conv(filters[2], 1, strides=strides, name=f"res{name}_branch1")(x)
    shortcut = _bn(f"bn{name}_branch1")(shortcut)
    x = keras.layers.Add(name=f"res{name}_add")([y, shortcut])
    return keras.layers.Activation("relu", name=f"res{name}_out")(x)


def resnet50(
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    name: str,
) -> keras.Model:
    """ResNet-50: a 7x7 stem and 3 + 4 + 6 + 3 bottleneck blocks, average pooling, softmax.

    He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016
    (arXiv:1512.03385), table 1, as written in the deeplearning.ai "Residual Networks"
    assignment for the 64x64 SIGNS hand-sign images: zero padding 3, a 7x7/2 convolution
    with 64 filters, BN, ReLU, 3x3/2 max pooling; then stages of one convolutional block
    (projection shortcut) and 2, 3, 5, 2 identity blocks with bottleneck widths 64, 128,
    256, 512 (outputs four times wider); average pooling, flatten, softmax. Convolutions
    are biased, initialised ``glorot_uniform``, and BN keeps the Keras defaults.

    At 64x64 the last stage leaves a 2x2 map, which the tutorial's 2x2 average pooling
    reduces to one pixel. For other sizes the pooling window is the whole final map, so
    the head always sees 2048 features and the parameter count does not depend on the
    input size.

    Args:
        input_shape: (height, width, channels), channels last; height and width must be
            known and at least 32.
        num_classes: size of the softmax output.
        name: the model's name; layer names are fixed and do not depend on it.

    Returns:
        An uncompiled functional ``keras.Model`` named ``name`` with a softmax output
        of shape ``(batch, num_classes)``.

    Raises:
        ValueError: an unknown height or width, or one below 32.
    """
    height, width = input_shape[0], input_shape[1]
    if height is None or width is None:
        raise ValueError(f"resnet50 needs a known height and width, got {tuple(input_shape)!r}")
    if height < MIN_SIZE or width < MIN_SIZE:
        raise ValueError(
            f"resnet50 needs inputs of at least {MIN_SIZE}x{MIN_SIZE}, got {height}x{width}"
        )

    inputs = keras.Input(shape=tuple(input_shape), name="inputs")
    x = keras.layers.ZeroPadding2D(3, name="conv1_pad")(inputs)
    x = _conv(64, 7, strides=2, name="conv1")(x)
    x = _bn("bn_conv1")(x)
    x = keras.layers.Activation("relu", name="conv1_relu")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool1")(x)

    for stage, (filters, identity_blocks, strides) in enumerate(STAGES, start=2):
        x = convolutional_block(x, filters, strides=strides, name=f"{stage}a")
        for block in "bcdefghijklmnopqrstuvwxyz"[:identity_blocks]:
            x = identity_block(x, filters, name=f"{stage}{block}")

    # the tutorial's AveragePooling2D((2, 2)) covers the whole 2x2 map of a 64x64 input;
    # pooling whatever is left keeps 32x32 (a 1x1 map) and larger inputs working
    x = keras.layers.AveragePooling2D(pool_size=tuple(x.shape[1:3]), name="avg_pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = keras.layers.Dense(
        num_classes, activation="softmax", kernel_initializer="glorot_uniform", name="predictions",
        dtype="float32",  # the softmax in float32 under mixed precision too
    )(x)
    return keras.Model(inputs, outputs, name=name)
