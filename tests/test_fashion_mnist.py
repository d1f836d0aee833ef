"""The real Fashion-MNIST, from the Debian package dataset-fashion-mnist, through the real path.

The package's files are checked against the registry's pinned sha256 values, so this test also
guards the pins.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tasks.datasets import DATASETS, FASHION_MNIST_CLASSES, read_raw
from tasks.download import DEBIAN_FASHION_MNIST, download

DEBIAN_DIR = Path(DEBIAN_FASHION_MNIST)


@pytest.fixture
def debian_dir() -> Path:
    if not DEBIAN_DIR.is_dir():
        pytest.skip(
            f"{DEBIAN_DIR} not found: install Debian package dataset-fashion-mnist "
            "(apt-get install dataset-fashion-mnist)"
        )
    return DEBIAN_DIR


def test_real_fashion_mnist_from_debian_mirror(tmp_path: Path, debian_dir: Path) -> None:
    # the official host is not reachable here; the mirror must satisfy every file
    out = download(
        "fashion_mnist", tmp_path / "raw", mirror=str(debian_dir), retries=0, progress=False
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"] == {f.name: f.sha256 for f in DATASETS["fashion_mnist"].files}
    assert set(manifest["sources"].values()) == {
        str(debian_dir / f.name) for f in DATASETS["fashion_mnist"].files
    }

    splits = read_raw(out)

    assert splits.x_train.shape == (60000, 28, 28, 1) and splits.x_train.dtype == np.uint8
    assert splits.x_test.shape == (10000, 28, 28, 1) and splits.x_test.dtype == np.uint8
    assert splits.y_train.shape == (60000,) and splits.y_train.dtype == np.int64
    assert splits.y_test.shape == (10000,)
    assert splits.class_names == list(FASHION_MNIST_CLASSES)
    # a balanced set: 6000 training and 1000 test images per class
    np.testing.assert_array_equal(np.bincount(splits.y_train), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(splits.y_test), [1000] * 10)
    # the first training labels of the published set
    np.testing.assert_array_equal(splits.y_train[:10], [9, 0, 0, 3, 0, 2, 7, 2, 5, 5])


# Upstream's files differ from Debian's only in the gzip header: Debian's strip-nondeterminism
# dropped the original file name and reset the mtime. These are the upstream mtimes and the md5
# sums upstream's README publishes.
UPSTREAM = {
    "train-images-idx3-ubyte.gz": (1504176606, "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    "train-labels-idx1-ubyte.gz": (1504176606, "25c81989df183df01b3e8a0aad5dffbe"),
    "t10k-images-idx3-ubyte.gz": (1504176627, "bef4ecab320f06d8554ea6380940ec79"),
    "t10k-labels-idx1-ubyte.gz": (1504176627, "bb300cfdad3c16e7a12a480ee83cd310"),
}


def upstream_bytes(debian_file: Path) -> bytes:
    """Rebuild upstream's gzip file: FNAME flag, original name and mtime, same deflate stream."""
    data = debian_file.read_bytes()
    assert data[:4] == b"\x1f\x8b\x08\x00"  # gzip, deflate, no optional fields
    mtime, _ = UPSTREAM[debian_file.name]
    name = debian_file.name.removesuffix(".gz").encode() + b"\0"
    return b"\x1f\x8b\x08\x08" + struct.pack("<I", mtime) + data[8:10] + name + data[10:]


def test_upstream_files_are_accepted_too(tmp_path: Path, debian_dir: Path) -> None:
    official = tmp_path / "official"
    official.mkdir()
    for remote in DATASETS["fashion_mnist"].files:
        data = upstream_bytes(debian_dir / remote.name)
        assert hashlib.md5(data).hexdigest() == UPSTREAM[remote.name][1]
        assert hashlib.sha256(data).hexdigest() in remote.also_sha256
        (official / remote.name).write_bytes(data)
    spec = replace(DATASETS["fashion_mnist"], urls=(official.as_uri(),))

    out = download("fashion_mnist", tmp_path / "raw", spec=spec, retries=0, progress=False)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"] == {f.name: f.also_sha256[0] for f in spec.files}
    splits = read_raw(out)
    assert splits.x_train.shape == (60000, 28, 28, 1) and splits.x_test.shape == (10000, 28, 28, 1)


def test_real_fashion_mnist_through_the_download_and_preprocess_stages(
    tmp_path: Path, debian_dir: Path
) -> None:
    import subprocess
    import sys

    import yaml

    from tests.conftest import ROOT, stage_environment

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({
        "data": {"dataset": "fashion_mnist", "mirror": str(debian_dir), "retries": 0},
        "preprocess": {"normalization": "pixel_mean", "validation": "holdout", "holdout": 5000},
    }))
    for stage, args in (
        ("tasks.download", ["--out", str(tmp_path / "raw"), "--no-progress"]),
        ("tasks.preprocess", ["--raw", str(tmp_path / "raw"), "--out", str(tmp_path / "prep")]),
    ):
        result = subprocess.run(
            [sys.executable, "-m", stage, *args, "--params", str(params)],
            cwd=ROOT, env=stage_environment(), capture_output=True, text=True,
        )
        assert result.returncode == 0, result.stderr

    stats = json.loads((tmp_path / "prep" / "stats.json").read_text())
    assert stats["sizes"] == {"x_train": 55000, "x_val": 5000, "x_test": 10000}
    assert stats["image_shape"] == [28, 28, 1] and stats["class_names"] == list(
        FASHION_MNIST_CLASSES
    )
    with np.load(tmp_path / "prep" / "data.npz") as data, np.load(
        tmp_path / "prep" / "stats.npz"
    ) as moments:
        assert data["x_train"].dtype == np.uint8
        # holdout and training images are disjoint parts of the 60,000
        assert len(data["y_train"]) + len(data["y_val"]) == 60000
        mean = moments["mean"]
        assert mean.shape == (28, 28, 1)
        np.testing.assert_allclose(mean, data["x_train"].mean(axis=0) / 255.0, atol=1e-6)
    # Fashion-MNIST's border pixels are mostly black, its centre bright
    assert mean[0, 0, 0] < 0.01 < 0.3 < mean[14, 14, 0]
