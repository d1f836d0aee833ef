"""Faster convolutions, batch norm and layer calls for Keras' torch backend (``speed.fused_kernels``).

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
- Functional models call their plain layers (convolutions, batch norms, activations, additions,
  poolings, dense and a few more) by ``call`` directly instead of through ``Layer.__call__``,
  whose bookkeeping cost ResNet20 v1 about 20 ms a step on a 2-core CPU at any batch size (a
  step at batch 128 takes about 400 ms there). Only where
  that bookkeeping has nothing to do: an eager float32 call on torch tensors with an explicit
  training flag and no masks, to a layer without an activity regulariser, another dtype
  policy, quantisation or torch hooks. Everything else goes through Keras as before.

Under ``torch.compile`` (``speed.jit_compile: true``) all of these step aside and Keras' own code
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
    _install_direct_calls(keras, torch, compiling)
    _installed = True
    return True


def _install_direct_calls(keras, torch, compiling) -> None:
    """Run a functional model's plain layers by their ``call``, without ``Layer.__call__``.

    ``Layer.__call__`` converts arguments, resolves the training flag and masks, opens name and
    autocast scopes and goes through ``torch.nn.Module.__call__``: about 0.1 to 0.2 ms a layer
    on this kind of CPU, 77 times in a ResNet20 v1 step. For the layer types in ``direct`` that
    bookkeeping changes nothing when the model is called eagerly on float32 torch tensors with an
    explicit ``training`` flag, no masks, no autocast scope, and the layer is built in float32
    with no activity regulariser, quantisation, rematerialisation or torch hooks. A functional
    model then runs a plan made once from its graph, in the graph's order, passing ``training``
    where the layer's ``call`` takes it. Any other call, layer or argument goes through Keras as
    before, so the model computes the same tensors (tests/test_torch_kernels.py).
    """
    import weakref

    try:
        from keras.src.backend import KerasTensor, get_autocast_scope, get_keras_mask
        from keras.src.backend.common.stateless_scope import in_stateless_scope
        from keras.src.models.functional import Functional
    except ImportError as error:
        warnings.warn(f"speed.fused_kernels: Keras {keras.__version__} is laid out differently "
                      f"({error}); layers are called through Keras as usual.", stacklevel=3)
        return

    keras_functional_call = Functional.call
    layers = keras.layers
    direct = tuple(getattr(layers, name) for name in (
        "Conv2D", "BatchNormalization", "Activation", "ReLU", "Add", "Concatenate", "Dense",
        "Flatten", "Dropout", "ZeroPadding2D", "AveragePooling2D", "MaxPooling2D",
        "GlobalAveragePooling2D") if hasattr(layers, name))
    plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    float32 = torch.float32

    def plain(layer) -> bool:
        return (layer.built
                and layer.dtype_policy.name == "float32"
                and layer.activity_regularizer is None
                and not getattr(layer, "_remat_mode", None)
                and getattr(layer, "quantization_mode", None) is None
                and not (layer._forward_hooks or layer._forward_pre_hooks
                         or layer._backward_hooks or layer._backward_pre_hooks))

    def make_plan(model):
        """[(layer, a direct type?, takes training?, single input id or arguments, output ids)],
        or None where the graph needs Keras' own walk (a node that cannot be computed)."""
        known = {id(x) for x in model.inputs}
        steps = []
        for depth in sorted(model._nodes_by_depth, reverse=True):
            for node in model._nodes_by_depth[depth]:
                if not node.operation or node.is_input:
                    continue
                if any(id(x) not in known for x in node.input_tensors):
                    return None
                layer = model._get_operation_for_node(node)
                # one tensor argument, and keyword arguments that change nothing: a None (the
                # mask=None Keras records for a batch norm is the default), or the training
                # flag Keras records for a dropout, which the model's own flag overrides
                arguments = node.arguments
                takes_training = "training" in getattr(layer, "_call_context_args", ())
                single = arguments.args[0] if (
                    len(arguments.args) == 1 and isinstance(arguments.args[0], KerasTensor)
                    and all(value is None or (key == "training" and takes_training)
                            for key, value in arguments.kwargs.items())) else None
                steps.append((layer, type(layer) in direct, takes_training,
                              id(single) if single is not None else arguments,
                              [id(x) for x in node.outputs]))
                known.update(id(x) for x in node.outputs)
        if any(id(x) not in known for x in model.outputs):
            return None
        return steps

    def run(model, steps, inputs, training):
        values = {id(x): y for x, y in zip(model.inputs, inputs, strict=False)}
        for layer, direct_type, takes_training, arguments, outputs in steps:
            if type(arguments) is int:
                args, kwargs = (values[arguments],), {}
            else:
                args, kwargs = arguments.fill_in(values)
            # the layer's state is checked on every call: a policy, a quantisation or a hook
            # can be set after the plan was made
            if direct_type and not kwargs and plain(layer) and all(
                    type(a) is torch.Tensor and a.dtype is float32
                    for a in (args[0] if isinstance(args[0], (list, tuple)) else args)):
                out = (layer.call(*args, training=training)
                       if takes_training and layer._call_has_training_arg else layer.call(*args))
            else:  # as Keras' own walk calls it: the model's training flag overrides the node's
                if takes_training:
                    kwargs = {**kwargs, "training": training}
                out = layer(*args, **kwargs)
            if len(outputs) == 1 and type(out) is torch.Tensor:
                values[outputs[0]] = out
            else:
                for key, value in zip(outputs, keras.tree.flatten(out), strict=False):
                    values[key] = value
        outs = [values[id(x)] for x in model.outputs]
        return keras.tree.pack_sequence_as(model._outputs_struct, outs)

    def functional_call(self, inputs, training=None, mask=None, **kwargs):
        if (training is None or mask is not None or kwargs or compiling()
                or in_stateless_scope() or get_autocast_scope() is not None):
            return keras_functional_call(self, inputs, training=training, mask=mask, **kwargs)
        if self not in plans:
            plans[self] = make_plan(self)
        steps = plans[self]
        flat = self._standardize_inputs(inputs)
        if steps is None or not all(type(x) is torch.Tensor and get_keras_mask(x) is None
                                    for x in flat):
            return keras_functional_call(self, inputs, training=training, mask=mask, **kwargs)
        return run(self, steps, flat, training)

    Functional.call = functional_call
