"""Small MNIST-sized CNNs: the Keras book's plain CNN and Y-network, and fastai's stride-2 CNN.

* :func:`mnist_cnn`: three 3x3 convolutions with max pooling, dropout and a softmax
  (Atienza, "Advanced Deep Learning with Keras", listing 2.1).
* :func:`ynet`: two three-stage branches, the right one dilated, concatenated
  (the same book, listing 2.2).
* :func:`simple_cnn`: stride-2 convolutions with batch norm down to a 1x1 map
  (Howard & Gugger, "Deep Learning for Coders with fastai and PyTorch", chapter 13).

The registered variants (``mnist_cnn``, ``ynet``, ``simple_cnn``) are stated in
:mod:`nets.catalog`.
"""

from __future__ import annotations

from typing import Any

import keras


def _check_positive(builder: str, argument: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{builder} {argument} must be a positive integer, got {value!r}")


def _check_rate(builder: str, value: Any) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < 1:
        raise ValueError(f"{builder} dropout must be in [0, 1), got {value!r}")


def _check_size(builder: str, input_shape: tuple, minimum: int) -> None:
    height, width = input_shape[0], input_shape[1]
    if height is None or width is None:
        raise ValueError(f"{builder} needs a known height and width, got {tuple(input_shape)!r}")
    if height < minimum or width < minimum:
        raise ValueError(
            f"{builder} needs inputs of at least {minimum}x{minimum}, got {height}x{width}"
        )


# --- listing 2.1: the plain MNIST CNN ---------------------------------------------------


def mnist_cnn(
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    name: str,
    filters: int = 64,
    kernel_size: int = 3,
    dropout: float = 0.3,
) -> keras.Model:
    """Three unpadded ReLU convolutions, max pooling after the first two, dropout, softmax.

    Atienza, "Advanced Deep Learning with Keras", listing 2.1 (the functional-API form of
    the chapter 1 MNIST classifier): every convolution keeps the Keras defaults the book
    uses (``valid`` padding, ``glorot_uniform`` kernels, biases), and ``MaxPooling2D`` its
    default 2x2 window. At 28x28 the maps shrink 26, 13, 11, 5, 3.

    Args:
        input_shape: (height, width, channels), channels last; at least 18x18 with 3x3 kernels, the
            smallest input that leaves a map for the last convolution.
        num_classes: size of the softmax output.
        name: the model's name; layer names are fixed and do not depend on it.
        filters: filters of every convolution (64 in the book).
        kernel_size: side of every convolution kernel (3 in the book).
        dropout: rate of the dropout after flattening (0.3 in the book).

    Returns:
        An uncompiled functional ``keras.Model`` named ``name`` with a softmax output
        of shape ``(batch, num_classes)``.

    Raises:
        ValueError: a non-positive ``filters`` or ``kernel_size``, a ``dropout`` outside
            [0, 1), or an input too small for three convolutions and two poolings.
    """
    _check_positive("mnist_cnn", "filters", filters)
    _check_positive("mnist_cnn", "kernel_size", kernel_size)
    _check_rate("mnist_cnn", dropout)
    # conv, pool, conv, pool, conv must leave at least one pixel (18x18 for 3x3 kernels)
    shrink = kernel_size - 1
    _check_size("mnist_cnn", input_shape, 7 * shrink + 4)

    inputs = keras.Input(shape=tuple(input_shape), name="inputs")
    x = inputs
    for index in (1, 2, 3):
        x = keras.layers.Conv2D(filters, kernel_size, activation="relu", name=f"conv{index}")(x)
        if index < 3:
            x = keras.layers.MaxPooling2D(name=f"pool{index}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="predictions",
                                 dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)


# --- listing 2.2: the Y-network ---------------------------------------------------------


def ynet_branch(
    x: Any,
    *,
    filters: int,
    kernel_size: int,
    dropout: float,
    dilation_rate: int,
    stages: int = 3,
    name: str,
) -> Any:
    """``stages`` sets of same-padded ReLU conv, dropout, 2x2 max pooling; filters double per set."""
    for index in range(1, stages + 1):
        x = keras.layers.Conv2D(
            filters * 2 ** (index - 1),
            kernel_size,
            padding="same",
            activation="relu",
            dilation_rate=dilation_rate,
            name=f"{name}_conv{index}",
        )(x)
        x = keras.layers.Dropout(dropout, name=f"{name}_dropout{index}")(x)
        x = keras.layers.MaxPooling2D(name=f"{name}_pool{index}")(x)
    return x


def ynet(
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    name: str,
    filters: int = 32,
    kernel_size: int = 3,
    dropout: float = 0.4,
    two_inputs: bool = False,
) -> keras.Model:
    """The Y-network: a plain and a dilated CNN branch on the same image, concatenated.

    Atienza, "Advanced Deep Learning with Keras", listing 2.2. Each branch is three sets
    of a same-padded ReLU convolution (``filters``, twice that, four times that), dropout
    and 2x2 max pooling; the right branch dilates its kernels by 2 to widen the receptive
    field at the same cost. The branch outputs are concatenated along the channels,
    flattened, dropped out and classified by a softmax layer. At 28x28 both branches end
    at 3x3x128.

    The book gives the model two ``Input`` layers and feeds the same image to both
    (``model.fit([x_train, x_train], ...)``). Every other model here takes one image, so
    by default one ``Input`` feeds both branches: the same function with the same weights.
    ``two_inputs=True`` builds the book's literal two-input model.

    Args:
        input_shape: (height, width, channels), channels last; at least 8x8 (three 2x2
            poolings).
        num_classes: size of the softmax output.
        name: the model's name; layer names are fixed and do not depend on it.
        filters: filters of the first convolution of each branch (32 in the book).
        kernel_size: side of every convolution kernel (3 in the book).
        dropout: rate of every dropout layer, in the branches and after flattening
            (0.4 in the book).
        two_inputs: build the book's two-input model (inputs ``left_inputs`` and
            ``right_inputs``) instead of one input shared by both branches.

    Returns:
        An uncompiled functional ``keras.Model`` named ``name`` with a softmax output
        of shape ``(batch, num_classes)``.

    Raises:
        ValueError: a non-positive ``filters`` or ``kernel_size``, a ``dropout`` outside
            [0, 1), a non-boolean ``two_inputs``, or an input smaller than 8x8.
    """
    _check_positive("ynet", "filters", filters)
    _check_positive("ynet", "kernel_size", kernel_size)
    _check_rate("ynet", dropout)
    if not isinstance(two_inputs, bool):
        raise ValueError(f"ynet two_inputs must be True or False, got {two_inputs!r}")
    _check_size("ynet", input_shape, 8)

    if two_inputs:
        left_inputs = keras.Input(shape=tuple(input_shape), name="left_inputs")
        right_inputs = keras.Input(shape=tuple(input_shape), name="right_inputs")
        inputs: Any = [left_inputs, right_inputs]
    else:
        left_inputs = right_inputs = inputs = keras.Input(shape=tuple(input_shape), name="inputs")

    branch = {"filters": filters, "kernel_size": kernel_size, "dropout": dropout}
    left = ynet_branch(left_inputs, dilation_rate=1, name="left", **branch)
    right = ynet_branch(right_inputs, dilation_rate=2, name="right", **branch)
    x = keras.layers.Concatenate(name="concat")([left, right])
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="predictions",
                                 dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)


# --- fastai chapter 13: the stride-2 CNN with batch norm --------------------------------


def stride2_sizes(size: int) -> list[int]:
    """Map sizes after each stride-2 convolution until the map is one pixel wide."""
    sizes = []
    while size > 1:
        # PyTorch's (n + 2 * (k // 2) - k) // 2 + 1 for odd k, which is ceil(n / 2)
        size = (size + 1) // 2
        sizes.append(size)
    return sizes


def conv_bn(
    x: Any, filters: int, kernel_size: int, *, activation: bool = True, name: str
) -> Any:
    """fastai's ``conv``: pad ``k // 2``, stride-2 conv, batch norm, optional ReLU."""
    # padding="same" would produce the same map sizes, but pads only the bottom/right
    # edge for even sizes; explicit symmetric padding matches nn.Conv2d(padding=k // 2)
    x = keras.layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad")(x)
    x = keras.layers.Conv2D(filters, kernel_size, strides=2, name=f"{name}_conv")(x)
    # PyTorch's BatchNorm2d defaults: momentum 0.1 on the new batch, epsilon 1e-5
    x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name=f"{name}_bn")(x)
    if activation:
        x = keras.layers.Activation("relu", name=f"{name}_relu")(x)
    return x


def simple_cnn(
    *,
    input_shape: tuple[int, int, int],
    num_classes: int,
    name: str,
    filters: int = 8,
    first_kernel_size: int = 5,
) -> keras.Model:
    """Stride-2 conv-BN-ReLU layers down to a 1x1 map, the last one giving the class scores.

    Howard & Gugger, "Deep Learning for Coders with fastai and PyTorch", chapter 13
    (``simple_cnn`` with the batch-norm ``conv``): a 5x5 first convolution, then 3x3
    ones, every one with stride 2 and padding ``k // 2``, followed by batch norm and, for
    all but the last, ReLU. The widths start at ``filters`` and double with each layer;
    the last layer has ``num_classes`` filters and no ReLU, and its 1x1 map is flattened.
    At 28x28 that is 8, 16, 32, 64, then 10 filters on maps of 14, 7, 4, 2, 1.

    The chapter stops at the logits because fastai's cross-entropy applies the softmax;
    here a softmax layer follows, since the training loss takes probabilities. The number
    of layers follows the input size: enough stride-2 layers to reach 1x1.

    Args:
        input_shape: (height, width, channels), channels last; at least 2x2.
        num_classes: filters of the last convolution and size of the softmax output.
        name: the model's name; layer names are fixed and do not depend on it.
        filters: width of the first convolution (8 in the chapter's final model).
        first_kernel_size: odd kernel side of the first convolution (5 in the chapter).

    Returns:
        An uncompiled functional ``keras.Model`` named ``name`` with a softmax output
        of shape ``(batch, num_classes)``.

    Raises:
        ValueError: a non-positive ``filters``, an even or non-positive
            ``first_kernel_size``, or an input smaller than 2x2.
    """
    _check_positive("simple_cnn", "filters", filters)
    _check_positive("simple_cnn", "first_kernel_size", first_kernel_size)
    if first_kernel_size % 2 == 0:
        raise ValueError(f"simple_cnn first_kernel_size must be odd, got {first_kernel_size!r}")
    _check_size("simple_cnn", input_shape, 2)
    layers = max(len(stride2_sizes(input_shape[0])), len(stride2_sizes(input_shape[1])))

    inputs = keras.Input(shape=tuple(input_shape), name="inputs")
    x = inputs
    for index in range(1, layers + 1):
        last = index == layers
        x = conv_bn(
            x,
            num_classes if last else filters * 2 ** (index - 1),
            first_kernel_size if index == 1 else 3,
            activation=not last,
            name=f"conv{index}",
        )
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = keras.layers.Activation("softmax", name="predictions", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=name)
