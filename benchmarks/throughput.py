"""Training throughput of this project's training path against a PyTorch reference, in one run.

    python benchmarks/throughput.py                       # the four nets, batch 128, CPU
    python benchmarks/throughput.py --nets resnet20_v1 --steps 30 --json out.json
    KERAS_BACKEND=jax python benchmarks/throughput.py --device gpu   # see docs/benchmarks.md

Ours is what ``python -m tasks.train`` runs: the registry net wrapped by
``tasks.modeling.build_training_model`` (uint8 input, normalisation, flip and a 4-pixel
crop/translate on the device), Adam, the speed settings of ``tasks.speed`` and batches from
``tasks.modeling.EpochShuffledArrays``. The reference is the same architecture in PyTorch
(benchmarks/torch_reference.py, parameter counts checked equal), with the same in-memory uint8
data, the same normalisation and augmentation done on the device, and Adam.

Every measurement runs in its own process (dtype policies, thread pools and compilation caches
do not leak between them) and times whole epochs of ``--steps`` batches after a warm-up epoch
that pays for tracing and compilation. Ours and the reference alternate, ``--repeat`` times, and
each configuration's best epoch counts. The ratio printed is our best configuration over the
reference's best; ``ratio (default)`` uses the configuration params.yaml's defaults resolve to.

On a shared machine the host's speed can drift by 10-20% between processes, more than the
difference being measured. ``--interleaved`` (CPU, ``KERAS_BACKEND=torch``) runs both sides in
one process instead: our ``fit`` with params.yaml's settings, and after each of its steps one
step of each reference configuration. It compares median step times and prints the ratio with
a 95% bootstrap interval over the paired steps, and ours against each configuration.

A configuration names the reference's options joined by ``+``: ``float32`` or ``bf16``,
``channels_last``, ``inplace`` (ReLUs and residual sums in place), ``fused-adam``, ``compile``,
``l2`` (the Keras net's L2 penalty on the convolution kernels, as Adam's weight decay on them),
and ``keras-same``: padded as Keras' ``padding="same"`` does, which in ResNet v1's two strided
3x3 convolutions is not PyTorch's symmetric padding, so that the reference computes the Keras
net's own function (benchmarks/torch_reference.py). ``bias-sum`` is not a PyTorch option: it
gives the reference the hand-written bias gradient of our training path (a sum of the output
gradient instead of oneDNN's reduction; benchmarks/conv_backward.py), to show what that is worth
to PyTorch too; ``bias-skip`` likewise runs a convolution that a batch norm alone reads without
its bias, as our training path does. The summaries print ours against these, but do not count
them among the configurations the best one is chosen from.

    KERAS_BACKEND=torch python benchmarks/throughput.py --nets resnet20_v1 --interleaved \
        --steps 20 --epochs 3 --torch-configs float32,float32+channels_last

Needs torch (``pip install -e .[benchmark]``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: tasks/ and nets/ import
NETS = ("resnet20_v1", "resnet56_v1", "resnet110_v2", "densenet_bc_100_k12")
SHAPE, CLASSES = (32, 32, 3), 10

# (name, precision, jit_compile, steps_per_execution[, fused_kernels]); "params" is what
# params.yaml resolves to; fused_kernels (default true) matters under the torch backend only
KERAS_CONFIGS = {
    "cpu": [("params", None, None, None), ("float32", "float32", False, 1),
            ("float32-unfused", "float32", False, 1, False),
            ("float32+xla", "float32", True, 1), ("bf16", "mixed_bfloat16", False, 1),
            ("bf16+xla", "mixed_bfloat16", True, 1)],
    "gpu": [("params", None, None, None), ("float32", "float32", True, 1),
            ("bf16", "mixed_bfloat16", True, 1), ("bf16 spe8", "mixed_bfloat16", True, 8)],
}
TORCH_CONFIGS = {
    "cpu": ["float32", "float32+channels_last", "float32+channels_last+inplace",
            "float32+channels_last+inplace+fused-adam",
            "float32+channels_last+inplace+fused-adam+keras-same", "bf16+channels_last",
            "bf16+channels_last+inplace+fused-adam", "bf16+channels_last+inplace+fused-adam+l2",
            "float32+channels_last+compile"],
    "gpu": ["float32", "bf16+channels_last", "bf16+channels_last+compile",
            "bf16+channels_last+compile-cudagraphs"],
}


def synthetic(images: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (images, *SHAPE), dtype=np.uint8),
            rng.integers(0, CLASSES, images).astype(np.int64))


def ours(net: str, speed=None):
    """Our training model for ``net``, compiled as the train stage compiles it.

    ``speed``: a ``SpeedParams`` (default: params.yaml's ``speed``). Returns the model and the
    resolved speed settings. Used by memory.py too.
    """
    import keras
    import numpy as np

    import nets
    from tasks.config import load_params
    from tasks.modeling import build_training_model
    from tasks.speed import apply, compile_options

    resolved = apply(speed or load_params(ROOT / "params.yaml").speed)
    keras.utils.set_random_seed(0)
    model = build_training_model(
        nets.create_model(net, input_shape=SHAPE, num_classes=CLASSES),
        np.full(SHAPE, 0.47, np.float32), np.full(SHAPE, 0.25, np.float32),
        flip=True, crop_pad=4, seed=0,
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  **compile_options(resolved))
    return model, resolved


def run_keras(net: str, config: str, batch: int, images: int, epochs: int) -> dict:
    """One of our configurations: the epochs' times after the warm-up epoch."""
    import keras
    import numpy as np

    from tasks.config import SpeedParams
    from tasks.modeling import EpochShuffledArrays

    name, precision, jit, spe, *fused = next(c for c in KERAS_CONFIGS[_device()]
                                             if c[0] == config)
    speed = None if name == "params" else SpeedParams(
        precision=precision, jit_compile=jit, steps_per_execution=spe,
        fused_kernels=fused[0] if fused else True)
    model, resolved = ours(net, speed)
    x, y = synthetic(images)
    times = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            float(logs["loss"])  # the epoch's work is done once its loss is on the host
            times.append(time.perf_counter() - self.started)

    model.fit(EpochShuffledArrays(x, y, batch, 0), epochs=epochs + 1, verbose=0,
              callbacks=[Timer()])
    return {"times": times[1:], "resolved": resolved,
            "parameters": int(sum(np.prod(w.shape) for w in model.trainable_weights))}


def reference(net: str, config: str, batch: int, images: int, device: str):
    """The reference's training for ``net`` in one configuration: ``(epoch_steps, parameters)``
    where ``epoch_steps()`` yields once after each step of one shuffled epoch, the step's
    work done (on a GPU, queued: the caller synchronises)."""
    import torch

    from benchmarks.torch_reference import (
        build,
        leave_biases_to_batch_norms,
        parameter_count,
        sum_bias_gradients,
    )

    torch.manual_seed(0)
    # "+inplace": ReLUs and residual sums in place, as torchvision's ResNets; "+keras-same":
    # padded as Keras' "same" (the Keras net's own function; benchmarks/torch_reference.py)
    model = build(net, CLASSES, inplace="inplace" in config,
                  same="keras-same" in config).to(device)
    if "bias-sum" in config:  # ours' bias gradient, hand-written (not a PyTorch option)
        sum_bias_gradients(model)
    if "bias-skip" in config:  # ours' biases left to the batch norms, hand-written too
        leave_biases_to_batch_norms(model)
    channels_last = "channels_last" in config
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model = model
    if "compile" in config:  # "reduce-overhead" replays the net's kernels as a CUDA graph
        step_model = torch.compile(model, mode="reduce-overhead" if "cudagraphs" in config
                                   else None)
    # "+fused-adam": torch's one-kernel Adam (on a CPU torch's default is a loop over the
    # weights); ours updates its float32 weights with that kernel too (speed.fused_kernels)
    groups = [{"params": list(model.parameters())}]
    if "l2" in config.split("+"):  # the Keras net's L2 penalty, as a PyTorch user writes it
        groups = l2_groups(net, model)
    optimizer = torch.optim.Adam(groups, 1e-3, fused="fused-adam" in config or None)
    x_host, y_host = synthetic(images)
    steps = -(-images // batch)
    x_all = torch.from_numpy(x_host).to(device)
    y_all = torch.from_numpy(y_host).to(device)
    mean = torch.full((1, 3, 32, 32), 0.47, device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled="bf16" in config)
    rows = torch.arange(32, device=device)

    def augment(images: torch.Tensor) -> torch.Tensor:
        # the same work as ours: flip half, then shift by up to 4 pixels with zero fill
        n = images.shape[0]
        flip = torch.rand(n, device=device) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
        padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
        dy = torch.randint(0, 9, (n, 1, 1), device=device)
        dx = torch.randint(0, 9, (n, 1, 1), device=device)
        iy = (rows[None, :, None] + dy).expand(n, 32, 32)
        ix = (rows[None, None, :] + dx).expand(n, 32, 32)
        b = torch.arange(n, device=device)[:, None, None]
        return padded.permute(0, 2, 3, 1)[b, iy, ix].permute(0, 3, 1, 2)

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images = (images.permute(0, 3, 1, 2).float() / 255.0 - mean) / 0.25
        images = augment(images)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast:
            loss = torch.nn.functional.cross_entropy(step_model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    def epoch_steps():
        order = torch.randperm(len(x_all), device=device)
        for index in range(steps):
            rows_ = order[index * batch:(index + 1) * batch]
            yield step(x_all[rows_], y_all[rows_])

    return epoch_steps, parameter_count(model)


def l2_groups(net: str, model) -> list[dict]:
    """Adam's parameter groups that give the reference the Keras net's L2 penalty: weight
    decay ``2 * l2`` on every convolution kernel (Adam's coupled decay adds ``wd * w`` to the
    gradient, which is the gradient of ``l2 * sum(w ** 2)``), none on the rest. Checks that
    the Keras net penalises as many kernels as the reference has convolutions, with one
    factor; a net without penalties gets no decay."""
    import keras
    from torch import nn

    import nets

    factors = [variable.regularizer.get_config()["l2"]
               for variable in nets.create_model(net, input_shape=SHAPE,
                                                 num_classes=CLASSES).trainable_weights
               if isinstance(variable.regularizer, keras.regularizers.L2)]
    kernels = [module.weight for module in model.modules() if isinstance(module, nn.Conv2d)]
    if not factors:  # a net without L2 (DenseNet-BC as the book builds it): nothing to add
        return [{"params": list(model.parameters())}]
    if len(set(factors)) != 1 or len(factors) != len(kernels):
        raise SystemExit(f"error: +l2 needs one L2 factor on each of the {len(kernels)} "
                         f"convolution kernels of {net}; the Keras net has {len(factors)} "
                         f"penalties with factors {sorted(set(factors))}")
    chosen = {id(kernel) for kernel in kernels}
    return [{"params": kernels, "weight_decay": 2.0 * factors[0]},
            {"params": [p for p in model.parameters() if id(p) not in chosen],
             "weight_decay": 0.0}]


def run_torch(net: str, config: str, batch: int, images: int, epochs: int) -> dict:
    import torch

    device = "cuda" if _device() == "gpu" else "cpu"
    epoch_steps, parameters = reference(net, config, batch, images, device)
    times = []
    for _ in range(epochs + 1):
        started = time.perf_counter()
        *_, loss = epoch_steps()
        float(loss)  # wait for the device
        times.append(time.perf_counter() - started)
    return {"times": times[1:], "parameters": parameters,
            "resolved": {"torch": torch.__version__, "threads": torch.get_num_threads()}}


def run_interleaved(net: str, configs: list[str], batch: int, images: int, epochs: int) -> dict:
    """Our steps and the reference's, one after another in one process (``--interleaved``).

    Our ``fit`` drives: after each of our steps, a callback runs one step of each reference
    configuration. A step's time runs from the end of the step before it to its own end, so
    ours includes what ``fit`` does between batches (fetching the batch, callbacks) and the
    reference's includes indexing its batch. Steps of the two sides that follow each other are
    at most a second apart: drift in the host's speed, which on a shared machine can exceed the
    difference being measured, falls on both alike. The warm-up epoch is not counted.
    """
    import keras
    import numpy as np
    import torch

    from tasks.modeling import EpochShuffledArrays

    if keras.backend.backend() != "torch":
        raise SystemExit("error: --interleaved runs both sides in one process, which needs "
                         "Keras' torch backend: set KERAS_BACKEND=torch")
    model, resolved = ours(net)
    built = {c: reference(net, c, batch, images, "cpu") for c in configs}
    iterators = {c: built[c][0]() for c in configs}
    times = {"ours": [], **{c: [] for c in configs}}

    def reference_step(config):
        try:
            next(iterators[config])
        except StopIteration:  # the reference's next epoch, reshuffled
            iterators[config] = built[config][0]()
            next(iterators[config])

    class Interleave(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.counted = epoch > 0
            self.last = time.perf_counter()

        def on_train_batch_end(self, batch_index, logs=None):
            now = time.perf_counter()
            if self.counted:
                times["ours"].append(now - self.last)
            for config in configs:
                reference_step(config)
                done = time.perf_counter()
                if self.counted:
                    times[config].append(done - now)
                now = done
            self.last = now

    x, y = synthetic(images)
    model.fit(EpochShuffledArrays(x, y, batch, 0), epochs=epochs + 1, verbose=0,
              callbacks=[Interleave()])
    return {"times": times, "resolved": resolved,
            "parameters": {"ours": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
                           **{c: built[c][1] for c in configs}},
            "torch": {"torch": torch.__version__, "threads": torch.get_num_threads()}}


def counted(config: str) -> bool:
    """Whether a reference configuration is one of PyTorch's own, and so a candidate for the
    best one that the ratio is taken against; ``bias-sum`` and ``bias-skip`` are our
    hand-written tricks."""
    return not {"bias-sum", "bias-skip"} & set(config.split("+"))


def candidates(configs) -> list:
    """The configurations the best reference is chosen from: PyTorch's own (:func:`counted`),
    or all of them where none is."""
    configs = list(configs)
    return [c for c in configs if counted(c)] or configs


def summarise_interleaved(result: dict, batch: int, seed: int = 0) -> dict:
    """Images/s from each side's median step, the ratio of ours to the reference's best, and
    a 95% bootstrap interval of that ratio over the paired steps."""
    import numpy as np

    times = {side: np.asarray(t) for side, t in result["times"].items()}
    medians = {side: float(np.median(t)) for side, t in times.items()}
    best = min(candidates(side for side in times if side != "ours"), key=medians.get)
    ratio = medians[best] / medians["ours"]
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(times["ours"]), (2000, len(times["ours"])))
    ratios = np.median(times[best][picks], axis=1) / np.median(times["ours"][picks], axis=1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return {"steps": len(times["ours"]), "best_reference": best, "ratio": ratio,
            "ratio_95": [float(low), float(high)],
            # ours against each configuration, the best one's being ``ratio``
            "ratios": {side: medians[side] / medians["ours"] for side in times if side != "ours"},
            "images_per_s": {side: batch / m for side, m in medians.items()},
            "median_step_s": medians}


def images_per_epoch(args) -> int:
    return args.images or args.batch * args.steps


def _device() -> str:
    return os.environ.get("DEEPNETS_BENCH_DEVICE", "cpu")


def worker(args) -> int:
    if args.worker == "interleaved":
        result = run_interleaved(args.nets, args.config.split(","), args.batch,
                                 images_per_epoch(args), args.epochs)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    runner = run_keras if args.worker == "keras" else run_torch
    result = runner(args.nets, args.config, args.batch, images_per_epoch(args), args.epochs)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def measure(impl: str, net: str, config: str, args) -> dict:
    command = [sys.executable, __file__, "--worker", impl, "--nets", net, "--config", config,
               "--batch", str(args.batch), "--steps", str(args.steps), "--images",
               str(args.images or 0), "--epochs",
               str(args.epochs), "--device", args.device]
    result = run_worker(command, args.device, f"{impl} {config}")
    if "error" not in result:
        best = min(result["times"])
        result["images_per_s"] = images_per_epoch(args) / best
        result["epoch_seconds"] = best
    return result


def run_worker(command: list[str], device: str, name: str) -> dict:
    """Run one measurement process; its ``RESULT`` line, or ``{"error": ...}`` with its tail."""
    env = {**os.environ, "DEEPNETS_BENCH_DEVICE": device, "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
    return {"error": f"{name} failed (exit {done.returncode}):\n{tail}"}


def versions() -> dict:
    found = {"python": platform.python_version()}
    for module in ("keras", "tensorflow", "jax", "torch", "numpy"):
        try:
            found[module] = __import__(module).__version__
        except ImportError:
            pass
    found["commit"] = commit()
    return found


def commit() -> str | None:
    """The checkout's commit, with ``-dirty`` when tracked files differ from it (None outside
    git): which code a saved result timed."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)

    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + ("-dirty" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nets", default=",".join(NETS), help="comma-separated registry names")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="batches per timed epoch")
    parser.add_argument("--images", type=int, help="images per timed epoch (overrides --steps; "
                        "50000 times a CIFAR-10 epoch)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs after the warm-up")
    parser.add_argument("--repeat", type=int, default=1, help="alternating rounds per config")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--keras-configs", help="comma-separated subset of our configurations")
    parser.add_argument("--torch-configs", help="comma-separated subset of the reference's")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--interleaved", action="store_true",
                        help="run ours (params.yaml's settings) and the reference in one process, "
                        "a step of each in turn; KERAS_BACKEND=torch, CPU only")
    parser.add_argument("--worker", choices=("keras", "torch", "interleaved"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    try:
        import torch  # noqa: F401
    except ImportError:
        print("error: the PyTorch reference needs torch: pip install -e .[benchmark]",
              file=sys.stderr)
        return 2
    keras_configs = [c[0] for c in KERAS_CONFIGS[args.device]]
    torch_configs = TORCH_CONFIGS[args.device]
    if args.keras_configs:
        keras_configs = args.keras_configs.split(",")
    if args.torch_configs:
        torch_configs = args.torch_configs.split(",")
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    if args.interleaved and (args.device != "cpu" or backend != "torch"):
        print("error: --interleaved needs KERAS_BACKEND=torch and --device cpu: both sides "
              "share one process and its torch", file=sys.stderr)
        return 2
    found = versions()
    print(f"{time.strftime('%Y-%m-%d')}  {platform.machine()}, {os.cpu_count()} CPUs, "
          f"device {args.device}, Keras backend {backend}, batch {args.batch}, "
          f"{images_per_epoch(args)} images per timed epoch; {found}", flush=True)
    report = {"date": time.strftime("%Y-%m-%d"), "device": args.device, "backend": backend,
              "batch": args.batch, "images_per_epoch": images_per_epoch(args),
              "versions": found, "nets": {}}
    if args.interleaved:
        return interleaved(args, torch_configs, report)
    failed = False
    for net in args.nets.split(","):
        results: dict[str, dict] = {}
        jobs = [("keras", c) for c in keras_configs] + [("torch", c) for c in torch_configs]
        for _ in range(args.repeat):
            for pair in _alternate(jobs):
                got = measure(*pair[:1], net, pair[1], args)
                key = f"{pair[0]}:{pair[1]}"
                if "error" in got:
                    print(got["error"], file=sys.stderr, flush=True)
                    failed = True
                    continue
                if key not in results or got["images_per_s"] > results[key]["images_per_s"]:
                    results[key] = got
                print(f"  {net:<20} {key:<34} {got['images_per_s']:9.1f} img/s "
                      f"{got['epoch_seconds']:8.2f} s/epoch  "
                      f"{got.get('resolved', {})}", flush=True)
        counts = {r["parameters"] for r in results.values()}
        if len(counts) > 1:
            print(f"error: {net}: trainable parameter counts differ between ours and the "
                  f"reference: {sorted(counts)}", file=sys.stderr)
            failed = True
        ours = {k: v for k, v in results.items() if k.startswith("keras:")}
        theirs = {k: v for k, v in results.items() if k.startswith("torch:")}
        chosen = candidates(k.removeprefix("torch:") for k in theirs)
        theirs = {f"torch:{c}": theirs[f"torch:{c}"] for c in chosen}
        summary = {"results": results}
        if ours and theirs:
            best_ours = max(ours, key=lambda k: ours[k]["images_per_s"])
            best_theirs = max(theirs, key=lambda k: theirs[k]["images_per_s"])
            ratio = ours[best_ours]["images_per_s"] / theirs[best_theirs]["images_per_s"]
            summary.update(best_ours=best_ours, best_reference=best_theirs, ratio=ratio)
            line = (f"{net}: ours {ours[best_ours]['images_per_s']:.1f} img/s ({best_ours}) / "
                    f"reference {theirs[best_theirs]['images_per_s']:.1f} img/s ({best_theirs}) "
                    f"= ratio {ratio:.2f}")
            if "keras:params" in ours:
                default = ours["keras:params"]["images_per_s"] / theirs[best_theirs]["images_per_s"]
                summary["ratio_default"] = default
                line += f"; ratio (default) {default:.2f}"
            print(line, flush=True)
        report["nets"][net] = summary
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if failed else 0


def interleaved(args, torch_configs: list[str], report: dict) -> int:
    failed = False
    for net in args.nets.split(","):
        command = [sys.executable, __file__, "--worker", "interleaved", "--nets", net,
                   "--config", ",".join(torch_configs), "--batch", str(args.batch), "--steps",
                   str(args.steps), "--images", str(args.images or 0), "--epochs",
                   str(args.epochs), "--device", args.device]
        result = run_worker(command, args.device, f"interleaved {net}")
        if "error" in result:
            print(result["error"], file=sys.stderr, flush=True)
            failed = True
            continue
        if len(set(result["parameters"].values())) > 1:
            print(f"error: {net}: trainable parameter counts differ between ours and the "
                  f"reference: {result['parameters']}", file=sys.stderr)
            failed = True
        summary = summarise_interleaved(result, args.batch)
        width = max(len(side) for side in summary["images_per_s"]) + len("torch:")
        for side, rate in summary["images_per_s"].items():
            name = "keras:params" if side == "ours" else f"torch:{side}"
            against = "" if side == "ours" else f"  ours / this {summary['ratios'][side]:.3f}"
            print(f"  {net:<20} {name:<{width}} {rate:9.1f} img/s "
                  f"{summary['median_step_s'][side] * 1000:8.1f} ms/step (median){against}",
                  flush=True)
        low, high = summary["ratio_95"]
        print(f"{net}: interleaved, {summary['steps']} steps of each: ours "
              f"{summary['images_per_s']['ours']:.1f} img/s / reference "
              f"{summary['images_per_s'][summary['best_reference']]:.1f} img/s "
              f"(torch:{summary['best_reference']}) = ratio {summary['ratio']:.3f}, 95% "
              f"interval {low:.3f} to {high:.3f}", flush=True)
        report["nets"][net] = {**summary, "times": result["times"],
                               "resolved": result["resolved"], "torch": result["torch"]}
    report["interleaved"] = True
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if failed else 0


def _alternate(jobs):
    """Ours and the reference's configurations interleaved, so drift hits both alike."""
    ours = [j for j in jobs if j[0] == "keras"]
    theirs = [j for j in jobs if j[0] == "torch"]
    out = []
    while ours or theirs:
        if ours:
            out.append(ours.pop(0))
        if theirs:
            out.append(theirs.pop(0))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
