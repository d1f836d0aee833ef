"""The hand-sign (SIGNS) HDF5 dataset: download from data.source, read back, reject bad files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

from tasks.datasets import DatasetFormatError, read_raw, read_signs
from tasks.download import DownloadError, download, main
from tests.archives import Expected, make_signs, sha256, write_signs_h5
from tests.conftest import ROOT, stage_environment

SIGNS = ("train_signs.h5", "test_signs.h5")


def assert_splits(splits, expected: Expected) -> None:
    assert splits.x_train.dtype == np.uint8 and splits.x_test.dtype == np.uint8
    assert splits.y_train.dtype == np.int64 and splits.y_test.dtype == np.int64
    np.testing.assert_array_equal(splits.x_train, expected.x_train)
    np.testing.assert_array_equal(splits.y_train, expected.y_train)
    np.testing.assert_array_equal(splits.x_test, expected.x_test)
    np.testing.assert_array_equal(splits.y_test, expected.y_test)
    assert splits.class_names == expected.class_names


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name)


def rewrite(path: Path, key: str, data: np.ndarray | None) -> None:
    """Replace (or, with None, delete) one dataset of an HDF5 file."""
    with h5py.File(path, "r+") as file:
        del file[key]
        if data is not None:
            file.create_dataset(key, data=data)


# --- round trip ---------------------------------------------------------------------------


def test_download_copies_checks_and_reads_back(tmp_path: Path) -> None:
    source, expected = make_signs(tmp_path / "signs")
    for name in SIGNS:  # a read-only source (a DVC cache, a mounted share) is fine
        (source / name).chmod(0o444)
    out = download("signs", tmp_path / "data" / "raw", source=str(source), progress=False)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"] == "signs" and manifest["kind"] == "signs"
    assert manifest["files"] == {name: sha256(source / name) for name in SIGNS}
    assert manifest["sources"] == {name: str(source.resolve() / name) for name in SIGNS}
    assert manifest["class_names"] == ["0", "1", "2", "3", "4", "5"]
    for name in SIGNS:
        assert (out / "files" / name).read_bytes() == (source / name).read_bytes()
        (out / "files" / name).chmod(0o444)
    assert leftovers(tmp_path / "data") == []

    splits = read_raw(out)
    assert splits.x_train.shape == (12, 64, 64, 3) and splits.x_test.shape == (6, 64, 64, 3)
    assert_splits(splits, expected)


def test_grayscale_and_list_classes_order(tmp_path: Path) -> None:
    """One channel is accepted; labels index list_classes, whatever its values."""
    rng = np.random.default_rng(5)
    classes = np.array([7, 3, 5], dtype=np.int64)
    x_train = rng.integers(0, 256, size=(4, 8, 8, 1), dtype=np.uint8)
    x_test = rng.integers(0, 256, size=(2, 8, 8, 1), dtype=np.uint8)
    write_signs_h5(tmp_path / "train_signs.h5", "train", x_train, np.array([3, 7, 5, 3]), classes)
    write_signs_h5(tmp_path / "test_signs.h5", "test", x_test, np.array([5, 7]), classes)

    splits = read_signs(tmp_path)

    np.testing.assert_array_equal(splits.x_train, x_train)
    np.testing.assert_array_equal(splits.y_train, [1, 0, 2, 1])
    np.testing.assert_array_equal(splits.y_test, [2, 0])
    assert splits.y_train.dtype == np.int64
    assert splits.class_names == ["7", "3", "5"]


# --- malformed files ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("train_signs.h5", "train_set_x"),
        ("train_signs.h5", "train_set_y"),
        ("train_signs.h5", "list_classes"),
        ("test_signs.h5", "test_set_y"),
    ],
)
def test_missing_dataset_key_names_key_and_file(tmp_path: Path, name: str, key: str) -> None:
    source, _ = make_signs(tmp_path / "signs", train=4, test=2, size=8)
    rewrite(source / name, key, None)

    with pytest.raises(DatasetFormatError, match=rf"{name}: no dataset '{key}'"):
        read_signs(source)

    out = tmp_path / "raw"
    with pytest.raises(DownloadError) as caught:
        download("signs", out, source=str(source), progress=False)
    assert f"'{key}'" in str(caught.value) and name in str(caught.value)
    assert not out.exists() and leftovers(tmp_path) == []


def test_mismatched_lengths(tmp_path: Path) -> None:
    source, expected = make_signs(tmp_path, train=12, test=6, size=8)
    rewrite(source / "train_signs.h5", "train_set_y", expected.y_train[:11])
    message = r"train_signs.h5: 'train_set_y' has 11 labels but 'train_set_x' has 12 images"
    with pytest.raises(DatasetFormatError, match=message):
        read_signs(source)


@pytest.mark.parametrize(
    ("key", "data", "message"),
    [
        ("train_set_y", np.array([0, 1, 2, 9]), r"values \[9\] that are not in 'list_classes'"),
        ("train_set_x", np.zeros((4, 8, 8, 4), np.uint8), r"1 or 3 channels"),
        ("train_set_x", np.zeros((4, 8, 8), np.uint8), r"must be a 4-D integer array"),
        ("train_set_x", np.zeros((4, 8, 8, 3), np.float32), r"must be a 4-D integer array"),
        ("train_set_x", np.full((4, 8, 8, 3), 300, np.int64), r"pixels must be 0..255"),
        ("list_classes", np.array([0, 0, 1, 2, 3, 4, 5]), r"must list distinct class values"),
        ("list_classes", np.array([b"a", b"b"]), r"must be a 1-D integer array"),
    ],
    ids=["label", "channels", "ndim", "float", "range", "duplicates", "strings"],
)
def test_bad_contents_are_refused(tmp_path: Path, key: str, data: np.ndarray, message: str) -> None:
    source, _ = make_signs(tmp_path, train=4, test=2, size=8)
    rewrite(source / "train_signs.h5", key, data)
    with pytest.raises(DatasetFormatError, match=message) as caught:
        read_signs(source)
    assert "train_signs.h5" in str(caught.value)


def test_external_link_is_refused(tmp_path: Path) -> None:
    source, _ = make_signs(tmp_path / "signs", train=4, test=2, size=8)
    other, _ = make_signs(tmp_path / "other", train=4, test=2, size=8)
    with h5py.File(source / "train_signs.h5", "r+") as file:
        del file["train_set_x"]
        file["train_set_x"] = h5py.ExternalLink(str(other / "train_signs.h5"), "train_set_x")
    with pytest.raises(DatasetFormatError, match=r"'train_set_x' is a link \(ExternalLink\)"):
        read_signs(source)


def test_wider_integer_pixels_are_accepted(tmp_path: Path) -> None:
    source, expected = make_signs(tmp_path, train=4, test=2, size=8)
    rewrite(source / "train_signs.h5", "train_set_x", expected.x_train.astype(np.int64))
    splits = read_signs(source)
    assert splits.x_train.dtype == np.uint8
    np.testing.assert_array_equal(splits.x_train, expected.x_train)


def test_files_must_agree(tmp_path: Path) -> None:
    source, expected = make_signs(tmp_path, train=4, test=2, size=8)
    rewrite(source / "test_signs.h5", "list_classes", np.arange(7))
    with pytest.raises(DatasetFormatError, match="both files must list the same classes"):
        read_signs(source)
    rewrite(source / "test_signs.h5", "list_classes", np.arange(6))
    rewrite(source / "test_signs.h5", "test_set_x", np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(DatasetFormatError, match="same image shape"):
        read_signs(source)


def test_not_hdf5(tmp_path: Path) -> None:
    make_signs(tmp_path, train=4, test=2, size=8)
    (tmp_path / "test_signs.h5").write_bytes(b"\x80\x04 not an HDF5 file")
    with pytest.raises(DatasetFormatError, match="test_signs.h5: not a readable HDF5 file"):
        read_signs(tmp_path)


# --- the download stage ---------------------------------------------------------------------


@pytest.mark.parametrize("missing", SIGNS)
def test_missing_file_names_it_and_writes_nothing(tmp_path: Path, missing: str) -> None:
    source, _ = make_signs(tmp_path / "signs", train=4, test=2, size=8)
    (source / missing).unlink()
    out = tmp_path / "data" / "raw"

    with pytest.raises(DownloadError) as caught:
        download("signs", out, source=str(source), progress=False)

    message = str(caught.value)
    assert missing in message and "data.source" in message and "params.yaml" in message
    assert not out.exists() and not out.parent.exists()
    assert leftovers(tmp_path) == []


def test_failure_keeps_an_existing_output_directory(tmp_path: Path) -> None:
    out = tmp_path / "raw"
    out.mkdir()
    (out / "keep.txt").write_text("previous run")
    with pytest.raises(DownloadError, match="data.source"):
        download("signs", out, source=str(tmp_path / "nowhere"), progress=False)
    assert (out / "keep.txt").read_text() == "previous run"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("source", [None, "a-file"])
def test_source_must_be_a_directory(tmp_path: Path, source: str | None) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(DownloadError, match="set data.source in params.yaml"):
        download("signs", tmp_path / "raw", source=source and str(tmp_path / source))
    assert not (tmp_path / "raw").exists()


def test_main_then_preprocess(tmp_path: Path) -> None:
    source, expected = make_signs(tmp_path / "signs")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"dataset": "signs", "source": str(source)}}))
    raw, prepared = tmp_path / "raw", tmp_path / "prepared"

    assert main(["--out", str(raw), "--params", str(params), "--no-progress"]) == 0
    manifest = json.loads((raw / "manifest.json").read_text())
    assert manifest["kind"] == "signs" and sorted(manifest["files"]) == sorted(SIGNS)

    result = subprocess.run(
        [sys.executable, "-m", "tasks.preprocess", "--raw", str(raw), "--out", str(prepared),
         "--params", str(params)],
        cwd=ROOT, env=stage_environment(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    with np.load(prepared / "data.npz") as data:
        assert data["x_train"].shape == (12, 64, 64, 3)
        np.testing.assert_array_equal(data["x_train"], expected.x_train)
        np.testing.assert_array_equal(data["y_train"], expected.y_train)
        assert data["x_test"].shape == (6, 64, 64, 3)
