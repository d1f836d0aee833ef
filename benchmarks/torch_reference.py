"""PyTorch versions of the benchmarked nets, layer for layer the same as nets/ builds them.

They exist only to time a reference implementation next to ours (benchmarks/throughput.py):
same widths, depths, shortcuts, biases and head, so the trainable parameter counts match the
Keras models exactly (the benchmark checks this before it times anything). The softmax is left
to the loss (``cross_entropy`` on logits), which is the same arithmetic.

``inplace=True`` builds the same nets with torchvision's habit: ReLUs in place and the residual
sum added into the block's output (``out += shortcut``), which saves a fresh tensor each.

``same=True`` pads as Keras' ``padding="same"`` does. PyTorch's idiom, ``padding=k // 2``, pads
both sides alike. That is Keras' padding for every stride-1 convolution, but not for a 3x3
convolution with stride 2 on an even size: Keras pads one row and one column, at the bottom and
right, so output pixel ``i`` reads input rows ``2i..2i+2``; the idiom reads ``2i-1..2i+1``. The
default reference therefore computes a slightly different function from the Keras net (same
parameters, windows shifted by one pixel in ResNet v1's two downsampling convolutions). The
``same`` reference computes the Keras function and pays for the padded copy, as the Keras model
does. ResNet v2's strided convolutions are 1x1 and DenseNet-BC has none, so there the two agree.

:func:`sum_bias_gradients` gives a built net the bias gradient our training path computes on a
CPU (``tasks.torch_kernels.BiasedConv``): the output gradient's sum, where torch's convolution
backward has oneDNN reduce it along with the kernel's gradient. It is not a PyTorch option but a
hand-written autograd function, written again here (the reference imports nothing of ours) to
show what the same trick is worth to a PyTorch user. :func:`leave_biases_to_batch_norms` does
the same for our other bias trick: a convolution that a batch norm alone reads runs without its
bias, which the batch norm cancels.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class KerasSamePad(nn.Module):
    """Zero padding as Keras' ``padding="same"`` computes it for one size: the odd pixel of an
    uneven total goes at the bottom and right."""

    def __init__(self, kernel: int, stride: int):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size in (x.shape[3], x.shape[2]):  # F.pad takes the last dimension first
            total = max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return nn.functional.pad(x, pads) if any(pads) else x


class _BiasBySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding, dilation, groups)
        return nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        wants = ctx.needs_input_grad[:3]
        grad_x = grad_weight = None
        if wants[0] or wants[1]:
            grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
                grad, x, weight, None, stride, padding, dilation, False, (0, 0), groups,
                (wants[0], wants[1], False))
        grad_bias = None
        if wants[2]:  # per image first: faster than torch's (0, 2, 3) sum of channels-last
            if grad.is_contiguous(memory_format=torch.channels_last):
                grad_bias = grad.permute(0, 2, 3, 1).reshape(grad.shape[0], -1,
                                                             grad.shape[1]).sum(1).sum(0)
            else:
                grad_bias = grad.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None, None, None, None


class BiasSumConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose bias gradient, on a CPU, is the sum of the output gradient."""

    def _conv_forward(self, x, weight, bias):
        # under autocast the convolution would run in another dtype than the saved tensors
        if (bias is None or self.padding_mode != "zeros" or x.device.type != "cpu"
                or not torch.is_grad_enabled() or torch.is_autocast_enabled("cpu")):
            return super()._conv_forward(x, weight, bias)
        return _BiasBySum.apply(x, weight, bias, self.stride, self.padding, self.dilation,
                                self.groups)


def sum_bias_gradients(model: nn.Module) -> nn.Module:
    """``model`` with every ``nn.Conv2d`` a :class:`BiasSumConv2d` (same parameters)."""
    for module in model.modules():
        if type(module) is nn.Conv2d:
            module.__class__ = BiasSumConv2d
    return model


class BiasLeftOutConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose output a batch norm alone reads, run without its bias.

    In training the batch norm subtracts the batch mean, bias included, so its output is the
    same; the bias gets no gradient (its exact one is zero) and stays as it is, and the running
    mean is that of the unbiased output, which is what this convolution gives in inference
    too. So the net computes the same function, without the bias's work in either pass."""

    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, weight, None)


def leave_biases_to_batch_norms(model: nn.Module) -> nn.Module:
    """``model`` with every ``nn.Conv2d`` that feeds a batch norm alone (a convolution followed
    by ``nn.BatchNorm2d`` in a ``nn.Sequential``, and ResNet v1's ``conv1``/``conv2``) a
    :class:`BiasLeftOutConv2d` (same parameters): what our training path does
    (``tasks.torch_kernels``), written again here as the bias sum is."""

    def convolution(module):  # a convolution, or one after Keras' "same" padding
        if (isinstance(module, nn.Sequential) and len(module) == 2
                and isinstance(module[0], KerasSamePad)):
            module = module[1]
        return module if isinstance(module, nn.Conv2d) else None

    found = []
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            found += [convolution(first)
                      for first, second in zip(module, module[1:], strict=False)
                      if isinstance(second, nn.BatchNorm2d)]
        elif isinstance(module, BasicUnit):
            found += [convolution(module.conv1), convolution(module.conv2)]
    for module in found:
        if module is not None and module.bias is not None:
            module.__class__ = BiasLeftOutConv2d
    return model


def conv(cin: int, cout: int, kernel: int, stride: int = 1, same: bool = False) -> nn.Module:
    # biased, as the book's layers are; PyTorch's symmetric padding unless ``same``
    if same and stride > 1 and kernel > 1:
        return nn.Sequential(KerasSamePad(kernel, stride),
                             nn.Conv2d(cin, cout, kernel, stride=stride, bias=True))
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=True)


class BasicUnit(nn.Module):
    """ResNet v1: conv3x3-BN-ReLU-conv3x3-BN plus shortcut (1x1 projection when shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int, inplace: bool = False,
                 same: bool = False):
        super().__init__()
        self.inplace = inplace
        self.conv1, self.bn1 = conv(cin, cout, 3, stride, same), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = conv(cout, cout, 3), nn.BatchNorm2d(cout)
        self.shortcut = (conv(cin, cout, 1, stride, same) if stride != 1 or cin != cout
                         else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        relu = torch.relu_ if self.inplace else torch.relu
        y = relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.shortcut is not None:
            x = self.shortcut(x)
        return relu(y.add_(x) if self.inplace else x + y)


class ResNetV1(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, inplace: bool = False,
                 same: bool = False):
        super().__init__()
        units = (depth - 2) // 6
        self.stem = nn.Sequential(conv(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(inplace))
        layers, cin = [], 16
        for index, cout in enumerate((16, 32, 64)):
            for unit in range(units):
                stride = 2 if index > 0 and unit == 0 else 1
                layers.append(BasicUnit(cin, cout, stride, inplace, same))
                cin = cout
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.stem(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class PreactBottleneck(nn.Module):
    """ResNet v2: [BN-ReLU]-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1 plus shortcut, no final ReLU."""

    def __init__(self, cin: int, inner: int, cout: int, stride: int, preact: bool,
                 inplace: bool = False, same: bool = False):
        super().__init__()
        self.inplace = inplace
        self.pre = (nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace)) if preact
                    else nn.Identity())
        self.body = nn.Sequential(
            conv(cin, inner, 1, stride, same), nn.BatchNorm2d(inner), nn.ReLU(inplace),
            conv(inner, inner, 3), nn.BatchNorm2d(inner), nn.ReLU(inplace),
            conv(inner, cout, 1),
        )
        self.shortcut = (conv(cin, cout, 1, stride, same) if stride != 1 or cin != cout
                         else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the shortcut takes the unit's raw input, as the book's resnet_v2 does
        y = self.body(self.pre(x))
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        return y.add_(shortcut) if self.inplace else shortcut + y


class ResNetV2(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, inplace: bool = False,
                 same: bool = False):
        super().__init__()
        units = (depth - 2) // 9
        self.stem = nn.Sequential(conv(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(inplace))
        layers, cin = [], 16
        for index, cout in enumerate((64, 128, 256)):
            inner = cin  # the book's widths: the stage's input width
            for unit in range(units):
                stride = 2 if index > 0 and unit == 0 else 1
                layers.append(PreactBottleneck(cin, inner, cout, stride,
                                               preact=not (index == 0 and unit == 0),
                                               inplace=inplace, same=same))
                cin = cout
        self.body = nn.Sequential(*layers)
        self.head_bn = nn.BatchNorm2d(256)
        self.head = nn.Linear(256, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.head_bn(self.body(self.stem(x))))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k), concatenated to the input."""

    def __init__(self, cin: int, growth: int, inplace: bool = False):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(inplace), conv(cin, 4 * growth, 1),
            nn.BatchNorm2d(4 * growth), nn.ReLU(inplace), conv(4 * growth, growth, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], 1)


class DenseNetBC(nn.Module):
    """The book's DenseNet-BC: stem concatenated with the image, BN-conv1x1-pool transitions."""

    def __init__(self, depth: int = 100, growth: int = 12, num_classes: int = 10,
                 inplace: bool = False):
        super().__init__()
        layers = (depth - 4) // 6
        self.stem = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(inplace), conv(3, 2 * growth, 3))
        blocks, cin, grown = [], 3 + 2 * growth, 2 * growth
        for block in range(3):
            for _ in range(layers):
                blocks.append(DenseLayer(cin, growth, inplace))
                cin += growth
            if block < 2:
                filters = int((grown + layers * growth) * 0.5)
                blocks += [nn.BatchNorm2d(cin), conv(cin, filters, 1), nn.AvgPool2d(2)]
                cin = grown = filters
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(torch.cat([x, self.stem(x)], 1))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


# name -> constructor(classes, inplace, same)
REFERENCES = {
    "resnet20_v1": lambda *args: ResNetV1(20, *args),
    "resnet56_v1": lambda *args: ResNetV1(56, *args),
    "resnet110_v2": lambda *args: ResNetV2(110, *args),
    # no strided convolutions (pooling halves the size): Keras' padding is PyTorch's there
    "densenet_bc_100_k12": lambda classes, inplace, same: DenseNetBC(100, 12, classes, inplace),
}


def build(net: str, classes: int, inplace: bool = False, same: bool = False) -> nn.Module:
    """The reference for ``net``; ``same`` pads every convolution as Keras' "same" does."""
    return REFERENCES[net](classes, inplace, same)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
