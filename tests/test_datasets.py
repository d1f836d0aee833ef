"""The readers and the safety layer: restricted unpickling, safe extraction, IDX parsing."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import pickletools
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest

from tasks.datasets import (
    CIFAR100_CLASSES,
    DATASETS,
    FASHION_MNIST_CLASSES,
    DatasetFormatError,
    read_idx,
    read_raw,
    scan_imagefolder,
)
from tasks.download import download
from tasks.safety import (
    UnsafeArchiveError,
    UnsafePickleError,
    restricted_load,
    safe_extract,
)
from tests.archives import (
    TRAVERSAL_KINDS,
    cifar10_members,
    idx_bytes,
    make_malicious_cifar10,
    make_mnist,
    make_traversal_cifar10,
    py2_pickle,
    spec_for,
)


def closed_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/"


# --- registry -------------------------------------------------------------------------------


def test_registry_pins_the_canonical_sources() -> None:
    assert set(DATASETS) == {"cifar10", "cifar100", "mnist", "fashion_mnist"}
    cifar10 = DATASETS["cifar10"].files[0]
    assert (cifar10.name, cifar10.size) == ("cifar-10-python.tar.gz", 170498071)
    assert cifar10.sha256.startswith("6d958be0")
    assert DATASETS["cifar100"].files[0].sha256.startswith("85cd44d0")
    assert DATASETS["mnist"].urls[0] == "https://ossci-datasets.s3.amazonaws.com/mnist/"
    for name in ("mnist", "fashion_mnist"):
        assert [f.name for f in DATASETS[name].files] == [
            "train-images-idx3-ubyte.gz",
            "train-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte.gz",
        ]
    assert len(CIFAR100_CLASSES) == len(set(CIFAR100_CLASSES)) == 100
    assert DATASETS["fashion_mnist"].class_names == FASHION_MNIST_CLASSES
    assert FASHION_MNIST_CLASSES[0] == "T-shirt/top" and FASHION_MNIST_CLASSES[9] == "Ankle boot"
    for spec in DATASETS.values():
        assert spec.kind in ("cifar", "idx")
        for remote in spec.files:
            for digest in (remote.sha256, *remote.also_sha256):
                assert len(digest) == 64 and int(digest, 16) >= 0


# --- restricted unpickling --------------------------------------------------------------------


def test_generated_batches_are_python2_style_pickles() -> None:
    members, _ = cifar10_members(per_batch=2, test=2)
    data = members["cifar-10-batches-py/data_batch_1"]
    globals_ = [arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"]
    assert globals_ == ["numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"]
    opcodes = {op.name for op, _, _ in pickletools.genops(data)}
    assert "SHORT_BINSTRING" in opcodes and "BINUNICODE" not in opcodes
    assert data[:2] == b"\x80\x02"
    batch = restricted_load(data)
    assert set(batch) == {b"batch_label", b"labels", b"data", b"filenames"}
    assert batch[b"data"].dtype == np.uint8 and batch[b"data"].shape == (2, 3072)


def test_restricted_unpickler_refuses_other_globals() -> None:
    # protocol 2 names builtins as Python 2's __builtin__
    with pytest.raises(UnsafePickleError, match=r"batch\.bin: refusing .* __builtin__\.eval"):
        restricted_load(pickle.dumps(eval, protocol=2), source="batch.bin")
    # Python 3 pickles of bytes go through _codecs.encode, which is not needed for CIFAR
    with pytest.raises(UnsafePickleError, match="_codecs.encode"):
        restricted_load(pickle.dumps({b"data": 1}, protocol=2))
    assert restricted_load(py2_pickle({b"k": [1, 2.5, b"x", None]})) == {b"k": [1, 2.5, b"x", None]}


def test_malicious_pickle_is_effective_when_unrestricted(tmp_path: Path) -> None:
    # guards the next test: the generated pickle really does run its command
    marker = tmp_path / "pwned"
    path = make_malicious_cifar10(tmp_path, marker)
    with tarfile.open(path) as tar:
        data = tar.extractfile("cifar-10-batches-py/data_batch_1").read()
    pickle.loads(data, encoding="bytes")
    assert marker.exists()


def test_malicious_cifar_pickle_is_refused(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    marker = tmp_path / "pwned"
    path = make_malicious_cifar10(mirror, marker)
    spec = spec_for("cifar10", "cifar", [path], (closed_url(),))
    out = download("cifar10", tmp_path / "raw", mirror=str(mirror), spec=spec, progress=False)

    with pytest.raises(UnsafePickleError) as caught:
        read_raw(out)

    message = str(caught.value)
    assert "data_batch_1" in message and "posix.system" in message
    assert not marker.exists()


# --- safe extraction ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", TRAVERSAL_KINDS)
def test_safe_extract_refuses_before_writing(tmp_path: Path, kind: str) -> None:
    outside = tmp_path / "escaped.txt"
    path, hostile = make_traversal_cifar10(tmp_path, kind, outside)
    dest = tmp_path / "a" / "b" / "dest"
    with pytest.raises(UnsafeArchiveError) as caught:
        safe_extract(path, dest)
    assert f"member {hostile!r}" in str(caught.value)
    assert not outside.exists()
    assert not dest.exists()  # checked before anything was written


def test_safe_extract_writes_plain_files(tmp_path: Path) -> None:
    members, _ = cifar10_members(per_batch=1, test=1)
    archive = tmp_path / "ok.tar"
    with tarfile.open(archive, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o4777  # setuid bits must not be applied
            tar.addfile(info, io.BytesIO(data))
    written = safe_extract(archive, tmp_path / "dest")
    assert written == list(members)
    for name, data in members.items():
        path = tmp_path / "dest" / name
        assert path.read_bytes() == data
        assert not path.stat().st_mode & 0o4000


def test_safe_extract_refuses_devices(tmp_path: Path) -> None:
    archive = tmp_path / "dev.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("null")
        info.type = tarfile.CHRTYPE
        tar.addfile(info)
    with pytest.raises(UnsafeArchiveError, match="'null' is not a regular file"):
        safe_extract(archive, tmp_path / "dest")


# --- IDX ------------------------------------------------------------------------------------


def test_idx_round_trip(tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(images)))
    np.testing.assert_array_equal(read_idx(path, 2051), images)
    plain = tmp_path / "y-idx1-ubyte"
    plain.write_bytes(idx_bytes(np.array([3, 1], dtype=np.uint8)))
    np.testing.assert_array_equal(read_idx(plain, 2049), [3, 1])


def test_idx_wrong_magic(tmp_path: Path) -> None:
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(3, dtype=np.uint8))))
    with pytest.raises(DatasetFormatError, match="magic number is 2049, expected 2051"):
        read_idx(path, 2051)


def test_idx_size_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "images.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((2, 3, 3), dtype=np.uint8))[:-1]))
    with pytest.raises(DatasetFormatError, match=r"declares shape \(2, 3, 3\)"):
        read_idx(path, 2051)


def test_idx_not_gzip(tmp_path: Path) -> None:
    path = tmp_path / "images.gz"
    path.write_bytes(b"plain text")
    with pytest.raises(DatasetFormatError, match="cannot decompress"):
        read_idx(path, 2051)


def _raw_idx_dir(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    make_mnist(raw / "files", train=5, test=3)
    (raw / "manifest.json").write_text(json.dumps({"dataset": "mnist", "kind": "idx"}))
    return raw


def test_idx_count_mismatch(tmp_path: Path) -> None:
    raw = _raw_idx_dir(tmp_path)
    labels = np.zeros(4, dtype=np.uint8)
    (raw / "files" / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    with pytest.raises(DatasetFormatError, match="has 5 images but .* has 4 labels"):
        read_raw(raw)


def test_idx_label_out_of_range(tmp_path: Path) -> None:
    raw = _raw_idx_dir(tmp_path)
    labels = np.array([0, 1, 10], dtype=np.uint8)
    (raw / "files" / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    with pytest.raises(DatasetFormatError, match=r"labels range over \[0, 10\] but there are 10"):
        read_raw(raw)


def test_idx_reader_falls_back_to_registry_class_names(tmp_path: Path) -> None:
    raw = _raw_idx_dir(tmp_path)
    (raw / "manifest.json").write_text(json.dumps({"dataset": "fashion_mnist", "kind": "idx"}))
    splits = read_raw(raw)
    assert splits.class_names == list(FASHION_MNIST_CLASSES)
    assert splits.x_train.shape == (5, 28, 28, 1) and splits.x_test.shape == (3, 28, 28, 1)


# --- manifests and layouts ------------------------------------------------------------------


def test_read_raw_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(DatasetFormatError, match="manifest.json not found"):
        read_raw(tmp_path)


def test_read_raw_unknown_kind(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "parquet"}))
    with pytest.raises(DatasetFormatError, match="unknown kind 'parquet'"):
        read_raw(tmp_path)


def test_cifar_batch_with_wrong_shape(tmp_path: Path) -> None:
    members, _ = cifar10_members(per_batch=2, test=2)
    members["cifar-10-batches-py/data_batch_3"] = py2_pickle(
        {b"labels": [0], b"data": np.zeros((1, 1024), dtype=np.uint8)}
    )
    raw = tmp_path / "raw"
    for name, data in members.items():
        (raw / "extracted" / name).parent.mkdir(parents=True, exist_ok=True)
        (raw / "extracted" / name).write_bytes(data)
    (raw / "manifest.json").write_text(json.dumps({"dataset": "cifar10", "kind": "cifar"}))
    with pytest.raises(DatasetFormatError, match=r"data_batch_3: b'data' must be an \(N, 3072\)"):
        read_raw(raw)


def test_scan_imagefolder_layout_errors() -> None:
    with pytest.raises(DatasetFormatError, match="no images under test/"):
        scan_imagefolder(["train/a/1.png"], "x.tar")
    with pytest.raises(DatasetFormatError, match="train/1.png is not of the form"):
        scan_imagefolder(["train/1.png", "test/a/1.png"], "x.tar")
    layout = scan_imagefolder(
        ["./train/b/2.JPG", "./train/a/1.png", "./test/a/9.png", "./test/b/0.jpeg", "README"],
        "x.tar",
    )
    assert layout.class_names == ["a", "b"]
    assert [label for _, label in layout.entries["train"]] == [0, 1]
    assert [label for _, label in layout.entries["test"]] == [0, 1]
