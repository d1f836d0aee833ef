"""Time a biased convolution's forward and backward pass: torch's own against the training path's.

    KERAS_BACKEND=torch python benchmarks/conv_backward.py             # ResNet20 v1's layers
    KERAS_BACKEND=torch python benchmarks/conv_backward.py --batch 64 --repeat 60
    KERAS_BACKEND=torch python benchmarks/conv_backward.py --dtype bfloat16

On a CPU, torch's convolution backward asks oneDNN for the bias gradient together with the
kernel's. Under ``speed.fused_kernels`` the training path (``tasks.torch_kernels.BiasedConv``)
asks for the input and kernel gradients alone and sums the output gradient for the bias. For
each of ResNet20 v1's convolution shapes this times both, alternating call by call on the same
tensors, checks that their gradients agree, and prints the ratio of the medians (torch's time
over ours: above 1 means ours is faster). The last line weights each shape by how often
ResNet20 v1 runs it in one training step.

``--dtype bfloat16`` times them as mixed_bfloat16 runs them: a bfloat16 input and gradient,
the float32 kernel and bias cast to bfloat16 in each call. The training path takes
``BiasedConv`` for float32 only; this shows why.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (input channels, output channels, input size after padding, kernel, stride, input needs a
# gradient, layers of this shape in ResNet20 v1)
RESNET20_V1 = [
    (3, 16, 32, 3, 1, False, 1),
    (16, 16, 32, 3, 1, True, 6),
    (16, 32, 33, 3, 2, True, 1),  # Keras' "same" pads 32 to 33 at the bottom/right
    (16, 32, 32, 1, 2, True, 1),
    (32, 32, 16, 3, 1, True, 5),
    (32, 64, 17, 3, 2, True, 1),
    (32, 64, 16, 1, 2, True, 1),
    (64, 64, 8, 3, 1, True, 5),
]


def time_shape(torch, torch_kernels, batch: int, repeat: int, cin: int, cout: int, size: int,
               k: int, stride: int, input_grad: bool, dtype) -> dict[str, float]:
    """Median ms of torch's own biased convolution and of ours, forward and backward, timed
    call by call in turn, after checking that their gradients agree."""
    channels_last = torch.channels_last
    x = torch.randn(batch, cin, size, size, dtype=dtype).contiguous(memory_format=channels_last)
    x.requires_grad_(input_grad)
    kernel = torch.randn(cout, cin, k, k).contiguous(memory_format=channels_last)
    kernel.requires_grad_()
    bias = torch.randn(cout, requires_grad=True)
    padding = (k // 2, k // 2) if stride == 1 else (0, 0)
    out = (size + 2 * padding[0] - k) // stride + 1
    grad = torch.randn(batch, cout, out, out, dtype=dtype).contiguous(
        memory_format=channels_last)

    def weights():  # as the training path casts them under mixed precision (a no-op in float32)
        return kernel.to(dtype=dtype, memory_format=channels_last), bias.to(dtype)

    def torch_own():
        torch.nn.functional.conv2d(x, *weights(), (stride, stride), padding).backward(grad)

    def ours():
        torch_kernels.BiasedConv.apply(x, *weights(), (stride, stride), padding, (1, 1),
                                       1).backward(grad)

    runs = {"torch": torch_own, "ours": ours}
    gradients = {}
    for name, run in runs.items():
        for tensor in (x, kernel, bias):
            tensor.grad = None
        run()
        gradients[name] = [t.grad for t in (x, kernel, bias) if t.grad is not None]
    # bfloat16 keeps 8 bits: sums rounded in another order may differ in the last of them
    rtol = 1e-4 if dtype is torch.float32 else 2e-2
    for mine, theirs in zip(gradients["ours"], gradients["torch"], strict=True):
        scale = float(theirs.abs().max())
        if not torch.allclose(mine, theirs, rtol=rtol, atol=rtol / 10 * scale):
            raise SystemExit(f"error: gradients differ for {cin}->{cout} at {size}x{size}")
    times = {name: [] for name in runs}
    for _ in range(3):
        torch_own()
        ours()
    for _ in range(repeat):
        for name, run in runs.items():
            for tensor in (x, kernel, bias):
                tensor.grad = None
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=30, help="timed calls of each (default 30)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the input's and gradient's dtype (bfloat16: as mixed_bfloat16)")
    args = parser.parse_args(argv)
    if os.environ.get("KERAS_BACKEND") != "torch":
        raise SystemExit("error: the training path's convolution is Keras' torch backend's: "
                         "run with KERAS_BACKEND=torch")
    import torch

    from tasks import torch_kernels

    if not torch_kernels.install():
        raise SystemExit("error: tasks.torch_kernels did not install on this Keras release")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.dtype}, forward and backward of one convolution (ms, median)")
    print(f"  {'shape':<34} {'torch':>8} {'ours':>8} {'torch / ours':>13}")
    totals = {"torch": 0.0, "ours": 0.0}
    for cin, cout, size, k, stride, input_grad, count in RESNET20_V1:
        medians = time_shape(torch, torch_kernels, args.batch, args.repeat, cin, cout, size, k,
                             stride, input_grad, dtype)
        for name in totals:
            totals[name] += count * medians[name]
        shape = f"{cin}->{cout} {k}x{k}/{stride} at {size}x{size} (x{count})"
        print(f"  {shape:<34} {medians['torch']:8.2f} {medians['ours']:8.2f} "
              f"{medians['torch'] / medians['ours']:13.3f}")
    print(f"  {'one ResNet20 v1 step, all layers':<34} {totals['torch']:8.2f} {totals['ours']:8.2f}"
          f" {totals['torch'] / totals['ours']:13.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
