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
  torch's convolution, and asymmetric padding is done in that channels-last memory. An input
  whose memory is not NHWC (an augmented batch can be a strided view) is copied to it once:
  from a strided input torch picks its NCHW kernels, and every later layer then follows in
  that layout, which cost about a tenth of ResNet20 v1's step. Every other case goes to
  Keras' own code. In float32 training on a CPU the bias gradient is the sum of the output
  gradient (``BiasedConv``): torch's backward has oneDNN compute it with the kernel's
  gradient, which on an AVX2 CPU took a third of the backward pass of ResNet20 v1's
  16-channel layers. In bfloat16 oneDNN's own is the faster, by 0.2-0.4 ms a layer at batch
  128 on an AVX512-BF16 CPU (``benchmarks/conv_backward.py --dtype bfloat16``), and it is
  kept. Where a batch norm
  in training is the only reader of a convolution's output (in ResNet v1, every convolution
  but the shortcut projections), the bias is left out: the batch norm subtracts the batch
  mean, bias included, so its output is the same, its moving mean takes the bias back, and the
  bias gets its exact gradient, zero (Keras sums rounding noise there). That skips the bias
  gradient's pass and lets torch's convolution backward run without a Python node. All of a
  call's zero gradients come from one node, and the moving means take their biases in one
  foreach kernel. Under mixed_bfloat16 a kernel is cast straight into the channels-last
  layout torch's convolution reads, which saved a copy of it in each pass, and a functional
  model's kernels are cast together, in one autograd node (``CastKernels``).
- ``BatchNormalization.call`` in training: ``torch.native_batch_norm`` on the same view, one
  kernel forward and one backward. The moving averages are updated by Keras' own formula from
  the batch mean and the biased variance the kernel returns, so they match Keras exactly.
  Masks, renormalisation, synchronised BN and inference keep Keras' code.
- Functional models call their plain layers (convolutions, batch norms, activations, additions,
  poolings, dense and a few more) by ``call`` directly instead of through ``Layer.__call__``,
  whose bookkeeping cost ResNet20 v1 about 20 ms a step on a 2-core CPU at any batch size (a
  step at batch 128 takes about 400 ms there). Only where
  that bookkeeping has nothing to do: an eager call on torch tensors with an explicit
  training flag and no masks, to a layer without an activity regulariser, quantisation or
  torch hooks, whose dtype policy is float32 or mixed_bfloat16. Under mixed_bfloat16 the
  calls do what ``Layer.__call__`` and its autocast scope do: each floating-point input is
  cast to the layer's compute dtype, and a convolution's or a Dense layer's kernel and bias
  to bfloat16, while a batch norm keeps float32 statistics and weights (torch's kernel takes
  a bfloat16 input with float32 weights, as Keras' layer computes in float32) and the float32
  input layers and softmax head stay float32. Keras' own walk of a mixed model ran ResNet20
  v1 at 0.76 of PyTorch's bfloat16 autocast on a CPU with AVX512-BF16; this, at 0.96-1.00
  (docs/benchmarks.md). Between such layers a 4-D tensor stays in torch's NCHW
  view instead of being permuted to NHWC and back around every convolution and batch norm:
  ResNet20 v1's step records 80 fewer autograd nodes. The input layers (scaling,
  normalisation, flips and ``tasks.modeling.RandomShift``) and a nested functional model are
  called the same way (the nested model without its ``Layer.__call__`` where that call adds
  nothing), and the batch norms' moving averages are updated together at the end of
  the call (a handful of foreach kernels instead of six small kernels a layer). Each tensor is
  dropped after its last reader, and a batch norm's, a convolution's or a sum's output that one
  layer alone reads is overwritten by it (a ReLU in place, a residual sum into one addend), as
  a PyTorch block does. Everything else goes through Keras as before.
- The weights' L2 penalties (one per kernel in the book's nets) come from three foreach
  kernels instead of three dispatched ops each, and a scalar loss is not summed again. These
  and the changes above took about 4 ms off a ResNet20 v1 step at batch 2 on one thread of a
  2-core CPU (docs/benchmarks.md).
- ``compile(loss="sparse_categorical_crossentropy")`` on probabilities runs Keras' torch ops
  for that loss in Keras' order, without ``CompileLoss``, ``Loss.__call__`` and the reduction's
  wrappers: the same loss and gradients bit for bit, 0.5 ms less at batch 2. Sample weights,
  loss objects and other losses go through Keras.
- A seeded random draw (the augmentation layers' flips and shifts, three a step) seeds its
  torch generator from the ``SeedGenerator``'s state and advances it in place, as Keras does,
  without Keras' dozen small tensor ops and conversions around that: the same numbers.
- The training step lists the model's trainable weights once, where Keras' torch step walks
  every layer for them three times (about 0.4 ms a ResNet20 v1 step on this kind of CPU).
- Adam's and AdamW's update of float32 weights on a CPU runs in torch's fused Adam kernel, one
  pass over each weight instead of ten foreach ops, with epsilon rescaled so that the update is
  Keras' formula: about 3 ms less a step at batch 2 on one thread.

Under ``torch.compile`` (``speed.jit_compile: true``) all of these step aside and Keras' own code
is traced: Inductor fuses and lays out the graph itself, and the eager-mode kernels above trip
its stride analysis on the batch's dynamic shape.

Outputs and gradients equal Keras' to float32 rounding (tests/test_torch_kernels.py). The
replacement reaches into ``keras.src``; where that layout differs (another Keras release),
:func:`install` leaves Keras alone and says so.
"""

from __future__ import annotations

import warnings
import weakref

_installed = False
# the convolution whose bias gradient is a sum, once install() has defined it (the torch
# import waits for install); benchmarks/conv_backward.py times it against torch's own
BiasedConv = None


def _laid_out_differently(keras, error, consequence: str) -> None:
    """Warn that one part of the fused kernels stays off for this Keras version."""
    warnings.warn(f"speed.fused_kernels: Keras {keras.__version__} is laid out differently "
                  f"({error}); {consequence}", stacklevel=4)


def install() -> bool:
    """Replace Keras' torch conv and training-mode batch norm; True if they are in place now."""
    global _installed, BiasedConv
    if _installed:
        return True
    import keras

    if keras.backend.backend() != "torch":
        return False
    try:
        from keras.src.backend import standardize_data_format
        from keras.src.backend.common.stateless_scope import in_stateless_scope
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

    def value_of(variable):
        """A variable's tensor, as ``variable.value`` gives it outside stateless and autocast
        scopes (where the direct calls and the moving-average flush run), without its checks."""
        value = getattr(variable, "_value", None)
        return variable.value if value is None else value

    storage_users = getattr(torch._C, "_storage_Use_Count", None)
    # zero-bordered buffers for the asymmetric "same" padding in training, by
    # (shape, dtype, device, top, left): at most KEPT_SHAPES shapes, two buffers each
    kept_pads: dict = {}
    KEPT_SHAPES = 8

    def users(tensor) -> int:
        return storage_users(tensor.untyped_storage()._cdata)

    unshared = users(torch.empty(1)) if storage_users is not None else None

    class IntoPadded(torch.autograd.Function):
        """Copy ``x`` into the inside of ``buffer``, whose border is zero; the gradient is the
        inside of the output's gradient, as for ``torch.nn.functional.pad``."""

        @staticmethod
        def forward(ctx, x, buffer, top, left):
            ctx.box = (top, top + x.shape[2], left, left + x.shape[3])
            buffer[:, :, ctx.box[0]:ctx.box[1], ctx.box[2]:ctx.box[3]].copy_(x)
            ctx.mark_dirty(buffer)
            return buffer

        @staticmethod
        def backward(ctx, grad):
            top, bottom, left, right = ctx.box
            return grad[:, :, top:bottom, left:right], None, None, None

    def pad(x, left, right, top, bottom):
        """``x`` (NCHW view, channels-last memory) with zeros around it, channels-last.

        ``torch.nn.functional.pad`` fills a fresh tensor, and for a batch of 128 at 32x32 the
        allocator hands it fresh pages from the kernel every step: about 2.3 ms of page faults
        for 9 MB. In training (the only place this is on the hot path) the padded copy goes
        into a buffer kept from an earlier step whose border is still zero, provided nothing
        else holds that buffer's memory: a graph not yet run backward keeps its own, and a
        new one is made."""
        n, c, h, w = x.shape
        shape = (n, c, h + top + bottom, w + left + right)
        if not (unshared is not None and x.requires_grad and torch.is_grad_enabled()
                and x.layout is torch.strided):
            return torch.nn.functional.pad(x, (left, right, top, bottom)).contiguous(
                memory_format=torch.channels_last)
        key = (shape, x.dtype, x.device, top, left)
        buffers = kept_pads.get(key)
        if buffers is None:
            if len(kept_pads) >= KEPT_SHAPES:
                kept_pads.pop(next(iter(kept_pads)))
            buffers = kept_pads[key] = []
        buffer = next((b for b in buffers if users(b) == unshared), None)
        if buffer is None:
            buffer = x.new_zeros(shape).contiguous(memory_format=torch.channels_last)
            if len(buffers) < 2:
                buffers.append(buffer)
        return IntoPadded.apply(x, buffer.detach(), top, left)

    class BiasedConv(torch.autograd.Function):
        """``conv2d(x, kernel, bias)`` whose bias gradient is the output gradient's sum.

        On a CPU, torch's convolution backward asks oneDNN for the bias gradient along with
        the kernel's, and in float32 on an AVX2 CPU that fused reduction was slow: at batch
        128, for a 16-channel 3x3 layer at 32x32, the backward took 12.0 ms with it and 8.0 ms
        without, where summing the 8 MB output gradient takes 0.3 ms (docs/benchmarks.md).
        The forward pass is torch's own, bias fused; the backward asks for the input and
        kernel gradients alone. Used for float32 only: in bfloat16 oneDNN's fused reduction
        is the faster (``benchmarks/conv_backward.py --dtype bfloat16``)."""

        @staticmethod
        def forward(ctx, x, kernel, bias, stride, padding, dilation, groups):
            ctx.save_for_backward(x, kernel)
            ctx.geometry = (stride, padding, dilation, groups)
            return torch.nn.functional.conv2d(x, kernel, bias, stride, padding, dilation,
                                              groups)

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad):
            x, kernel = ctx.saved_tensors
            stride, padding, dilation, groups = ctx.geometry
            wants_x, wants_kernel, wants_bias = ctx.needs_input_grad[:3]
            grad_x = grad_kernel = grad_bias = None
            if wants_x or wants_kernel:
                grad_x, grad_kernel, _ = torch.ops.aten.convolution_backward(
                    grad, x, kernel, None, stride, padding, dilation, False, (0, 0), groups,
                    (wants_x, wants_kernel, False))
            if wants_bias:
                grad_bias = channel_sums(grad)
            return grad_x, grad_kernel, grad_bias, None, None, None, None

    def channel_sums(grad):
        """``grad.sum((0, 2, 3))``. Of a channels-last tensor, as the sum over each image's
        pixels and then over the batch: torch reduces the (0, 2, 3) dimensions of that layout
        with the channels alone as its inner loop, 2.5 times slower at 16 channels (0.76
        against 0.31 ms for a 128 x 16 x 32 x 32 gradient; docs/benchmarks.md)."""
        if grad.dim() == 4 and grad.is_contiguous(memory_format=torch.channels_last):
            n, c = grad.shape[:2]
            return grad.permute(0, 2, 3, 1).reshape(n, -1, c).sum(1).sum(0)
        return grad.sum((0, 2, 3))

    def conv2d_nchw(x, kernel, bias, strides, padding, dilation_rate, oihw=False):
        """A 2-D convolution of ``x``, an NCHW view in channels-last memory, by a Keras HWIO
        ``kernel`` (or, ``oihw``, one already permuted to torch's OIHW), the bias fused;
        TensorFlow's asymmetric "same" is padded first. On a CPU, in float32 training, the
        bias gradient is a sum (:class:`BiasedConv`)."""
        if not oihw:
            kernel = kernel.permute(3, 2, 0, 1)  # HWIO -> OIHW
        pads = [(0, 0), (0, 0)]
        if padding == "same":
            pads = [compute_padding(x.shape[2 + i], kernel.shape[2 + i], strides[i],
                                    dilation_rate[i]) for i in (0, 1)]
        (top, bottom), (left, right) = pads
        if top != bottom or left != right:  # the odd pixel at the bottom/right
            x = pad(x, left, right, top, bottom)
            top = left = 0
        groups = x.shape[1] // kernel.shape[1]
        # (under torch.autocast the forward would run in another dtype than it saves; Keras'
        # mixed precision casts the tensors instead, and takes this path)
        if (bias is not None and bias.requires_grad and x.device.type == "cpu"
                and x.dtype is torch.float32 and torch.is_grad_enabled()
                and not torch.is_autocast_enabled("cpu")):
            return BiasedConv.apply(x, kernel, bias, tuple(strides), (top, left),
                                    tuple(dilation_rate), groups)
        return torch.nn.functional.conv2d(x, kernel, bias, stride=strides, padding=(top, left),
                                          dilation=dilation_rate, groups=groups)

    def conv2d(inputs, kernel, bias, strides, padding, dilation_rate):
        """A channels-last 2-D convolution in torch's channels-last kernels, bias fused."""
        # an NCHW view of NHWC memory, which is torch's channels-last format: no copy. A batch
        # with other strides (flipped, transposed) is copied once here; left as it is, torch
        # would choose its NCHW kernels and every later layer would follow in that slower layout
        x = to_tensor(inputs).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        y = conv2d_nchw(x, to_tensor(kernel), None if bias is None else to_tensor(bias),
                        standardize(strides, 2, "strides"),
                        padding, standardize(dilation_rate, 2, "dilation_rate"))
        return y.permute(0, 2, 3, 1)

    def batch_norm_nchw(layer, x, gamma, beta, moving=None, shift=None):
        """Training-mode batch norm of an NCHW ``x`` in torch's one kernel; the moving averages
        follow Keras' formula with the batch's biased variance, now or, given ``moving``
        (a :class:`MovingAverages`), when it is flushed.

        ``shift`` (with ``moving`` only), a convolution's bias that was left out of ``x``, is
        what the batch norm of ``x + shift`` computes: the same output, since the batch mean
        takes the bias with it, and a batch mean larger by ``shift``, which the moving mean
        takes when it is flushed. The bias's gradient is exactly zero (Keras sums rounding
        noise there: the batch norm's input gradient sums to zero over each channel); the
        caller gives it, one node for all of a call's biases (``ZeroGradients``). That saves
        the bias gradient's pass over the convolution's output gradient, and lets torch's own
        convolution backward run."""
        y, mean, inverse_std = torch.native_batch_norm(
            x, gamma, beta, None, None, True, 0.0, layer.epsilon)
        if moving is not None:
            moving.add(layer, mean, inverse_std, shift)
            return y
        with torch.no_grad():
            variance = inverse_std.pow(-2).sub_(layer.epsilon)
            momentum = layer.momentum
            for moving_, batch in ((layer.moving_mean, mean), (layer.moving_variance, variance)):
                if in_stateless_scope():  # the scope collects the new value
                    moving_.assign(moving_.value * momentum + batch * (1.0 - momentum))
                else:  # in place, as Keras' own assign copies into the variable
                    moving_.value.mul_(momentum).add_(batch, alpha=1.0 - momentum)
        return y

    class MovingAverages:
        """The moving-average updates of one forward pass's batch norms, applied together at its
        end: five foreach kernels in all instead of six small kernels a layer. Used only outside
        a stateless scope, where Keras' ``assign`` copies into the variables in place."""

        __slots__ = ("layers", "means", "inverse_stds", "ids", "shifted", "shifts")

        def __init__(self):
            self.layers, self.means, self.inverse_stds, self.ids = [], [], [], set()
            self.shifted, self.shifts = [], []  # means (by index) of inputs left without a bias

        def add(self, layer, mean, inverse_std, shift=None):
            """``shift``: a bias left out of the batch norm's input, which its batch mean
            takes back before the moving mean does (:func:`batch_norm_nchw`)."""
            if id(layer) in self.ids:  # a shared layer: its first update goes in first
                self.flush()
            self.ids.add(id(layer))
            if shift is not None:
                self.shifted.append(len(self.means))
                self.shifts.append(shift.detach())
            self.layers.append(layer)
            self.means.append(mean)
            self.inverse_stds.append(inverse_std)

        def holds(self, layer) -> bool:
            return id(layer) in self.ids

        def flush(self):
            layers = self.layers
            if not layers:
                return
            # one 0-dim tensor where every layer has the same epsilon (momentum): torch wraps
            # a Python number in a tensor for each list element, which took four times as long
            epsilons = [float(layer.epsilon) for layer in layers]
            momenta = [float(layer.momentum) for layer in layers] * 2
            with torch.no_grad():
                if self.shifted:  # mean + bias, as before the bias was left out; one kernel
                    shifted = torch._foreach_add([self.means[i] for i in self.shifted],
                                                 self.shifts)
                    for index, mean in zip(self.shifted, shifted, strict=True):
                        self.means[index] = mean
                variances = torch._foreach_pow(self.inverse_stds, -2.0)
                if epsilons.count(epsilons[0]) == len(epsilons):  # x + (-e) is x - e exactly
                    torch._foreach_add_(variances, torch.tensor(-epsilons[0]))
                else:
                    torch._foreach_sub_(variances, epsilons)
                movings = ([value_of(layer.moving_mean) for layer in layers]
                           + [value_of(layer.moving_variance) for layer in layers])
                batch = [*self.means, *variances]
                # Keras' formula and rounding: moving * momentum + batch * (1 - momentum)
                if momenta.count(momenta[0]) == len(momenta):
                    torch._foreach_mul_(movings, torch.tensor(momenta[0]))
                    batch = torch._foreach_mul(batch, torch.tensor(1.0 - momenta[0]))
                else:
                    torch._foreach_mul_(movings, momenta)
                    batch = torch._foreach_mul(batch, [1.0 - momentum for momentum in momenta])
                torch._foreach_add_(movings, batch)
            self.__init__()

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
        y = batch_norm_nchw(self, to_tensor(inputs).float().permute(0, 3, 1, 2),
                            self.gamma.value.float() if self.scale else None,
                            self.beta.value.float() if self.center else None)
        return keras.ops.cast(y.permute(0, 2, 3, 1), self.compute_dtype)

    torch_nn.conv = conv
    BaseConv.call = conv_call
    BatchNormalization.call = call
    _install_direct_calls(keras, torch, compiling, keras_conv_op, conv2d_nchw,
                          batch_norm_nchw, MovingAverages, value_of)
    # a model's trainable weights during its training step, listed once for the step
    step_weights: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    _install_loss_terms(keras, torch, compiling, in_stateless_scope, value_of, step_weights)
    _install_loss_walks(keras, compiling)
    _install_fused_adam(keras, torch, compiling, value_of)
    _install_train_step(keras, torch, compiling, in_stateless_scope, value_of, step_weights)
    _install_seed_draws(keras, torch, compiling, in_stateless_scope)
    _installed = True
    return True


def _install_direct_calls(keras, torch, compiling, keras_conv_op, conv2d_nchw,
                          batch_norm_nchw, MovingAverages, value_of) -> None:
    """Run a functional model's plain layers without ``Layer.__call__``, in torch's layout.

    ``Layer.__call__`` converts arguments, resolves the training flag and masks, opens name and
    autocast scopes and goes through ``torch.nn.Module.__call__``: about 0.1 to 0.2 ms a layer
    on this kind of CPU, 77 times in a ResNet20 v1 step. For the layer types below that
    bookkeeping changes nothing when the model is called eagerly on torch tensors with an
    explicit ``training`` flag and no masks, and the layer is built with a float32 or
    mixed_bfloat16 policy and no activity regulariser, quantisation, rematerialisation or torch
    hooks: a handler casts what ``Layer.__call__`` and its autocast scope would cast (the
    inputs to the layer's compute dtype, a mixed layer's kernel and bias to bfloat16). A
    functional model then runs a plan made once from its graph, in the graph's order.

    In that plan a 4-D tensor between convolutions, batch norms, ReLUs, additions,
    concatenations, paddings and poolings stays in torch's own NCHW view (channels-last
    memory), and is permuted to Keras' NHWC only where another layer or the model's output needs
    it: each permutation is an autograd node, and the per-layer permutations made a third of a
    ResNet20 v1 step's nodes. Moving averages are updated in place, as Keras' ``assign`` does.
    A tensor that only one layer reads, made in this call by a batch norm in training, a
    convolution without its own ReLU or an addition (ops whose backward does not read their
    output), is overwritten by that layer where it is a ReLU or an addition, instead of a new
    tensor being made; autograd's version counters would reject any overwrite the backward
    pass needed. Any other call, layer or argument goes through Keras as before, so the model computes the
    same tensors (tests/test_torch_kernels.py).
    """
    import collections
    import math

    try:
        from keras.src.backend import KerasTensor, get_autocast_scope, get_keras_mask
        from keras.src.backend.common.stateless_scope import in_stateless_scope
        from keras.src.distribution import distribution_lib
        from keras.src.layers.layer import Layer
        from keras.src.models.functional import Functional
    except ImportError as error:
        _laid_out_differently(keras, error, "layers are called through Keras as usual.")
        return

    keras_functional_call = Functional.call
    layer_call = Layer.__call__
    dense_call, softmax = keras.layers.Dense.call, keras.activations.softmax
    tensor_type = torch.Tensor
    tensor_types = (torch.Tensor, torch.nn.Parameter)
    policy_type = type(keras.dtype_policies.get("float32"))
    functional = torch.nn.functional
    layers = keras.layers
    linear, relu_function = keras.activations.linear, keras.activations.relu
    channels_last, contiguous = torch.channels_last, torch.contiguous_format
    float32 = torch.float32
    plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    class Frame:
        """One call's tensors, each in Keras' NHWC, in torch's NCHW (channels-last memory), or
        both; a form is made from the other when a layer first asks for it."""

        __slots__ = ("nhwc_", "nchw_", "moving", "spare", "fresh", "shifts", "absorb",
                     "zeroed", "anchor", "steps", "kernels")

        def __init__(self, steps=()):
            self.nhwc_, self.nchw_ = {}, {}
            self.moving = MovingAverages()  # the batch norms' updates, applied at the end
            # the tensors the running layer may overwrite: made in this call by an op whose
            # backward does not read its output, and read by no other layer
            self.spare = set()
            self.fresh = False  # set by a handler whose output may be overwritten later
            # convolution outputs made without their bias, which a batch norm in training
            # cancels (:func:`batch_norm`): key -> the bias, added here for any other reader
            self.shifts = {}
            self.absorb = None  # the running step's output key, where a conv may do that
            # the biases whose batch norms cancelled them, waiting for their zero gradient,
            # and whether the running step is the batch norm that gives it (:func:`batch_norm`)
            self.zeroed, self.anchor = [], False
            # the plan's steps, and its convolutions' kernels cast for mixed precision, by
            # id(layer): cast together at the first convolution that asks (:func:`cast_kernel`)
            self.steps, self.kernels = steps, None

        def overwritable(self, key, tensor) -> bool:
            return key in self.spare and tensor._base is None

        def settle(self, key):
            """Add a convolution's bias that was left out, for a reader that needs it."""
            bias = self.shifts.pop(key, None)
            if bias is not None:
                tensor = self.nchw_[key]
                self.nchw_[key] = tensor + bias.to(tensor.dtype).view(1, -1, 1, 1)
                self.nhwc_.pop(key, None)

        def either(self, key):
            """(tensor, is it NCHW?) in whichever form there is: for element-wise layers."""
            if self.shifts:
                self.settle(key)
            tensor = self.nchw_.get(key)
            return (tensor, True) if tensor is not None else (self.nhwc_[key], False)

        def nhwc(self, key):
            if self.shifts:
                self.settle(key)
            tensor = self.nhwc_.get(key)
            if tensor is None:
                tensor = self.nhwc_[key] = self.nchw_[key].permute(0, 2, 3, 1)
            return tensor

        def nchw(self, key):
            """The NCHW form of a 4-D tensor, None for any other rank."""
            if self.shifts:
                self.settle(key)
            tensor = self.nchw_.get(key)
            if tensor is None:
                tensor = self.nhwc_[key]
                if tensor.ndim != 4:
                    return None
                # a batch with other strides (flipped, cropped) is copied once here: left as
                # it is, torch would pick its slower NCHW kernels for every later layer
                tensor = self.nchw_[key] = tensor.permute(0, 3, 1, 2).contiguous(
                    memory_format=channels_last)
            return tensor

    class ZeroGradients(torch.autograd.Function):
        """``tensor``, copied, in a node that gives each of ``biases`` a gradient of zero.

        A convolution's bias that a training batch norm cancels is left out of the
        convolution (:func:`conv`), and its gradient is exactly zero: Keras' own graph sums
        rounding noise there. One node for all of a call's such biases keeps them in the
        graph, as ``torch.autograd.grad`` and the optimizer expect, where an addition of
        ``0 * bias`` at each batch norm cost two ops forward and two backward a layer."""

        @staticmethod
        def forward(ctx, tensor, *biases):
            ctx.biases = [(bias.shape, bias.dtype, bias.device) for bias in biases]
            return tensor.clone()

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad):
            return grad, *(torch.zeros(shape, dtype=dtype, device=device)
                           for shape, dtype, device in ctx.biases)

    class CastKernels(torch.autograd.Function):
        """Keras HWIO kernels as torch's OIHW in channels-last memory and ``dtype``, all in one
        node of the graph: a permutation and a cast each, as Keras' autocast scope casts a mixed
        layer's kernel, where each kernel's own ``permute`` and ``to`` recorded two nodes
        (about 24 us a convolution on this kind of CPU, ResNet20 v1 has 21). The backward
        is theirs: each gradient cast back to the kernel's dtype and permuted back, written
        in the kernel's own (contiguous) layout in the same copy, so that torch stores it as
        the kernel's gradient as it is; a permuted view would be copied once more there."""

        @staticmethod
        def forward(ctx, dtype, *kernels):
            ctx.set_materialize_grads(False)  # a kernel its convolution did not read: None
            ctx.dtypes = [kernel.dtype for kernel in kernels]
            return tuple(kernel.permute(3, 2, 0, 1).to(dtype=dtype, memory_format=channels_last)
                         for kernel in kernels)

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, *grads):
            return None, *(
                None if grad is None
                else grad.permute(2, 3, 1, 0).to(dtype=dtype, memory_format=contiguous)
                for grad, dtype in zip(grads, ctx.dtypes, strict=True))

    def cast_kernel(layer, frame, dtype):
        """``layer``'s kernel in torch's OIHW, channels-last and ``dtype``. The first call of a
        forward pass casts the float32 kernels of all the plan's convolutions that compute in
        ``dtype`` (:class:`CastKernels`); a kernel outside that set is cast alone."""
        kernels = frame.kernels
        if kernels is None:
            chosen = {id(step[0]): value_of(step[0].kernel) for step in frame.steps
                      if step[1] is conv and compute_dtype(step[0], conv) is dtype}
            chosen = {key: value for key, value in chosen.items()
                      if type(value) in tensor_types and value.dtype is float32 and value.ndim == 4}
            kernels = frame.kernels = (dict(zip(chosen, CastKernels.apply(dtype, *chosen.values()),
                                                strict=True)) if chosen else {})
        kernel = kernels.get(id(layer))
        if kernel is None or kernel.dtype is not dtype:
            kernel = value_of(layer.kernel).permute(3, 2, 0, 1).to(
                dtype=dtype, memory_format=channels_last)
        return kernel

    # Each handler returns (output, is it NCHW?), or None where its case is not covered; the
    # layer's own call then runs on NHWC tensors.
    def conv(layer, frame, keys, training):
        activation = layer.activation
        if activation is not linear and activation is not relu_function:
            return None
        x = frame.nchw(keys[0])
        if x is None:
            return None
        bias = value_of(layer.bias) if layer.use_bias else None
        if bias is not None and frame.absorb is not None and training and activation is linear:
            # read by a batch norm alone: in training it subtracts the batch mean, bias and
            # all, so the bias is left out here and given to the batch norm (batch_norm_nchw)
            frame.shifts[frame.absorb] = bias
            bias = None
        if x.dtype is not float32:  # mixed precision: the weights cast as Keras' scope casts,
            # the kernel into the channels-last layout torch's kernels read it in: a cast
            # that kept the permuted strides was copied again in each pass, forward and back
            kernel = cast_kernel(layer, frame, x.dtype)
            bias = None if bias is None else bias.to(x.dtype)
        else:
            kernel = value_of(layer.kernel).permute(3, 2, 0, 1)  # HWIO -> OIHW, a view
        y = conv2d_nchw(x, kernel, bias, layer.strides, layer.padding, layer.dilation_rate,
                        oihw=True)
        frame.fresh = activation is linear  # a ReLU's backward reads its output
        return (torch.relu_(y) if activation is relu_function else y), True

    def batch_norm(layer, frame, keys, training):
        shift = None
        if frame.shifts and training and layer.trainable:
            shift = frame.shifts.pop(keys[0], None)  # a convolution's bias, left out
        x = frame.nchw(keys[0])
        if x is None:
            return None
        gamma = value_of(layer.gamma) if layer.scale else None
        beta = value_of(layer.beta) if layer.center else None
        if training and layer.trainable:
            frame.fresh = True  # its backward reads its input and statistics only
            if shift is not None:
                frame.zeroed.append(shift)
            if frame.anchor and frame.zeroed:
                # the last batch norm to cancel a bias: its beta carries every cancelled
                # bias's gradient, zero, in one node of the graph
                beta = ZeroGradients.apply(
                    x.new_zeros(x.shape[1], dtype=float32) if beta is None else beta,
                    *frame.zeroed)
                frame.zeroed = []
            return batch_norm_nchw(layer, x, gamma, beta, frame.moving, shift), True
        if frame.moving.holds(layer):  # a shared layer, in training earlier in this call
            frame.moving.flush()
        # inference: Keras' torch batch_normalization, per channel of the NCHW view, in
        # float32 and cast back to a bfloat16 input's dtype, as Keras' layer computes it
        dtype = x.dtype
        scale = value_of(layer.moving_variance).add(layer.epsilon).rsqrt_()
        if gamma is not None:
            scale = scale.mul(gamma)
        y = x.to(float32).subtract(value_of(layer.moving_mean).view(1, -1, 1, 1)).mul_(
            scale.view(1, -1, 1, 1))
        y = y if beta is None else y.add_(beta.view(1, -1, 1, 1))
        return (y if dtype is float32 else y.to(dtype)), True

    def relu(layer, frame, keys, training):
        if isinstance(layer, layers.ReLU):
            if layer.negative_slope or layer.threshold or layer.max_value is not None:
                return None
        elif layer.activation is not relu_function:
            return None
        x, planar = frame.either(keys[0])
        return (torch.relu_(x) if frame.overwritable(keys[0], x) else torch.relu(x)), planar

    def add(layer, frame, keys, training):
        planar = any(frame.either(key)[1] for key in keys)
        tensors = [frame.nchw(key) if planar else frame.nhwc(key) for key in keys]
        if planar and any(t is None or t.shape != tensors[0].shape for t in tensors):
            return None  # a broadcast: Keras' layout decides it
        frame.fresh = len(tensors) > 1
        # the sum goes into an addend that no other layer reads (a batch norm's output in a
        # residual block), as a PyTorch block's ``out += shortcut`` does
        shape = tensors[0].shape  # torch.broadcast_shapes is Python: ask it only if needed
        if any(t.shape != shape for t in tensors):
            shape = torch.broadcast_shapes(*(t.shape for t in tensors))
        first = next((index for index, key in enumerate(keys)
                      if frame.overwritable(key, tensors[index])
                      and tensors[index].shape == shape), None)
        if first is None:
            y = tensors[0]
            for tensor in tensors[1:]:
                y = torch.add(y, tensor)
            return y, planar
        y = tensors[first]
        for index, tensor in enumerate(tensors):
            if index != first:
                y = y.add_(tensor)
        return y, planar

    def concatenate(layer, frame, keys, training):
        tensors = [frame.nchw(key) for key in keys]
        if layer.axis not in (-1, 3) or any(t is None for t in tensors):
            return None
        return torch.cat(tensors, dim=1), True

    def pool(layer, frame, keys, training):
        x = frame.nchw(keys[0])
        if x is None or layer.data_format != "channels_last" or layer.padding != "valid":
            return None
        pooling = (functional.max_pool2d if isinstance(layer, layers.MaxPooling2D)
                   else functional.avg_pool2d)
        return pooling(x, layer.pool_size, layer.strides), True

    def zero_pad(layer, frame, keys, training):
        x = frame.nchw(keys[0])
        if x is None or layer.data_format != "channels_last":
            return None
        (top, bottom), (left, right) = layer.padding
        return functional.pad(x, (left, right, top, bottom)).contiguous(
            memory_format=channels_last), True

    def global_average(layer, frame, keys, training):
        x, planar = frame.either(keys[0])  # an NHWC input is averaged in Keras' layout
        if not planar or layer.data_format != "channels_last" or layer.keepdims:
            return None
        if x.dtype is not float32:  # Keras' mean: in float32, then cast back
            return x.mean((2, 3), dtype=float32).to(x.dtype), False
        return x.mean((2, 3)), False

    def keras_layout(layer, frame, keys, training):
        return None

    def nested(layer, frame, keys, training):
        """A functional model inside this one (the net inside the training model), called as
        ``Layer.__call__`` calls it where that call adds nothing: one tensor without a mask, no
        mask support, no distribution, and an autocast scope that the call would keep as it is
        (about 0.3 ms a step). A functional model converts no inputs in ``Layer.__call__``, so
        the tensor goes in as it is. Its own call then runs its plan."""
        if (len(keys) != 1 or type(layer).__call__ is not layer_call or layer.supports_masking
                or distribution_lib.distribution() is not None):
            return None
        scope = get_autocast_scope()
        if scope is None:
            if layer.compute_dtype != layer.variable_dtype:
                return None
        elif not layer.autocast or scope.dtype != layer.compute_dtype:
            return None
        x = frame.nhwc(keys[0])
        if get_keras_mask(x) is not None:
            return None
        if not layer._called:  # as Layer.__call__ marks it (a tracked attribute: set once)
            layer._called = True
        return functional_call(layer, x, training=training), False

    def whole_pixel_shift(layer, frame, keys, training):
        """RandomShift by whole pixels (the pad-and-crop): the layer's own draws, then one
        row gather. Its matrix products move each pixel once with weight 1, so the gather gives
        the same values; it is about twice as fast for a CIFAR batch."""
        if not training or layer.interpolation != "whole_pixels":
            return None
        x = frame.nhwc(keys[0])
        if x.ndim != 4:
            return None
        n, height, width, channels = x.shape
        steps = [layer._draw(n, largest).to(torch.int64)
                 for largest in (layer.max_rows, layer.max_cols)]
        # output pixel (i, j) takes input pixel (i - dy, j - dx)
        rows = torch.arange(height, device=x.device)[None, :] - steps[0][:, None]
        cols = torch.arange(width, device=x.device)[None, :] - steps[1][:, None]
        if layer.fill == "nearest":
            rows, cols = rows.clamp_(0, height - 1), cols.clamp_(0, width - 1)
        else:  # zero: read from a zero-bordered copy, wide enough for the largest draw
            top, left = int(round(layer.max_rows)), int(round(layer.max_cols))
            x = functional.pad(x, (0, 0, left, left, top, top))
            rows, cols = rows + top, cols + left
            height, width = height + 2 * top, width + 2 * left
        index = (torch.arange(n, device=x.device)[:, None, None] * (height * width)
                 + rows[:, :, None] * width + cols[:, None, :])
        return x.reshape(-1, channels).index_select(0, index.view(-1)).view(
            n, rows.shape[1], cols.shape[1], channels), False

    def rescaling(layer, frame, keys, training):
        """``cast(x) * scale + offset`` as Keras' op computes it, with a number for each, on
        float32 or integer input (raw pixels, which Layer.__call__ passes unconverted); the
        addition of a zero offset is skipped where it cannot change a bit (a positive scale
        of unsigned pixels)."""
        scale, offset = layer.scale, layer.offset
        if type(scale) not in (float, int) or type(offset) not in (float, int):
            return None
        x = frame.nhwc(keys[0])
        scale_ = torch.tensor(scale, dtype=float32)
        y = x.to(float32).mul_(scale_) if x.dtype is not float32 else torch.mul(x, scale_)
        if offset != 0 or scale < 0 or x.dtype.is_floating_point:
            y = y.add_(torch.tensor(offset, dtype=float32))
        frame.fresh = not y.requires_grad
        return y, False

    # Normalization's divisor, max(sqrt(variance), epsilon), made once per variance tensor
    divisors: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def normalization(layer, frame, keys, training):
        """``(x - mean) / max(sqrt(variance), epsilon)``, Keras' ops in Keras' order; the
        divisor is kept while the variance tensor is unchanged (its version counter)."""
        mean, variance = layer.mean, layer.variance
        if (layer.invert or type(mean) is not torch.Tensor or type(variance) is not torch.Tensor
                or mean.dtype is not float32 or variance.dtype is not float32):
            return None
        epsilon = keras.config.epsilon()
        kept = divisors.get(layer)
        if kept is None or kept[0] is not variance or kept[1] != (variance._version, epsilon):
            divisor = torch.maximum(torch.sqrt(variance), torch.tensor(epsilon, dtype=float32))
            kept = divisors[layer] = (variance, (variance._version, epsilon), divisor)
        x = frame.nhwc(keys[0])
        y = (x.sub_(mean) if frame.overwritable(keys[0], x) and not x.requires_grad
             and x.shape == torch.broadcast_shapes(x.shape, mean.shape)
             else torch.sub(x, mean))
        frame.fresh = not y.requires_grad
        return y.div_(kept[2]), False

    def flip(layer, frame, keys, training):
        """RandomFlip in training: the layer's own draws, then Keras' ``where(flips,
        flip(x), x)`` on the batch, without Keras' call around it."""
        if not training or layer.data_format != "channels_last" or layer.mode not in (
                "horizontal", "vertical"):
            return None
        x = frame.nhwc(keys[0])
        if x.ndim != 4:
            return None
        flips = layer.get_random_transformation(x, training=True)["flips"]
        return torch.where(flips, x.flip(2 if layer.mode == "horizontal" else 1), x), False

    def dense(layer, frame, keys, training):
        """Dense on a 2-D float32 batch: Keras' matmul, bias addition and linear or softmax
        activation as its torch ops compute them."""
        activation = layer.activation
        if (layer.lora_enabled or (activation is not linear and activation is not softmax)
                or type(layer).call is not dense_call):
            return None
        x = frame.nhwc(keys[0])
        if x.ndim != 2:
            return None
        kernel = value_of(layer.kernel)
        bias = None if layer.bias is None else value_of(layer.bias)
        if x.dtype is not float32:  # mixed precision: the weights cast as Keras' scope casts
            kernel = kernel.to(x.dtype)
            bias = None if bias is None else bias.to(x.dtype)
        y = torch.matmul(x, kernel)
        if bias is not None:
            y = torch.add(y, bias)
        if activation is softmax:
            logits, y = y, torch.softmax(y, dim=-1)
            y._keras_logits = logits  # as keras.activations.softmax leaves it
        return y, False

    def flatten(layer, frame, keys, training):
        if layer.data_format != "channels_last":
            return None
        x = frame.nhwc(keys[0])
        return x.reshape(x.shape[0], math.prod(x.shape[1:])), False

    handlers = {getattr(layers, name): handler for name, handler in (
        ("Conv2D", conv), ("BatchNormalization", batch_norm), ("Activation", relu),
        ("ReLU", relu), ("Add", add), ("Concatenate", concatenate),
        ("AveragePooling2D", pool), ("MaxPooling2D", pool), ("ZeroPadding2D", zero_pad),
        ("GlobalAveragePooling2D", global_average), ("Dense", dense),
        ("Flatten", flatten), ("Dropout", keras_layout), ("Rescaling", rescaling),
        ("Normalization", normalization), ("RandomFlip", flip)) if hasattr(layers, name)}
    # a nested functional model (a net inside the training model) runs its own plan
    handlers[Functional] = nested
    try:  # the train stage's shift and crop (tasks/modeling.py)
        from tasks.modeling import RandomShift
    except ImportError:
        pass
    else:
        handlers[RandomShift] = whole_pixel_shift

    def handler_for(layer):
        handler = handlers.get(type(layer))
        if handler is conv and (layer.rank != 2 or layer.data_format != "channels_last"
                                or type(layer).convolution_op is not keras_conv_op):
            return keras_layout
        if handler is batch_norm and (layer.axis not in (-1, 3) or layer.renorm
                                      or layer.synchronized):
            return keras_layout
        if isinstance(layer, Functional) and not isinstance(layer._outputs_struct, KerasTensor):
            return None  # several outputs: Keras' walk stores them
        return handler

    # the handlers that also run a layer computing in bfloat16 (Keras' mixed_bfloat16 policy):
    # they cast its kernel and bias to bfloat16, as Keras' autocast scope does, and leave a
    # batch norm's statistics float32, as Keras' BatchNormalization does
    bfloat16_handlers = {conv, batch_norm, relu, add, concatenate, pool, zero_pad,
                         global_average, dense, flatten, keras_layout, nested}
    compute_dtypes = {"float32": float32, "mixed_bfloat16": torch.bfloat16}

    def compute_dtype(layer, handler):
        """The torch dtype ``layer`` computes in, where its direct call covers its state (a
        float32 layer, or a mixed_bfloat16 one that casts its weights and a handler that
        runs it), else None."""
        policy = layer._dtype_policy
        # a plain DTypePolicy has no quantisation: its property need not be asked
        name = (policy.name if type(policy) is policy_type
                else layer.dtype_policy.name
                if getattr(layer, "quantization_mode", None) is None else None)
        dtype = compute_dtypes.get(name)
        if dtype is None or (dtype is not float32 and (
                not layer.autocast or handler not in bfloat16_handlers)):
            return None
        if (not layer.built or layer.activity_regularizer is not None
                or getattr(layer, "_remat_mode", None)
                or layer._forward_hooks or layer._forward_pre_hooks
                or layer._backward_hooks or layer._backward_pre_hooks):
            return None
        return dtype

    def inputs_fit(layer, frame, keys, integers, dtype, readers) -> bool:
        """Every input a torch tensor of ``dtype`` (for ``integers``, an integer one may stay).

        A floating-point input of another dtype is cast to ``dtype``, as ``Layer.__call__``
        casts it, where every layer that reads it would cast it so (``readers``, for each key:
        the layers that read it, None for a model output): the cast replaces it in the frame.
        A mixed model's input, which Keras makes float32, is cast once for all its readers.
        Any other goes through Keras."""
        for key, readers_ in zip(keys, readers, strict=True):
            tensor = frame.nchw_.get(key)
            planar = tensor is not None
            if not planar:
                tensor = frame.nhwc_[key]
            if type(tensor) is not tensor_type:
                return False
            if tensor.dtype is dtype or (integers and not tensor.dtype.is_floating_point):
                continue
            if readers_ is None or not tensor.dtype.is_floating_point or (
                    len(readers_) > 1 and not all(
                        reader.autocast and reader._dtype_policy.name == layer._dtype_policy.name
                        for reader in readers_)):
                return False
            if frame.shifts:
                frame.settle(key)
                tensor = frame.nchw_[key] if planar else frame.nhwc_[key]
            # one form, cast: the other would be the uncast tensor's
            frame.nchw_.pop(key, None)
            frame.nhwc_.pop(key, None)
            (frame.nchw_ if planar else frame.nhwc_)[key] = tensor.to(dtype)
        return True

    def make_plan(model):
        """[(layer, handler or None, takes training?, input keys, a list argument?, arguments,
        output keys, keys read for the last time here, is the output read by one step only?,
        for a convolution: is that step a batch norm, to which it may leave its bias? and for
        a batch norm: is it the last that may cancel such a bias?, for each input the layers
        that read it or None for a model output)], or None where the graph needs Keras' own
        walk."""
        known = {id(x) for x in model.inputs}
        steps = []
        for depth in sorted(model._nodes_by_depth, reverse=True):
            for node in model._nodes_by_depth[depth]:
                if not node.operation or node.is_input:
                    continue
                if any(id(x) not in known for x in node.input_tensors):
                    return None
                layer = model._get_operation_for_node(node)
                arguments = node.arguments
                takes_training = "training" in getattr(layer, "_call_context_args", ())
                # one tensor or one list of tensors, and keyword arguments that change
                # nothing: a None (the mask=None Keras records for a batch norm is the
                # default), or the training flag Keras records for a dropout, which the
                # model's own flag overrides
                first = arguments.args[0] if len(arguments.args) == 1 else None
                listed = isinstance(first, (list, tuple))
                simple = (
                    (isinstance(first, KerasTensor) or (listed and first and all(
                        isinstance(x, KerasTensor) for x in first)))
                    and all(value is None or (key == "training" and takes_training)
                            for key, value in arguments.kwargs.items()))
                keys = ([id(x) for x in first] if listed else [id(first)]) if simple else [
                    id(x) for x in node.input_tensors]
                handler = handler_for(layer) if simple else None
                steps.append((layer, handler, takes_training, keys, listed, arguments,
                              [id(x) for x in node.outputs]))
                known.update(id(x) for x in node.outputs)
        if any(id(x) not in known for x in model.outputs):
            return None
        # each tensor leaves the call's frame after the last step that reads it, as a local
        # variable does in a PyTorch forward (Keras' own walk keeps them all until it returns):
        # a batch norm's output that only a ReLU reads is not needed by the backward pass.
        # Keeping them raised ResNet20 v1's forward peak at batch 128 from 200 to 342 MiB of
        # torch's allocations, and the fresh pages cost time in every step
        last_use = {key: index for index, step in enumerate(steps) for key in step[3]}
        kept = {id(x) for x in model.outputs}
        drops = [[] for _ in steps]
        for key, index in last_use.items():
            if key not in kept:
                drops[index].append(key)
        # a tensor read by one layer only may be overwritten by it (a ReLU in place on a batch
        # norm's output, a residual sum into one addend), as a PyTorch block does: a fresh
        # tensor for each costs memory traffic and, on a CPU, page faults
        readers = collections.Counter(key for step in steps for key in step[3])
        single = [readers[step[6][0]] == 1 and step[6][0] not in kept for step in steps]
        # a convolution whose one reader is a batch norm may leave its bias to it (conv)
        absorbs = [alone and step[1] is conv and steps[last_use[step[6][0]]][1] is batch_norm
                   for step, alone in zip(steps, single, strict=True)]
        # and the last batch norm that may cancel such a bias gives all of them their zero
        # gradient (ZeroGradients): marked in the same place
        cancelling = [last_use[step[6][0]] for step, absorb in zip(steps, absorbs, strict=True)
                      if absorb]
        if cancelling:
            absorbs[max(cancelling)] = True
        layers_reading = collections.defaultdict(list)
        for step in steps:
            for key in dict.fromkeys(step[3]):
                layers_reading[key].append(step[0])
        reading = [tuple(None if key in kept else tuple(layers_reading[key]) for key in step[3])
                   for step in steps]
        return [(*step, drop, alone, absorb, readers_)
                for step, drop, alone, absorb, readers_ in zip(steps, drops, single, absorbs,
                                                               reading, strict=True)]

    def run(model, steps, inputs, training, scoped):
        """The plan's steps on ``inputs``. ``scoped``: inside an autocast scope (a mixed
        precision model's call), where a layer's own ``call`` would read its weights in the
        scope's dtype, not in its own: layers the handlers leave go through Keras."""
        frame = Frame(steps)
        for x, y in zip(model.inputs, inputs, strict=False):
            frame.nhwc_[id(x)] = y
        dropping = ()
        for (layer, handler, takes_training, keys, listed, arguments, outputs, drops,
             single, absorb, readers) in steps:
            for key in dropping:  # read for the last time by the step before
                frame.nhwc_.pop(key, None)
                frame.nchw_.pop(key, None)
            dropping = drops
            # the layer's state is checked on every call: a policy, a quantisation or a hook
            # can be set after the plan was made
            dtype = None if handler is None else compute_dtype(layer, handler)
            # (a nested model takes its input as it is: Layer.__call__ does not cast it)
            if dtype is not None and (handler is nested or inputs_fit(
                    layer, frame, keys, handler is rescaling, dtype, readers)):
                # read by the conv handler (may it leave its bias out?) and the batch norm
                # handler (is it the one that gives the left-out biases their gradient?)
                frame.absorb = outputs[0] if absorb else None
                frame.anchor = absorb
                result = handler(layer, frame, keys, training)
                if result is None:
                    tensors = [frame.nhwc(key) for key in keys]
                    argument = tensors if listed else tensors[0]
                    if scoped or dtype is not float32:  # Keras' call sets the layer's scope
                        frame.moving.flush()
                        out = (layer(argument, training=training) if takes_training
                               else layer(argument))
                    else:
                        out = (layer.call(argument, training=training)
                               if takes_training and layer._call_has_training_arg
                               else layer.call(argument))
                    frame.nhwc_[outputs[0]] = out
                else:
                    out, planar = result
                    (frame.nchw_ if planar else frame.nhwc_)[outputs[0]] = out
                    if frame.fresh:
                        frame.fresh = False
                        if single:
                            frame.spare.add(outputs[0])
                continue
            # as Keras' own walk calls it, in Keras' layout: the model's training flag
            # overrides the node's. Batch norms earlier in the call update first, as there
            frame.moving.flush()
            for key in keys:
                frame.nhwc(key)
            args, kwargs = arguments.fill_in(frame.nhwc_)
            if takes_training:
                kwargs = {**kwargs, "training": training}
            out = layer(*args, **kwargs)
            if len(outputs) == 1 and type(out) is torch.Tensor:
                frame.nhwc_[outputs[0]] = out
            else:
                for key, value in zip(outputs, keras.tree.flatten(out), strict=False):
                    frame.nhwc_[key] = value
        frame.moving.flush()
        outs = [frame.nhwc(id(x)) for x in model.outputs]
        if frame.zeroed:  # the last cancelling batch norm went through Keras: the first
            first = outs[0]  # output carries the biases' zero gradients instead
            outs[0] = ZeroGradients.apply(first, *frame.zeroed)
            for name in ("_keras_logits", "_keras_mask"):
                if hasattr(first, name):
                    setattr(outs[0], name, getattr(first, name))
        return keras.tree.pack_sequence_as(model._outputs_struct, outs)

    def functional_call(self, inputs, training=None, mask=None, **kwargs):
        scope = get_autocast_scope()
        if (training is None or mask is not None or kwargs or compiling()
                or in_stateless_scope()
                or (scope is not None and scope.dtype not in (None, "float32", "bfloat16"))):
            return keras_functional_call(self, inputs, training=training, mask=mask, **kwargs)
        if self not in plans:
            plans[self] = make_plan(self)
        steps = plans[self]
        flat = self._standardize_inputs(inputs)
        if steps is None or not all(type(x) is torch.Tensor and get_keras_mask(x) is None
                                    for x in flat):
            return keras_functional_call(self, inputs, training=training, mask=mask, **kwargs)
        return run(self, steps, flat, training, scope is not None)

    Functional.call = functional_call


def _install_loss_terms(keras, torch, compiling, in_stateless_scope, value_of,
                        step_weights) -> None:
    """Compute the weights' L2 penalties together, and leave scalar losses as they are.

    The book's nets put an L2 penalty on every kernel: ResNet20 v1 has 21. Keras computes each
    as ``l2 * sum(square(w))`` through three dispatched ops, then sums each scalar once more in
    ``Trainer._aggregate_additional_loss``: about 100 small kernels and their gradients a step.
    Here the penalties of plain float32 weights sharing one factor are one autograd node: its
    forward is three foreach kernels (``l2 * norm(w) ** 2``, equal to float32 rounding), its
    backward one (``w * (2 * l2 * g)``, Keras' gradient bit for bit, as doubling is exact),
    where autograd through the norms took about a hundred small kernels. They come in Keras'
    order, and a scalar float loss is passed on as the sum of itself. Inside a stateless or
    autocast scope, under torch.compile, and for any other regulariser Keras' own code runs.
    """
    try:
        from keras.src.backend import get_autocast_scope
        from keras.src.layers.layer import Layer
        from keras.src.trainers.trainer import Trainer
    except ImportError as error:
        _laid_out_differently(keras, error, "regularisers run as usual.")
        return

    keras_regularization_losses = Layer._get_regularization_losses
    keras_aggregate = Trainer._aggregate_additional_loss
    l2_type = keras.regularizers.L2
    float32 = torch.float32

    class Penalties(torch.autograd.Function):
        """``factor * ||w||^2`` of each weight, as one vector, in one node of the graph."""

        @staticmethod
        def forward(ctx, factor, *weights):
            ctx.factor = factor
            ctx.save_for_backward(*weights)
            # squared and scaled as one vector: the same products as per weight, in two ops
            norms = torch.stack(torch._foreach_norm(weights))
            return norms.mul(norms).mul_(factor)

        @staticmethod
        def backward(ctx, grad):
            scaled = (grad * (2.0 * ctx.factor)).unbind(0)
            return None, *torch._foreach_mul(ctx.saved_tensors, list(scaled))

    def regularization_losses(self):
        if compiling() or in_stateless_scope() or get_autocast_scope() is not None:
            return keras_regularization_losses(self)
        losses, groups = [], {}
        weights = step_weights.get(self)  # the training step's list (_install_train_step)
        for variable in self.trainable_weights if weights is None else weights:
            regularizer = variable.regularizer
            if regularizer is None:
                continue
            value = value_of(variable)
            if (type(regularizer) is l2_type and isinstance(value, torch.Tensor)
                    and value.dtype is float32):
                groups.setdefault(regularizer.l2, []).append((len(losses), value))
                losses.append(None)
            else:
                losses.append(regularizer(variable))
        for factor, members in groups.items():
            penalties = Penalties.apply(factor, *(value for _, value in members))
            for (index, _), penalty in zip(members, penalties.unbind(0), strict=True):
                losses[index] = penalty
        return losses

    def aggregate(self, loss):
        if (type(loss) is torch.Tensor and loss.ndim == 0 and loss.dtype.is_floating_point
                and not compiling()):
            return loss  # the sum of one float is itself, in its own dtype
        return keras_aggregate(self, loss)

    Layer._get_regularization_losses = regularization_losses
    Trainer._aggregate_additional_loss = aggregate

    try:
        from keras.src.backend import get_keras_mask
        from keras.src.losses.losses import LossFunctionWrapper
        from keras.src.losses.losses import sparse_categorical_crossentropy as keras_sparse
        from keras.src.trainers.compile_utils import CompileLoss
    except ImportError as error:
        _laid_out_differently(keras, error, "the loss is computed as usual.")
        return
    keras_compute_loss = Trainer.compute_loss
    functional = torch.nn.functional
    sparse_arguments = {"from_logits": False, "ignore_class": None, "axis": -1}

    def sparse_crossentropy(compile_loss, y, y_pred, sample_weight):
        """``compile(loss="sparse_categorical_crossentropy")`` on a batch of probabilities:
        Keras' torch ops in Keras' order, without the wrappers around them (structure checks,
        conversions, the reduction's own ops), or None for any other loss or case."""
        if (type(compile_loss) is not CompileLoss
                or sample_weight is not None or type(y_pred) is not torch.Tensor
                or type(y) is not torch.Tensor or y_pred.dtype is not float32
                or y_pred.ndim != 2 or y_pred.shape[1] < 2 or y_pred.shape[0] == 0
                or not (y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1))
                or y.shape[0] != y_pred.shape[0] or y.device != y_pred.device
                or get_keras_mask(y_pred) is not None or compile_loss.dtype != "float32"):
            return None
        if not compile_loss.built:  # as CompileLoss.call does for one unnested output
            compile_loss.build(y, y_pred)
        if len(compile_loss._flat_losses) != 1:
            return None
        path, loss, weight, _ = compile_loss._flat_losses[0]
        if (path or weight is not None or type(loss) is not LossFunctionWrapper
                or loss.fn is not keras_sparse or loss.reduction != "sum_over_batch_size"
                or loss.dtype != "float32" or any(
                    key not in sparse_arguments or sparse_arguments[key] != value
                    for key, value in loss._fn_kwargs.items())):
            return None
        # Loss.__call__ casts the labels to its dtype, the backend's loss to integers
        target = y.to(float32).to(torch.long)
        if target.ndim == 2:
            target = target.squeeze(-1)
        epsilon = keras.config.epsilon()
        probabilities = torch.clip(y_pred / torch.sum(y_pred, dim=1, keepdim=True), epsilon,
                                   1.0 - epsilon)
        values = functional.nll_loss(torch.log(probabilities), target, reduction="none")
        # sum over the batch size: Keras divides by the count made a float32 tensor
        return torch.divide(torch.sum(values), torch.tensor(float(values.shape[0])))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        loss = (None if (self._compile_loss is None or compiling() or in_stateless_scope()
                         or get_autocast_scope() is not None)
                else sparse_crossentropy(self._compile_loss, y, y_pred, sample_weight))
        if loss is None:
            return keras_compute_loss(self, x, y, y_pred, sample_weight, training=training)
        losses = [loss, *(self._aggregate_additional_loss(term) for term in self.losses)]
        # Keras' ops.sum of the list: stacked, then summed
        return losses[0] if len(losses) == 1 else torch.sum(torch.stack(losses))

    Trainer.compute_loss = compute_loss


def _install_loss_walks(keras, compiling) -> None:
    """Skip Keras' two walks of every layer for ``add_loss`` losses while no layer holds one.

    Each training step Keras' ``Layer.__call__`` clears every layer's added losses
    (``_clear_losses``, recursive) and ``compute_loss`` gathers them (``Layer.losses``), two
    walks of the model (79 layers in ResNet20 v1's training model, about 110 us a step on one
    core here). A layer's added losses, and the ids a stateless scope collects them by, are
    only ever put there by ``add_loss`` (an activity regulariser goes through it too). Here
    ``add_loss`` notes its layer first, and while no layer is noted both walks would find
    nothing: clearing does nothing and ``losses`` is the weights' penalties alone. Once a
    layer is noted Keras' own walks run, and a cleared layer stops being noted. Under
    torch.compile Keras' own code runs.
    """
    try:
        from keras.src.layers.layer import Layer
    except ImportError as error:
        _laid_out_differently(keras, error, "added losses are gathered as usual.")
        return
    keras_add_loss, keras_clear = Layer.add_loss, Layer._clear_losses
    keras_losses = Layer.losses.fget
    holding = weakref.WeakSet()  # the layers add_loss may have left a loss or an id in

    def add_loss(self, loss):
        holding.add(self)
        return keras_add_loss(self, loss)

    def clear_losses(self):
        if not holding and not compiling():
            return  # no layer holds a loss or an id: Keras' walk would clear nothing
        keras_clear(self)  # which calls this on each sublayer
        if not (self._losses or self._loss_ids):
            holding.discard(self)

    def losses(self):
        if holding or compiling() or self._losses_override:
            return keras_losses(self)
        return self._get_regularization_losses()

    add_loss.__doc__, losses.__doc__ = keras_add_loss.__doc__, Layer.losses.__doc__
    Layer.add_loss = add_loss
    Layer._clear_losses = clear_losses
    Layer.losses = property(losses)


def _install_fused_adam(keras, torch, compiling, value_of) -> None:
    """Adam's (and AdamW's) update of float32 weights on a CPU in torch's one fused kernel.

    Keras' torch Adam updates the weights with ten foreach ops and five temporary lists: for
    ResNet20 v1's 82 weights, about 800 small kernels a step. Moving to the fused kernel took a
    step at batch 2 on one thread of a 2-core CPU from 31.2 to 28.4 ms (medians of eight
    alternating epochs); the cost does not depend on the batch size. ``torch._fused_adam_``
    reads each weight, its gradient and both moments once. The two libraries place epsilon differently::

        Keras  w -= lr * sqrt(1 - b2**t) / (1 - b1**t) * m / (sqrt(v) + eps)
        torch  w -= lr / (1 - b1**t) * m / (sqrt(v) / sqrt(1 - b2**t) + eps')

    which are equal for ``eps' = eps / sqrt(1 - b2**t)``, passed at each step; ``t`` is Keras'
    ``iterations + 1``. Weight decay (AdamW), clipping, loss scaling, gradient accumulation and
    EMA are Keras' own code around this call and are unchanged. Under torch.compile, with
    amsgrad, for a weight or moment whose memory is not contiguous (the fused kernel reads raw
    memory) and off the CPU (reading the step count would wait for the device), Keras' own
    update runs.
    """
    try:
        from keras.src.backend.torch.optimizers.torch_adam import Adam
    except ImportError as error:
        _laid_out_differently(keras, error, "Adam updates run as usual.")
        return
    fused = getattr(torch, "_fused_adam_", None)
    if fused is None:
        return
    keras_update = Adam._parallel_update_step
    float32, variable_type = torch.float32, keras.Variable

    tensor_type, strided = torch.Tensor, torch.strided

    def fits(tensor) -> bool:
        # attribute checks only: this runs for every weight, moment and gradient each step
        return (type(tensor) in (tensor_type, torch.nn.Parameter) and tensor.dtype is float32
                and tensor.is_cpu and tensor.layout is strided)

    def parallel_update_step(self, grads, variables, learning_rate):
        if (compiling() or self.amsgrad or not variables
                or not all(type(b) in (float, int) for b in (self.beta_1, self.beta_2,
                                                             self.epsilon))):
            return keras_update(self, grads, variables, learning_rate)
        index, key = self._trainable_variables_indices, self._var_key
        slots = [index[key(variable)] for variable in variables]
        weights = [value_of(variable) for variable in variables]
        moments = [value_of(self._momentums[slot]) for slot in slots]
        velocities = [value_of(self._velocities[slot]) for slot in slots]
        grads = list(grads)
        if not (all(fits(t) and t.is_contiguous() for group in (weights, moments, velocities)
                    for t in group) and all(fits(g) for g in grads)):
            return keras_update(self, grads, variables, learning_rate)
        grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
        rate = learning_rate.value if isinstance(learning_rate, variable_type) else learning_rate
        step = float(value_of(self._iterations)) + 1.0
        correction = (1.0 - float(self.beta_2) ** step) ** 0.5
        steps = [torch.tensor(step)] * len(weights)  # read by the kernel, not changed
        fused(weights, grads, moments, velocities, [], steps, lr=float(rate),
              beta1=float(self.beta_1), beta2=float(self.beta_2), weight_decay=0.0,
              eps=float(self.epsilon) / correction, amsgrad=False, maximize=False)

    Adam._parallel_update_step = parallel_update_step


def _install_train_step(keras, torch, compiling, in_stateless_scope, value_of,
                        step_weights) -> None:
    """Keras' torch ``train_step``, listing the model's trainable weights once a step.

    Keras' step asks ``model.trainable_weights`` three times (for the regularisers, to see
    whether there are any, and for the gradients), and each walks every layer: 79 for
    ResNet20 v1's training model. Here the step lists them once, after the forward pass as
    Keras first does, and the regularisers read that list; the gradients are read from the
    variables' tensors without ``Variable.value``'s scope checks. Everything else is Keras'
    step, in its order. Under torch.compile and in a stateless scope Keras' own step runs.
    """
    try:
        from keras.src import tree
        from keras.src.backend.torch.trainer import TorchTrainer
        from keras.src.trainers.data_adapters.data_adapter_utils import (
            unpack_x_y_sample_weight,
        )
    except ImportError as error:
        _laid_out_differently(keras, error, "the training step runs as usual.")
        return
    keras_train_step = TorchTrainer.train_step

    def train_step(self, data):
        if compiling() or in_stateless_scope():
            return keras_train_step(self, data)
        x, y, sample_weight = unpack_x_y_sample_weight(data)
        y_pred = self(x, training=True) if self._call_has_training_arg else self(x)
        self.zero_grad()  # the gradients left from the step before
        weights = self.trainable_weights
        step_weights[self] = weights
        try:
            loss = self._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                                      training=True)
        finally:
            step_weights.pop(self, None)
        self._loss_tracker.update_state(
            loss, sample_weight=next(i for i in tree.flatten(x) if i is not None).shape[0])
        if self.optimizer is not None:
            loss = self.optimizer.scale_loss(loss)
        if weights:
            loss.backward()
            with torch.no_grad():
                self.optimizer.apply([value_of(v).grad for v in weights], weights)
        else:
            warnings.warn("The model does not have any trainable weights.", stacklevel=2)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    TorchTrainer.train_step = train_step


def _install_seed_draws(keras, torch, compiling, in_stateless_scope) -> None:
    """Keras' torch ``torch_seed_generator`` for a ``SeedGenerator`` on the CPU, in two ops.

    Each seeded draw (``keras.random.uniform``, ``randint``, ``normal``... with
    ``seed=SeedGenerator``) asks Keras' ``SeedGenerator.next``: a copy of the state, a NumPy
    increment converted to a tensor, an addition and an ``assign`` through Keras' variable
    checks, then an addition of the two seeds and ``int``. Here the state is read once, and the
    increment ``[0, 1]`` is added to it in place in its int32 (which is what Keras' ``assign``
    does: it copies into the variable); the generator gets the same seed,
    ``(first + second) & 0xFFFFFFFF``. Any other seed, a stateless scope (where the new state
    is collected, not written), torch.compile and other devices go through Keras.
    """
    try:
        from keras.src import backend as keras_backend
        from keras.src.backend.torch import random as torch_random
        from keras.src.backend.torch.core import get_device
        from keras.src.backend.torch.random import torch_seed_generator as keras_seed_generator
        from keras.src.random.seed_generator import SeedGenerator
    except ImportError as error:
        _laid_out_differently(keras, error, "random draws are seeded as usual.")
        return
    tensor_types, int32 = (torch.Tensor, torch.nn.Parameter), torch.int32
    increment = torch.tensor([0, 1], dtype=int32)

    def seed_generator(seed):
        state = getattr(getattr(seed, "state", None), "_value", None)
        if (type(seed) is not SeedGenerator or seed.backend is not keras_backend
                or type(state) not in tensor_types or state.dtype is not int32
                or state.shape != (2,) or not state.is_cpu or get_device() != "cpu"
                or compiling() or in_stateless_scope()):
            return keras_seed_generator(seed)
        first, second = state.tolist()
        with torch.no_grad():
            state.add_(increment)
        generator = torch.Generator(device="cpu")
        generator.manual_seed((first + second) & 0xFFFFFFFF)
        return generator

    torch_random.torch_seed_generator = seed_generator
