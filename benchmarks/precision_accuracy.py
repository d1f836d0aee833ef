"""Does a speed setting change accuracy? Train the same recipe under each setting and seed.

    python benchmarks/precision_accuracy.py --source ../shared/datasets/cifar10-jpeg.tar.gz \\
        --epochs 15 --seeds 1,2 --precisions float32,mixed_bfloat16
    KERAS_BACKEND=jax python benchmarks/precision_accuracy.py --source ... (on a GPU)

Every run goes through ``tasks.train.train`` (the train stage's own function) with params.yaml's
values, except: the recipe (``--recipe``, default the paper's SGD recipe), the epochs (the step
schedule's milestones scale with them), the seed and ``speed.precision``. The data is an
image-folder archive, decoded once by ``tasks.datasets.read_imagefolder`` and prepared by
``tasks.preprocess.preprocess``. It prints each run's best validation accuracy and, per
setting, the mean and the spread over seeds: a setting changes accuracy beyond run-to-run noise
only if its mean sits outside the other's spread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: tasks/ and nets/ import


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, required=True, help="image-folder .tar.gz")
    parser.add_argument("--net", default="resnet20_v1")
    parser.add_argument("--recipe", default="paper")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--precisions", default="float32,mixed_bfloat16")
    parser.add_argument("--jit-compile", default="auto", help="speed.jit_compile for every run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if not args.source.exists():
        print(f"error: {args.source} not found; pass an image-folder archive with --source",
              file=sys.stderr)
        return 2

    import keras

    from tasks.config import parse_params
    from tasks.datasets import read_imagefolder
    from tasks.preprocess import preprocess
    from tasks.train import train

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    started = time.perf_counter()
    splits = read_imagefolder(args.source)
    print(f"decoded {len(splits.x_train)} training and {len(splits.x_test)} test images in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    jit = {"auto": "auto", "true": True, "false": False}[args.jit_compile.lower()]
    runs = []
    for precision in args.precisions.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            update = {**raw, "model": {**raw["model"], "names": [args.net]},
                      "train": {"recipe": args.recipe, "epochs": args.epochs, "seed": seed},
                      "speed": {**raw.get("speed", {}), "precision": precision,
                                "jit_compile": jit}}
            params = parse_params(update, ROOT / "params.yaml", args.net)
            prepared = preprocess(splits, params.preprocess)
            began = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                result = train(params, prepared, Path(tmp) / "model.keras", verbose=0)
            seconds = time.perf_counter() - began
            accuracy = max(result.history["val_accuracy"])
            runs.append({"precision": precision, "seed": seed, "best_val_accuracy": accuracy,
                         "last_val_accuracy": result.history["val_accuracy"][-1],
                         "seconds": seconds, "speed": result.speed})
            print(f"  {precision:<15} seed {seed}: best val_accuracy {accuracy:.4f}, last "
                  f"{result.history['val_accuracy'][-1]:.4f}, {seconds:.0f} s "
                  f"({seconds / args.epochs:.1f} s/epoch)", flush=True)
            keras.backend.clear_session()
    summary = {}
    for precision in args.precisions.split(","):
        values = [r["best_val_accuracy"] for r in runs if r["precision"] == precision]
        summary[precision] = {"mean": statistics.fmean(values), "min": min(values),
                              "max": max(values)}
        print(f"{precision:<15} mean {summary[precision]['mean']:.4f} "
              f"(min {min(values):.4f}, max {max(values):.4f}) over {len(values)} seed(s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"net": args.net, "recipe": args.recipe,
                                         "epochs": args.epochs, "runs": runs,
                                         "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
