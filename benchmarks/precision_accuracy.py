"""Does a speed setting change accuracy? Train the same recipe under each setting and seed.

    python benchmarks/precision_accuracy.py --source ../shared/datasets/cifar10-jpeg.tar.gz \\
        --epochs 15 --seeds 1,2 --precisions float32,mixed_bfloat16
    python benchmarks/precision_accuracy.py --source ... --compare jit_compile=true,false \\
        --train-images 8000 --test-images 2000 --epochs 6 --seeds 1,2,3
    KERAS_BACKEND=jax python benchmarks/precision_accuracy.py --source ... (on a GPU)
    python benchmarks/precision_accuracy.py --merge part-1.json part-2.json --json all.json

Every run goes through ``tasks.train.train`` (the train stage's own function) with params.yaml's
values, except: the recipe (``--recipe``, default the paper's SGD recipe), the epochs (the step
schedule's milestones scale with them), the seed and the compared ``speed`` key
(``--compare KEY=V1,V2,...``; ``--precisions V1,V2`` is ``--compare precision=V1,V2``). The
data is an image-folder archive, decoded once by ``tasks.datasets.read_imagefolder``, optionally
cut to a random subset of its training and test images (the same subset for every run), and
prepared by ``tasks.preprocess.preprocess``. It prints each run's best validation accuracy and,
per setting, the mean and the spread over seeds: a setting changes accuracy beyond run-to-run
noise only if its mean sits outside the other's spread.

``--json`` is rewritten after every run, so a run stopped part-way keeps what it finished.
``--merge`` combines the files of several such runs (say, one per seed, run side by side on one
GPU) into one summary; they must agree on the net, recipe, epochs, images and backend.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: tasks/ and nets/ import


def parse_compare(text: str) -> tuple[str, list[Any]]:
    """``"jit_compile=true,false"`` -> ``("jit_compile", [True, False])``: a key of params.yaml's
    ``speed`` section and its values, each read as YAML reads it."""
    from tasks.config import SpeedParams

    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or not values.strip():
        raise ValueError(f"--compare {text!r}: expected KEY=V1,V2 (e.g. jit_compile=true,false)")
    if key not in SpeedParams.model_fields:
        raise ValueError(f"--compare {text!r}: {key!r} is not a speed setting; pick one of "
                         f"{', '.join(SpeedParams.model_fields)}")
    return key, [yaml.safe_load(value.strip()) for value in values.split(",")]


def subset(splits: Any, train_images: int | None, test_images: int | None, seed: int = 0) -> Any:
    """The same random subset of the training and test images for every run (``None``: all)."""
    import dataclasses

    import numpy as np

    rng = np.random.default_rng(seed)
    cut = {}
    for split, count in (("train", train_images), ("test", test_images)):
        if count is None:
            continue
        x, y = getattr(splits, f"x_{split}"), getattr(splits, f"y_{split}")
        if not 0 < count <= len(x):
            raise ValueError(f"--{split}-images {count}: the archive has {len(x)} {split} images")
        keep = np.sort(rng.permutation(len(x))[:count])
        cut[f"x_{split}"], cut[f"y_{split}"] = x[keep], y[keep]
    return dataclasses.replace(splits, **cut)


# what every merged file must agree on
SAME = ("net", "recipe", "epochs", "train_images", "test_images", "backend")


def describe(run: dict[str, Any], epochs: int) -> str:
    """One run's line: its setting, seed, best and last validation accuracy and time."""
    return (f"  {run['setting']:<28} seed {run['seed']}: best val_accuracy "
            f"{run['best_val_accuracy']:.4f}, last {run['last_val_accuracy']:.4f}, "
            f"{run['seconds']:.0f} s ({run['seconds'] / epochs:.1f} s/epoch)")


def summarize(runs: list[dict[str, Any]], echo: bool = True) -> dict[str, dict[str, float]]:
    """Per setting, in order of first appearance: the mean, min and max of the best validation
    accuracy over its seeds (printed too, with ``echo``)."""
    summary = {}
    for label in dict.fromkeys(r["setting"] for r in runs):
        values = [r["best_val_accuracy"] for r in runs if r["setting"] == label]
        summary[label] = {"mean": statistics.fmean(values), "min": min(values),
                          "max": max(values)}
        if echo:
            print(f"{label:<28} mean {summary[label]['mean']:.4f} (min {min(values):.4f}, "
                  f"max {max(values):.4f}) over {len(values)} seed(s)")
    return summary


def merge(paths: list[Path], out: Path | None) -> int:
    """Combine the ``--json`` files of several runs into one summary (and ``out``)."""
    from tasks.io import write_json

    merged: dict[str, Any] = {}
    runs: list[dict[str, Any]] = []
    for path in paths:
        try:
            part = json.loads(path.read_text())
            found = {key: part[key] for key in SAME}
            part_runs = part["runs"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            print(f"error: {path}: not a result of this script ({error!r}); pass the files its "
                  "--json wrote", file=sys.stderr)
            return 2
        if merged and found != {key: merged[key] for key in SAME}:
            differ = [key for key in SAME if found[key] != merged[key]]
            print(f"error: {path}: {', '.join(f'{k} {found[k]!r}' for k in differ)} where "
                  f"{paths[0]} has {', '.join(repr(merged[k]) for k in differ)}; merge only "
                  "runs of one comparison", file=sys.stderr)
            return 2
        merged.update(found)
        for run in part_runs:
            if any((r["setting"], r["seed"]) == (run["setting"], run["seed"]) for r in runs):
                print(f"error: {path}: {run['setting']} seed {run['seed']} is also in an "
                      "earlier file; each setting and seed may appear once", file=sys.stderr)
                return 2
            runs.append(run)
            print(f"{describe(run, found['epochs'])} from {path.name}")
    if not runs:
        print("error: the files hold no finished run", file=sys.stderr)
        return 1
    summary = summarize(runs)
    if out:
        write_json(out, {**merged, "runs": runs, "summary": summary,
                         "merged_from": [str(path) for path in paths]})
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, help="image-folder .tar.gz (needed unless --merge)")
    parser.add_argument("--net", default="resnet20_v1")
    parser.add_argument("--recipe", default="paper")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--precisions", default="float32,mixed_bfloat16",
                        help="shorthand for --compare precision=...")
    parser.add_argument("--compare", help="KEY=V1,V2: the speed setting to compare "
                        "(e.g. jit_compile=true,false); overrides --precisions")
    parser.add_argument("--jit-compile", default="auto", help="speed.jit_compile for every run")
    parser.add_argument("--train-images", type=int, help="a random subset of the training images")
    parser.add_argument("--test-images", type=int, help="a random subset of the test images")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--progress", action="store_true",
                        help="print a line per epoch (Keras' verbose=2)")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                        help="combine the --json files of earlier runs into one summary")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.json)
    if args.source is None:
        print("error: --source is required: the image-folder .tar.gz to train on (or --merge "
              "FILES to combine earlier results)", file=sys.stderr)
        return 2
    if not args.source.exists():
        print(f"error: {args.source} not found; pass an image-folder archive with --source",
              file=sys.stderr)
        return 2
    try:
        key, values = parse_compare(args.compare or f"precision={args.precisions}")
        try:
            seeds = [int(seed) for seed in args.seeds.split(",")]
        except ValueError:
            raise ValueError(f"--seeds {args.seeds!r}: expected whole numbers separated by "
                             "commas (e.g. 1,2,3)") from None
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from tasks.config import ParamsError, parse_params

    # every run's params, validated before minutes of decoding and training
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    jit = {"auto": "auto", "true": True, "false": False}[args.jit_compile.lower()]
    labels = [f"{key}={json.dumps(value) if not isinstance(value, str) else value}"
              for value in values]
    planned = []
    for label, value in zip(labels, values, strict=True):
        for seed in seeds:
            update = {**raw, "model": {**raw["model"], "names": [args.net]},
                      "train": {"recipe": args.recipe, "epochs": args.epochs, "seed": seed},
                      "speed": {**raw.get("speed", {}), "jit_compile": jit, key: value}}
            try:
                planned.append((label, seed, parse_params(update, ROOT / "params.yaml", args.net)))
            except ParamsError as error:
                print(f"error: --compare {key}={value}: {error}", file=sys.stderr)
                return 2

    import keras

    from tasks.datasets import read_imagefolder
    from tasks.preprocess import preprocess
    from tasks.train import train

    started = time.perf_counter()
    splits = read_imagefolder(args.source)
    print(f"decoded {len(splits.x_train)} training and {len(splits.x_test)} test images in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    try:
        splits = subset(splits, args.train_images, args.test_images)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.train_images or args.test_images:
        print(f"using {len(splits.x_train)} training and {len(splits.x_test)} test images",
              flush=True)
    runs = []
    prepared_by = {}  # the runs differ in speed settings only: prepare the data once
    for label, seed, params in planned:
        recipe = params.preprocess.model_dump_json()
        if recipe not in prepared_by:
            prepared_by[recipe] = preprocess(splits, params.preprocess)
        prepared = prepared_by[recipe]
        began = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            result = train(params, prepared, Path(tmp) / "model.keras",
                           verbose=2 if args.progress else 0)
        seconds = time.perf_counter() - began
        runs.append({"setting": label, "seed": seed,
                     "best_val_accuracy": max(result.history["val_accuracy"]),
                     "last_val_accuracy": result.history["val_accuracy"][-1],
                     "seconds": seconds, "speed": result.speed})
        print(describe(runs[-1], args.epochs), flush=True)
        keras.backend.clear_session()
        if args.json:  # after every run: a run stopped part-way keeps what it finished
            from tasks.io import write_json

            write_json(args.json, {
                "net": args.net, "recipe": args.recipe, "epochs": args.epochs,
                "train_images": len(splits.x_train), "test_images": len(splits.x_test),
                "backend": keras.backend.backend(), "runs": runs,
                "summary": summarize(runs, echo=False)})
    summarize(runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
