"""Faster convolution and batch-norm kernels for Keras' torch backend (params.yaml ``speed.fused_kernels``).

Keras 3.15 runs a channels-last ``Conv2D`` under torch by copying every input twice: it permutes
NHWC to a contiguous NCHW tensor, then converts that back to torch's channels-last memory
format, which is the NHWC layout it started from. It adds the bias as a separate op, and pads
TensorFlow's asymmetric "same" in NCHW. Its ``BatchNormalization`` computes the batch moments
and the normalisation with separate element-wise ops (about ten kernels and their gradients per
layer) instead of torch's one fused kernel. Together these made ResNet20 v1 train about a
quarter slower than the same net written directly in PyTorch (docs/benchmarks.md).

:func:`install` replaces them with equivalent code:

- ``conv`` and ``Conv2D.call``: a 4-D channels-last convolution passes torch a permuted *view*
  of the input, which already is an NCHW tensor in channels-last memory format, so nothing is
  copied; the output is channels-last too, and permuting it back is free. The bias goes into
  torch's convolution, and asymmetric padding is done in NHWC. An input whose memory is not
  NHWC (an augmented batch can be a strided view) is copied to it once: from a strided input
  torch picks its NCHW kernels, and every later layer then follows in that layout, which cost
  about a tenth of ResNet20 v1's step. Every other case goes to Keras' own code.
- ``BatchNormalization.call`` in training: ``torch.native_batch_norm`` on the same view, one
  kernel forward and one backward. The moving averages are updated by Keras' own formula from
  the batch mean and the biased variance the kernel returns, so they match Keras exactly.
  Masks, renormalisation, synchronised BN and inference keep Keras' code.

Under ``torch.compile`` (``speed.jit_compile: true``) all three step aside and Keras' own code
is traced: Inductor fuses and lays out the graph itself, and the eager-mode kernels above trip
its stride analysis on the batch's dynamic shape.

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
        from keras.src.layers.convolutional.base_conv import BaseConv
        from keras.src.layers.normalization.batch_normalization import BatchNormalization

        keras_conv = torch_nn.conv
        keras_call = BatchNormalization.call
        keras_conv_call = BaseConv.call
        keras_conv_op = BaseConv.convolution_op
        compute_padding = torch_nn._compute_padding_length
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

    # under torch.compile (speed.jit_compile) Inductor fuses and lays out the graph itself,
    # and these eager-mode kernels trip its stride analysis: Keras' own code is traced instead
    compiling = torch.compiler.is_compiling

    def conv2d(inputs, kernel, bias, strides, padding, dilation_rate):
        """A channels-last 2-D convolution in torch's channels-last kernels, bias fused."""
        x = to_tensor(inputs)
        kernel = to_tensor(kernel).permute(3, 2, 0, 1)  # HWIO -> OIHW
        strides = standardize(strides, 2, "strides")
        dilation_rate = standardize(dilation_rate, 2, "dilation_rate")
        if padding == "same":
            pads = [compute_padding(x.shape[1 + i], kernel.shape[2 + i], strides[i],
                                    dilation_rate[i]) for i in (0, 1)]
            if all(left == right for left, right in pads):
                padding = [left for left, _ in pads]
            else:  # TensorFlow's "same": the odd pixel at the bottom/right, padded in NHWC
                (top, bottom), (left, right) = pads
                x = torch.nn.functional.pad(x, (0, 0, left, right, top, bottom))
                padding = 0
        else:
            padding = 0
        # an NCHW view of NHWC memory, which is torch's channels-last format: no copy. A batch
        # with other strides (flipped, transposed) is copied once here; left as it is, torch
        # would choose its NCHW kernels and every later layer would follow in that slower layout
        x = x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        bias = None if bias is None else to_tensor(bias)
        y = torch.nn.functional.conv2d(x, kernel, bias, stride=strides, padding=padding,
                                       dilation=dilation_rate,
                                       groups=x.shape[1] // kernel.shape[1])
        return y.permute(0, 2, 3, 1)

    def conv(inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1):
        data_format = standardize_data_format(data_format)
        if data_format != "channels_last" or len(inputs.shape) != 4 or compiling():
            return keras_conv(inputs, kernel, strides, padding, data_format, dilation_rate)
        return conv2d(inputs, kernel, None, strides, padding, dilation_rate)

    def conv_call(self, inputs):
        # Conv2D with a bias: the bias goes into torch's kernel (one op forward, and its
        # gradient comes out of the convolution's backward) instead of a separate add
        if (self.rank != 2 or not self.use_bias or self.data_format != "channels_last"
                or type(self).convolution_op is not keras_conv_op or compiling()):
            return keras_conv_call(self, inputs)
        outputs = conv2d(inputs, self.kernel, self.bias, self.strides, self.padding,
                         self.dilation_rate)
        return outputs if self.activation is None else self.activation(outputs)

    def call(self, inputs, training=None, mask=None):
        fusable = (
            training and self.trainable and mask is None and not self.renorm
            and not self.synchronized and len(inputs.shape) == 4
            and self.axis in (3, -1) and not compiling()
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
    BaseConv.call = conv_call
    BatchNormalization.call = call
    _installed = True
    return True
