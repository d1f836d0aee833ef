"""Preprocess stage: decode the raw download once into uint8 arrays, split validation, compute statistics.

The arrays stay uint8 (a quarter of the memory of float32, and the form the exported model
accepts); scaling to [0, 1] and mean subtraction are applied by the first layers of the model,
built from the statistics written here (see :mod:`tasks.modeling`), so training, evaluation and
the exported model share one implementation of the transform.

Outputs (in ``--out``):
    data.npz     x_train, y_train, x_val, y_val, x_test, y_test (uint8 images, int64 labels)
    stats.npz    mean and std in [0, 1] units: per pixel (H, W, C) or per channel (C,)
    stats.json   normalization mode, shapes, class names, split sizes, data checksum
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.config import PreprocessParams, load_params_or_exit
from tasks.io import atomic_dir, read_json, write_json


@dataclass
class Prepared:
    """Arrays ready for training plus the input statistics."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    class_names: list[str]
    normalization: str
    validation: str


def input_statistics(x: np.ndarray, normalization: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of uint8 images in [0, 1] units.

    Args:
        x: uint8 images (N, H, W, C).
        normalization: "pixel_mean" (mean per pixel, std of 1: the book subtracts the mean
            only), "channel_standardize" (mean and std per channel) or "scale" (0 and 1).

    Returns:
        (mean, std) as float32, shaped (H, W, C) for pixel_mean and (C,) otherwise.
    """
    channels = x.shape[-1]
    if normalization == "pixel_mean":
        mean = x.mean(axis=0, dtype=np.float64) / 255.0
        return mean.astype(np.float32), np.ones_like(mean, dtype=np.float32)
    if normalization == "scale":
        return np.zeros(channels, np.float32), np.ones(channels, np.float32)
    # Accumulate in float64 over chunks: one float copy of CIFAR-10 would cost 600 MB.
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    for start in range(0, len(x), 4096):
        chunk = x[start : start + 4096].reshape(-1, channels).astype(np.float64) / 255.0
        total += chunk.sum(axis=0)
        total_sq += np.square(chunk).sum(axis=0)
    count = x.size // channels
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 1e-12))
    return mean.astype(np.float32), std.astype(np.float32)


def split_validation(
    x: np.ndarray, y: np.ndarray, holdout: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hold out ``holdout`` training images, chosen by a seeded permutation (the paper's 45k/5k)."""
    if holdout >= len(x):
        raise ValueError(
            f"preprocess.holdout = {holdout} leaves no training images ({len(x)} in total); "
            f"lower it or set preprocess.validation: test"
        )
    order = np.random.default_rng(seed).permutation(len(x))
    train, val = np.sort(order[:-holdout]), np.sort(order[-holdout:])
    return x[train], y[train], x[val], y[val]


def preprocess(splits, params: PreprocessParams) -> Prepared:
    """Turn decoded splits into training, validation and test arrays with their statistics.

    Args:
        splits: a :class:`tasks.datasets.Splits` (uint8 NHWC images, integer labels).
        params: the ``preprocess`` section of params.yaml.

    Returns:
        The prepared arrays and statistics (computed on the training part only).

    Raises:
        ValueError: the holdout would leave no training images.
    """
    x_train, y_train = splits.x_train, np.asarray(splits.y_train, np.int64)
    x_test, y_test = splits.x_test, np.asarray(splits.y_test, np.int64)
    if params.validation == "holdout":
        x_train, y_train, x_val, y_val = split_validation(
            x_train, y_train, params.holdout, params.seed
        )
    else:
        x_val, y_val = x_test, y_test
    mean, std = input_statistics(x_train, params.normalization)
    return Prepared(
        x_train, y_train, x_val, y_val, x_test, y_test, mean, std,
        list(splits.class_names), params.normalization, params.validation,
    )


def save_prepared(prepared: Prepared, out: Path) -> None:
    """Write the arrays and statistics into ``out`` atomically."""
    with atomic_dir(out) as tmp:
        arrays = {
            name: getattr(prepared, name)
            for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
        }
        np.savez(tmp / "data.npz", **arrays)
        np.savez(tmp / "stats.npz", mean=prepared.mean, std=prepared.std)
        digest = hashlib.sha256((tmp / "data.npz").read_bytes()).hexdigest()
        write_json(
            tmp / "stats.json",
            {
                "normalization": prepared.normalization,
                "validation": prepared.validation,
                "image_shape": list(prepared.x_train.shape[1:]),
                "num_classes": len(prepared.class_names),
                "class_names": prepared.class_names,
                "sizes": {name: int(len(a)) for name, a in arrays.items() if name[0] == "x"},
                "data_sha256": digest,
            },
        )


def load_prepared(directory: Path) -> Prepared:
    """Read what :func:`save_prepared` wrote."""
    directory = Path(directory)
    meta = read_json(directory / "stats.json")
    with np.load(directory / "data.npz") as data, np.load(directory / "stats.npz") as stats:
        return Prepared(
            data["x_train"], data["y_train"], data["x_val"], data["y_val"],
            data["x_test"], data["y_test"], stats["mean"], stats["std"],
            meta["class_names"], meta["normalization"], meta["validation"],
        )


def main(argv: list[str] | None = None) -> int:
    """`python -m tasks.preprocess --raw data/raw --out data/prepared`."""
    parser = argparse.ArgumentParser(description="Decode, split and compute input statistics.")
    parser.add_argument("--raw", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    params = load_params_or_exit(args.params)

    from tasks.datasets import read_raw

    splits = read_raw(args.raw)
    try:
        prepared = preprocess(splits, params.preprocess)
    except ValueError as error:
        parser.exit(2, f"error: {error}\n")
    save_prepared(prepared, args.out)
    print(
        f"preprocess: {len(prepared.x_train)} train / {len(prepared.x_val)} validation / "
        f"{len(prepared.x_test)} test images {prepared.x_train.shape[1:]}, "
        f"{len(prepared.class_names)} classes, normalization {prepared.normalization}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
