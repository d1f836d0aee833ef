"""What the train stage's own loop costs on top of the bare training loop, in one run.

    python benchmarks/train_stage.py                               # ResNet20 v1, CPU
    KERAS_BACKEND=jax python benchmarks/train_stage.py --device gpu --images 50000 --val 10000

``throughput.py`` times the training model in a bare ``fit`` (a timer callback only). A user's
run goes through ``tasks.train.train``: the recipe's optimizer and learning-rate callbacks, the
best-checkpoint save, the non-finite-loss check, per-epoch validation and, where the recipe asks,
activation statistics. This script times, each in its own process and after a warm-up epoch:

- ``bare``: throughput.py's loop (params.yaml's speed settings, Adam, no validation);
- ``stage``: ``train()`` with params.yaml and ``--recipe`` (default: the paper's), at ``--batch``;
  its epoch time is split into training and the rest (validation, then the epoch-end
  callbacks: the checkpoint save and the like);
- ``stage+batch-hook``: the same with one more callback that reads each batch's loss on the
  host, as any callback with a per-batch hook makes Keras do (it turns off Keras' asynchronous
  callback dispatch); the train stage's own callbacks avoid this;
- ``stage+activation-stats``: the same with ``train.activation_stats: true``.

It prints images/s of each and the ratio of the stage's training part to the bare loop's
(1.0: the stage adds nothing to training; the rest is reported beside it). Data: random uint8
images of CIFAR-10's shape.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: tasks/ and nets/ import
CONFIGS = ("bare", "stage", "stage+batch-hook", "stage+activation-stats")


def run_stage(args, config: str) -> dict:
    import keras
    import numpy as np
    import yaml

    from benchmarks.throughput import CLASSES, SHAPE, synthetic
    from tasks.config import parse_params
    from tasks.preprocess import Prepared
    from tasks.train import train

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    overrides = {"recipe": args.recipe, "epochs": args.epochs + 1, "batch_size": args.batch,
                 "activation_stats": config == "stage+activation-stats"}
    update = {**raw, "model": {**raw["model"], "names": [args.net]},
              "train": {**raw["train"], **overrides}}
    params = parse_params(update, ROOT / "params.yaml", args.net)
    x, y = synthetic(args.images)
    x_val, y_val = synthetic(args.val, seed=1)
    prepared = Prepared(x, y, x_val, y_val, x_val, y_val,
                        np.full(SHAPE, 120.0, np.float32), np.full(SHAPE, 64.0, np.float32),
                        [str(c) for c in range(CLASSES)], params.train.normalization or
                        params.preprocess.normalization, "test")
    times: list[float] = []
    validation: list[float] = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_test_begin(self, logs=None):
            # training steps are dispatched asynchronously: wait until the last one is done
            keras.ops.convert_to_numpy(self.model.trainable_weights[-1])
            self.trained = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            float(logs["loss"])
            now = time.perf_counter()
            times.append(now - self.started)
            validation.append(now - self.trained)

    class BatchHook(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            float(logs["loss"])

    extra = [Timer()] + ([BatchHook()] if config == "stage+batch-hook" else [])
    fit = keras.Model.fit

    def fit_with_timer(self, *a, callbacks=None, **kw):
        return fit(self, *a, callbacks=[*(callbacks or []), *extra], **kw)

    keras.Model.fit = fit_with_timer  # the stage's fit, the timer last: it counts the others
    with tempfile.TemporaryDirectory() as tmp:
        result = train(params, prepared, Path(tmp) / "model.keras", verbose=0)
    return {"times": times[1:], "validation": validation[1:], "resolved": result.speed}


def worker(args) -> int:
    if args.config == "bare":
        from benchmarks.throughput import run_keras

        result = run_keras(args.net, "params", args.batch, args.images, args.epochs)
        result["validation"] = [0.0] * len(result["times"])
    else:
        result = run_stage(args, args.config)
    print("RESULT " + json.dumps({k: result[k] for k in ("times", "validation", "resolved")}),
          flush=True)
    return 0


def measure(config: str, args) -> dict:
    command = [sys.executable, __file__, "--worker", "--config", config, "--net", args.net,
               "--batch", str(args.batch), "--images", str(args.images), "--val", str(args.val),
               "--epochs", str(args.epochs), "--recipe", args.recipe, "--device", args.device]
    from benchmarks.throughput import run_worker

    result = run_worker(command, args.device, config)
    if "error" not in result:
        best = min(range(len(result["times"])), key=lambda i: result["times"][i])
        result["epoch_seconds"] = result["times"][best]
        result["validation_seconds"] = result["validation"][best]
        result["train_seconds"] = result["times"][best] - result["validation"][best]
        result["images_per_s"] = args.images / result["train_seconds"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--net", default="resnet20_v1")
    parser.add_argument("--recipe", default="paper")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--images", type=int, default=1536, help="training images per epoch")
    parser.add_argument("--val", type=int, default=512, help="validation images")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs after the warm-up")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated subset of {', '.join(CONFIGS)}")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    configs = args.configs.split(",")
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        print(f"error: --configs: unknown {unknown}; choose from {', '.join(CONFIGS)}",
              file=sys.stderr)
        return 2
    from benchmarks.throughput import versions

    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    found = versions()
    print(f"{time.strftime('%Y-%m-%d')}  {args.net}, device {args.device}, Keras backend "
          f"{backend}, recipe {args.recipe}, batch {args.batch}, {args.images} training and "
          f"{args.val} validation images per epoch; {found}", flush=True)
    results, failed = {}, False
    for config in configs:
        got = measure(config, args)
        if "error" in got:
            print(got["error"], file=sys.stderr, flush=True)
            failed = True
            continue
        results[config] = got
        print(f"  {config:<24} {got['images_per_s']:9.1f} img/s  train {got['train_seconds']:7.2f}"
              f" s + validation etc. {got['validation_seconds']:6.2f} s per epoch  "
              f"{got['resolved']}", flush=True)
    report = {"date": time.strftime("%Y-%m-%d"), "net": args.net, "device": args.device,
              "backend": backend, "recipe": args.recipe, "batch": args.batch,
              "images": args.images, "val": args.val, "versions": found,
              "results": results}
    if "bare" in results:
        for config, got in results.items():
            if config != "bare":
                ratio = got["images_per_s"] / results["bare"]["images_per_s"]
                report.setdefault("ratios", {})[config] = ratio
                print(f"{config} / bare (training part): ratio {ratio:.2f}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
