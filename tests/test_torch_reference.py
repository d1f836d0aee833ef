"""benchmarks/torch_reference.py: the PyTorch reference of ResNet20 v1, given the Keras net's
weights, computes the Keras net's function when it pads as Keras' "same" does, and a function
that differs where PyTorch's symmetric padding shifts the strided windows. Runs under Keras'
torch backend in a subprocess; needs torch (``pip install -e .[benchmark]``)."""

from __future__ import annotations

import pytest

from tests.test_torch_kernels import _under_torch

COMPARE = r"""
import json
import numpy as np, torch, keras
from benchmarks.torch_reference import build, parameter_count
from nets.registry import create_model

keras.utils.set_random_seed(0)
net = create_model("resnet20_v1", input_shape=(32, 32, 3), num_classes=10)
x = np.random.default_rng(0).standard_normal((4, 32, 32, 3)).astype("float32")

convs = [layer for layer in net.layers if isinstance(layer, keras.layers.Conv2D)]
norms = [layer for layer in net.layers if isinstance(layer, keras.layers.BatchNormalization)]
rng = np.random.default_rng(1)
for layer in norms:  # statistics far from the initial ones, so every layer counts
    gamma, beta, mean, variance = layer.get_weights()
    layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape).astype("float32"),
                       rng.uniform(-0.5, 0.5, beta.shape).astype("float32"),
                       rng.uniform(-0.5, 0.5, mean.shape).astype("float32"),
                       rng.uniform(0.5, 1.5, variance.shape).astype("float32")])
expected = keras.ops.convert_to_numpy(net(x, training=False))
dense = next(layer for layer in net.layers if isinstance(layer, keras.layers.Dense))

outputs = {}
for same in (True, False):
    reference = build("resnet20_v1", 10, same=same).eval()
    assert parameter_count(reference) == sum(int(np.prod(w.shape)) for w in net.trainable_weights)
    torch_convs = [m for m in reference.modules() if isinstance(m, torch.nn.Conv2d)]
    torch_norms = [m for m in reference.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(torch_convs) == len(convs) and len(torch_norms) == len(norms)
    with torch.no_grad():
        for layer, module in zip(convs, torch_convs):
            kernel, bias = layer.get_weights()
            weight = torch.from_numpy(kernel).permute(3, 2, 0, 1)  # HWIO -> OIHW
            assert weight.shape == module.weight.shape, (layer.name, module)
            module.weight.copy_(weight)
            module.bias.copy_(torch.from_numpy(bias))
        for layer, module in zip(norms, torch_norms):
            gamma, beta, mean, variance = (torch.from_numpy(w) for w in layer.get_weights())
            module.weight.copy_(gamma); module.bias.copy_(beta)
            module.running_mean.copy_(mean); module.running_var.copy_(variance)
            module.eps = layer.epsilon
        kernel, bias = dense.get_weights()
        reference.head.weight.copy_(torch.from_numpy(kernel).T)
        reference.head.bias.copy_(torch.from_numpy(bias))
        logits = reference(torch.from_numpy(x).permute(0, 3, 1, 2))
    outputs[str(same)] = torch.softmax(logits, dim=1).numpy()
print("RESULTS " + json.dumps({
    "same": float(np.abs(outputs["True"] - expected).max()),
    "symmetric": float(np.abs(outputs["False"] - expected).max()),
}))
"""


def test_keras_same_reference_computes_the_keras_net_and_the_default_does_not() -> None:
    pytest.importorskip("torch", reason="install the benchmark extra (torch)")
    differences = _under_torch(COMPARE)
    # float32 rounding in a 20-layer net: well under 1e-4 on probabilities
    assert differences["same"] < 1e-4, differences
    # the default's strided windows are shifted by a pixel: a different function
    assert differences["symmetric"] > 1e-3, differences


BIAS_SUM = r"""
import json
import torch
from torch import nn
from benchmarks.torch_reference import build, sum_bias_gradients

x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
gradients = {}
for hand_written in (False, True):
    torch.manual_seed(0)
    # no batch norm after the convolutions: every bias has a gradient of its own
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 6, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(6, 4, 1, groups=2))
    if hand_written:
        sum_bias_gradients(model)
    x.grad = None
    model(x).square().sum().backward()
    gradients[str(hand_written)] = [p.grad for p in model.parameters()] + [x.grad]
worst = max(float((a - b).abs().max() / b.abs().max())
            for a, b in zip(gradients["True"], gradients["False"], strict=True))
reference = build("resnet20_v1", 10)
kinds = {type(m).__name__ for m in sum_bias_gradients(reference).modules()
         if isinstance(m, nn.Conv2d)}
print("RESULTS " + json.dumps({"kinds": sorted(kinds), "worst": worst,
                               "count": len(gradients["True"])}))
"""


def test_bias_sum_reference_has_the_gradients_of_torch_own_convolutions() -> None:
    pytest.importorskip("torch", reason="install the benchmark extra (torch)")
    results = _under_torch(BIAS_SUM)
    assert results["kinds"] == ["BiasSumConv2d"]  # every convolution of a built net
    assert results["count"] == 7  # three kernels, three biases and the input
    # the same gradients, up to the order in which float32 sums are taken
    assert results["worst"] < 1e-5, results


BIAS_SKIP = r"""
import json
import torch
from benchmarks.torch_reference import build, leave_biases_to_batch_norms

found, worst = {}, {}
for net, same in (("resnet20_v1", True), ("resnet110_v2", False),
                  ("densenet_bc_100_k12", False)):
    torch.manual_seed(0)
    # in float64, so that what is compared is the arithmetic, not float32's rounding, which a
    # randomly initialised 110-layer net amplifies to 1% of its largest gradient
    plain = build(net, 10, same=same).double()
    left = build(net, 10, same=same).double()
    left.load_state_dict(plain.state_dict())
    leave_biases_to_batch_norms(left)
    found[net] = sum(type(m).__name__ == "BiasLeftOutConv2d" for m in left.modules())
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)).double()
    outs = []
    for model in (plain, left):  # training mode: the batch norms use the batch's statistics
        out = model(x)
        (out * torch.linspace(-1.0, 2.0, out.numel()).view(out.shape)).sum().backward()
        outs.append(out.detach())
    parameters = [dict(model.named_parameters()) for model in (plain, left)]
    skipped = [name for name, p in parameters[1].items() if p.grad is None]
    assert len(skipped) == found[net] and all(name.endswith("bias") for name in skipped)
    # every output and gradient but the left-out biases' (zero up to rounding in plain),
    # against the largest of its kind
    scale = max(float(p.grad.abs().max()) for p in parameters[0].values())
    worst[net] = max([float((outs[1] - outs[0]).abs().max() / outs[0].abs().max())] + [
        float((parameters[1][name].grad - p.grad).abs().max()) / scale
        for name, p in parameters[0].items() if name not in skipped])
print("RESULTS " + json.dumps({"found": found, "worst": worst}))
"""


def test_bias_skip_reference_computes_the_same_outputs_and_gradients() -> None:
    pytest.importorskip("torch", reason="install the benchmark extra (torch)")
    results = _under_torch(BIAS_SKIP)
    # the convolutions that a batch norm alone reads: ResNet20 v1's stem and both of each
    # unit's (not the two shortcut projections), ResNet110 v2's stem and the first two of each
    # of its 36 units, DenseNet-BC-100's 48 bottlenecks
    assert results["found"] == {"resnet20_v1": 19, "resnet110_v2": 73,
                                "densenet_bc_100_k12": 48}
    assert max(results["worst"].values()) < 1e-10, results


L2 = r"""
import json
import torch
from torch import nn
from benchmarks.throughput import l2_groups
from benchmarks.torch_reference import build

x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
labels = torch.tensor([0, 1, 2, 3])
weights = {}
for decayed in (True, False):
    torch.manual_seed(0)
    model = build("resnet20_v1", 10)
    kernels = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    groups = l2_groups("resnet20_v1", model) if decayed else [{"params": model.parameters()}]
    optimizer = torch.optim.SGD(groups, 0.1)  # SGD: the update is the gradient itself
    loss = nn.functional.cross_entropy(model(x), labels)
    if not decayed:  # the Keras net's penalty, 1e-4 * sum(w ** 2) on every kernel, in the loss
        loss = loss + sum(1e-4 * kernel.square().sum() for kernel in kernels)
    loss.backward()
    optimizer.step()
    weights[str(decayed)] = [p.detach().clone() for p in model.parameters()]
    if decayed:
        decays = sorted(group["weight_decay"] for group in optimizer.param_groups)
worst = max(float((a - b).abs().max()) for a, b in zip(weights["True"], weights["False"],
                                                        strict=True))
print("RESULTS " + json.dumps({"worst": worst, "decays": decays, "kernels": len(kernels)}))
"""


def test_l2_reference_decays_the_kernels_as_the_keras_nets_penalty() -> None:
    pytest.importorskip("torch", reason="install the benchmark extra (torch)")
    results = _under_torch(L2)
    # weight decay 2 * 1e-4 on the 21 kernels, none on the rest: one SGD step moves every
    # weight as the penalty in the loss does, to float32 rounding
    assert results["kernels"] == 21
    assert results["decays"] == [0.0, 2e-4]
    assert results["worst"] < 1e-6, results
