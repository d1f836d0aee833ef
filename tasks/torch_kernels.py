"""Faster convolution and batch-norm kernels for Keras' torch backend (params.yaml ``speed.fused_kernels``).

Keras 3.15 runs a channels-last ``Conv2D`` under torch by copying every input twice: it permutes
NHWC to a contiguous NCHW tensor, then converts that back to torch's channels-last memory
format, which is the NHWC layout it started from. Its ``BatchNormalization`` computes the batch
moments and the normalisation with separate element-wise ops (about ten kernels and their
gradients per layer) instead of torch's one fused kernel. Together these made ResNet20 v1 train
about a quarter slower than the same net written directly in PyTorch (docs/benchmarks.md).

:func:`install` replaces the two with equivalent code:

- ``conv``: a 4-D channels-last convolution passes torch a permuted *view* of the input, which
  already is an NCHW tensor in channels-last memory format, so nothing is copied; the output is
  channels-last too, and permuting it back is free. Every other case goes to Keras' own code.
- ``BatchNormalization.call`` in training: ``torch.native_batch_norm`` on the same view, one
  kernel forward and one backward. The moving averages are updated by Keras' own formula from
  the batch mean and the biased variance the kernel returns, so they match Keras exactly.
  Masks, renormalisation, synchronised BN and inference keep Keras' code.

Outputs and gradients equal Keras' to float32 rounding (tests/test_torch_kernels.py). The
replacement reaches into ``keras.src``; where that layout differs (another Keras release),
:func:`install` leaves Keras alone and says so.
"""

from __future__ import annotations

import warnings

_installed = False


def install() -> bool:
    """Replace Keras' torch conv and training-mode batch norm; True if they are in place now."""
    global _installed
    if _installed:
        return True
    import keras

    if keras.backend.backend() != "torch":
        return False
    try:
        from keras.src.backend import standardize_data_format
        from keras.src.backend.torch import nn as torch_nn
        from keras.src.layers.normalization.batch_normalization import BatchNormalization

        keras_conv = torch_nn.conv
        keras_call = BatchNormalization.call
        same_padding = torch_nn._apply_same_padding
        to_tensor = torch_nn.convert_to_tensor
        standardize = torch_nn.standardize_tuple
    except (ImportError, AttributeError) as error:
        warnings.warn(
            f"speed.fused_kernels: Keras {keras.__version__} is laid out differently ({error}); "
            "training uses Keras' own kernels. Set speed.fused_kernels: false to silence this.",
            stacklevel=2,
        )
        return False

    import torch

    def conv(inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1):
        data_format = standardize_data_format(data_format)
        if data_format != "channels_last" or len(inputs.shape) != 4:
            return keras_conv(inputs, kernel, strides, padding, data_format, dilation_rate)
        x = to_tensor(inputs).permute(0, 3, 1, 2)  # NCHW view of NHWC memory: no copy
        kernel = to_tensor(kernel).permute(3, 2, 0, 1)  # HWIO -> OIHW
        strides = standardize(strides, 2, "strides")
        dilation_rate = standardize(dilation_rate, 2, "dilation_rate")
        groups = x.shape[1] // kernel.shape[1]
        if padding == "same":
            x, padding = same_padding(x, kernel.shape[2:], strides, "channels_first", "conv",
                                      dilation_rate)
        else:
            padding = 0
        y = torch.nn.functional.conv2d(x, kernel, stride=strides, padding=padding,
                                       dilation=dilation_rate, groups=groups)
        return y.permute(0, 2, 3, 1)

    def call(self, inputs, training=None, mask=None):
        fusable = (
            training and self.trainable and mask is None and not self.renorm
            and not self.synchronized and len(inputs.shape) == 4
            and self.axis in (3, -1)
        )
        if not fusable:
            return keras_call(self, inputs, training=training, mask=mask)
        x = to_tensor(inputs).float().permute(0, 3, 1, 2)
        gamma = self.gamma.value.float() if self.scale else None
        beta = self.beta.value.float() if self.center else None
        y, mean, inverse_std = torch.native_batch_norm(
            x, gamma, beta, None, None, True, 0.0, self.epsilon)
        with torch.no_grad():
            variance = inverse_std.pow(-2) - self.epsilon  # the batch's biased variance
            momentum = self.momentum
            self.moving_mean.assign(self.moving_mean.value * momentum + mean * (1.0 - momentum))
            self.moving_variance.assign(
                self.moving_variance.value * momentum + variance * (1.0 - momentum))
        return keras.ops.cast(y.permute(0, 2, 3, 1), self.compute_dtype)

    torch_nn.conv = conv
    BatchNormalization.call = call
    _installed = True
    return True
