"""Generators of small dataset archives in the exact canonical formats, for the tests.

- CIFAR-10/100 python tarballs: Python-2 style protocol-2 pickles (byte-string keys and
  values, numpy arrays rebuilt through ``numpy.core.multiarray._reconstruct``), as the
  published batches are, in the published folder layout.
- MNIST IDX files, gzip-compressed, with the published names and magic numbers.
- Image-folder trees and tarballs (``train/<class>/*.png``, ``test/<class>/*.png``).
- The hand-sign (SIGNS) HDF5 files ``train_signs.h5`` and ``test_signs.h5``, with the course's
  dataset names (``train_set_x``, ``train_set_y``, ``list_classes``, ...) and dtypes.
- Hostile archives: path traversal, absolute names, links, and a CIFAR batch whose pickle runs
  a shell command when loaded by an unrestricted unpickler.

Every generator returns the arrays it wrote, so tests can compare what a reader gives back.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tasks.datasets import CIFAR10_CLASSES, CIFAR100_CLASSES, DatasetSpec, RemoteFile

MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


@dataclass
class Expected:
    """The arrays a generated dataset holds, in the order a reader must return them."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]


# --- Python-2 style pickles ----------------------------------------------------------------


@dataclass(frozen=True)
class _Global:
    """A module-level name to emit as a GLOBAL opcode, whatever this numpy calls it."""

    module: str
    name: str

    def __call__(self, *args: Any) -> Any:  # save_reduce insists on a callable
        raise NotImplementedError


_RECONSTRUCT = _Global("numpy.core.multiarray", "_reconstruct")
_NDARRAY = _Global("numpy", "ndarray")
_DTYPE = _Global("numpy", "dtype")


class Py2Pickler(pickle._Pickler):
    """Writes protocol-2 pickles the way Python 2's cPickle wrote the CIFAR batches.

    Byte strings become (SHORT_)BINSTRING opcodes, which Python 3 reads back as bytes under
    ``encoding="bytes"`` (no ``_codecs.encode`` global as Python 3 would emit), and numpy arrays
    reference ``numpy.core.multiarray._reconstruct`` with Python-2 style dtype arguments.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj: bytes) -> None:
        """Emit a Python 2 str."""
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    def save_marked_global(self, obj: _Global) -> None:
        """Emit a GLOBAL opcode for a _Global marker."""
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[bytes] = save_bytes
    dispatch[_Global] = save_marked_global

    def reducer_override(self, obj: Any) -> Any:
        """Reduce numpy arrays and dtypes as numpy 1.x under Python 2 did."""
        if isinstance(obj, np.ndarray):
            obj = np.ascontiguousarray(obj)
            state = (1, obj.shape, obj.dtype, False, obj.tobytes())
            return _RECONSTRUCT, (_NDARRAY, (0,), b"b"), state
        if isinstance(obj, np.dtype):
            assert obj == np.uint8, "only uint8 arrays are generated"
            return _DTYPE, (b"u1", 0, 1), (3, b"|", None, None, None, -1, -1, 0)
        return NotImplemented


def py2_pickle(obj: Any) -> bytes:
    """Pickle obj (bytes for all text) as a Python 2 protocol-2 pickle."""
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


# --- archives -----------------------------------------------------------------------------


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 1_234_567_890
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_234_567_890
    tar.addfile(info)


def write_tar_gz(path: Path, members: dict[str, bytes], dirs: tuple[str, ...] = ()) -> Path:
    """Write a tar.gz of the given directories and files (in order)."""
    with tarfile.open(path, "w:gz") as tar:
        for name in dirs:
            _add_dir(tar, name)
        for name, data in members.items():
            _add_bytes(tar, name, data)
    return path


def _random_images(rng: np.random.Generator, count: int, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(0, 256, size=(count, *shape), dtype=np.uint8)


def _cifar_rows(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) images to CIFAR's (N, 3072) rows: the R plane, then G, then B."""
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3072)


def cifar10_members(
    per_batch: int = 10, test: int = 10, seed: int = 0
) -> tuple[dict[str, bytes], Expected]:
    """The files of cifar-10-python.tar.gz (tiny batches) and the arrays they hold."""
    rng = np.random.default_rng(seed)
    members: dict[str, bytes] = {}
    xs, ys = [], []
    for i in range(1, 6):
        images = _random_images(rng, per_batch, (32, 32, 3))
        labels = rng.integers(0, 10, size=per_batch).tolist()
        batch = {
            b"batch_label": f"training batch {i} of 5".encode(),
            b"labels": labels,
            b"data": _cifar_rows(images),
            b"filenames": [f"img_{i}_{j}.png".encode() for j in range(per_batch)],
        }
        members[f"cifar-10-batches-py/data_batch_{i}"] = py2_pickle(batch)
        xs.append(images)
        ys.append(labels)
    x_test = _random_images(rng, test, (32, 32, 3))
    y_test = rng.integers(0, 10, size=test).tolist()
    members["cifar-10-batches-py/test_batch"] = py2_pickle(
        {
            b"batch_label": b"testing batch 1 of 1",
            b"labels": y_test,
            b"data": _cifar_rows(x_test),
            b"filenames": [f"test_{j}.png".encode() for j in range(test)],
        }
    )
    members["cifar-10-batches-py/batches.meta"] = py2_pickle(
        {
            b"num_cases_per_batch": per_batch,
            b"label_names": [name.encode() for name in CIFAR10_CLASSES],
            b"num_vis": 3072,
        }
    )
    members["cifar-10-batches-py/readme.html"] = b"<meta HTTP-EQUIV='REFRESH'>\n"
    expected = Expected(
        np.concatenate(xs),
        np.asarray(sum(ys, []), dtype=np.int64),
        x_test,
        np.asarray(y_test, dtype=np.int64),
        list(CIFAR10_CLASSES),
    )
    return members, expected


def make_cifar10(directory: Path, **kwargs: Any) -> tuple[Path, Expected]:
    """Write cifar-10-python.tar.gz into directory; return its path and contents."""
    members, expected = cifar10_members(**kwargs)
    path = write_tar_gz(
        Path(directory) / "cifar-10-python.tar.gz", members, dirs=("cifar-10-batches-py",)
    )
    return path, expected


def make_cifar100(
    directory: Path, train: int = 20, test: int = 10, seed: int = 1
) -> tuple[Path, Expected]:
    """Write cifar-100-python.tar.gz (train, test, meta) into directory."""
    rng = np.random.default_rng(seed)
    splits = {}
    members: dict[str, bytes] = {}
    for name, count in (("train", train), ("test", test)):
        images = _random_images(rng, count, (32, 32, 3))
        fine = rng.integers(0, 100, size=count).tolist()
        members[f"cifar-100-python/{name}"] = py2_pickle(
            {
                b"filenames": [f"{name}_{j}.png".encode() for j in range(count)],
                b"batch_label": f"{name}ing batch 1 of 1".encode(),
                b"fine_labels": fine,
                # coarse labels deliberately differ so reading the wrong key shows up
                b"coarse_labels": [label // 5 for label in fine],
                b"data": _cifar_rows(images),
            }
        )
        splits[name] = (images, np.asarray(fine, dtype=np.int64))
    members["cifar-100-python/meta"] = py2_pickle(
        {
            b"fine_label_names": [name.encode() for name in CIFAR100_CLASSES],
            b"coarse_label_names": [f"superclass_{i}".encode() for i in range(20)],
        }
    )
    path = write_tar_gz(
        Path(directory) / "cifar-100-python.tar.gz", members, dirs=("cifar-100-python",)
    )
    return path, Expected(*splits["train"], *splits["test"], list(CIFAR100_CLASSES))


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes: magic 0x0000080N, N big-endian dimensions, the data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x0800 | array.ndim)
    header += b"".join(struct.pack(">I", dim) for dim in array.shape)
    return header + array.tobytes()


def make_mnist(
    directory: Path, train: int = 30, test: int = 12, seed: int = 2
) -> tuple[list[Path], Expected]:
    """Write the four MNIST .gz files into directory; return their paths and contents."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    x_train = _random_images(rng, train, (28, 28))
    y_train = rng.integers(0, 10, size=train).astype(np.uint8)
    x_test = _random_images(rng, test, (28, 28))
    y_test = rng.integers(0, 10, size=test).astype(np.uint8)
    arrays = (x_train, y_train, x_test, y_test)
    paths = []
    for name, array in zip(MNIST_FILES, arrays, strict=True):
        path = Path(directory) / name
        path.write_bytes(gzip.compress(idx_bytes(array), mtime=0))
        paths.append(path)
    expected = Expected(
        x_train[..., None],
        y_train.astype(np.int64),
        x_test[..., None],
        y_test.astype(np.int64),
        [str(i) for i in range(10)],
    )
    return paths, expected


def sha256(path: Path) -> str:
    """The hex sha256 of a file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def spec_for(
    name: str,
    kind: str,
    paths: list[Path],
    urls: tuple[str, ...],
    class_names: list[str] | tuple[str, ...] = (),
    *,
    sizes: bool = True,
) -> DatasetSpec:
    """A DatasetSpec pinning the checksums (and sizes) of generated files."""
    files = tuple(RemoteFile(p.name, sha256(p), p.stat().st_size if sizes else None) for p in paths)
    return DatasetSpec(name, kind, files, urls, tuple(class_names))


# --- image folders ------------------------------------------------------------------------


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    mode = "L" if pixels.ndim == 2 else "RGB"
    Image.fromarray(pixels, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def imagefolder_members(
    classes: tuple[str, ...] = ("cat", "dog", "frog"),
    train_per_class: int = 4,
    test_per_class: int = 2,
    size: tuple[int, int] = (8, 6),
    channels: int = 3,
    seed: int = 3,
    prefix: str = "",
) -> tuple[dict[str, bytes], Expected]:
    """PNG members ``[prefix/]split/class/NNN.png`` and the arrays a reader must return.

    Members are produced in a shuffled order so readers cannot rely on archive order.
    """
    rng = np.random.default_rng(seed)
    width, height = size
    shape = (height, width) if channels == 1 else (height, width, 3)
    members: dict[str, bytes] = {}
    expected: dict[str, tuple[list[np.ndarray], list[int]]] = {}
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        images, labels = [], []
        for label, name in enumerate(sorted(classes)):
            for j in range(count):
                pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
                members[f"{prefix}{split}/{name}/{j:03d}.png"] = _png(pixels)
                images.append(pixels.reshape(height, width, channels))
                labels.append(label)
        expected[split] = (images, labels)
    order = rng.permutation(len(members))
    names = list(members)
    shuffled = {names[i]: members[names[i]] for i in order}
    return shuffled, Expected(
        np.stack(expected["train"][0]),
        np.asarray(expected["train"][1], dtype=np.int64),
        np.stack(expected["test"][0]),
        np.asarray(expected["test"][1], dtype=np.int64),
        sorted(classes),
    )


def make_imagefolder_dir(directory: Path, **kwargs: Any) -> tuple[Path, Expected]:
    """Write an image-folder tree under directory; return its root and contents."""
    members, expected = imagefolder_members(**kwargs)
    for name, data in members.items():
        path = Path(directory) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return Path(directory), expected


def make_imagefolder_tar(path: Path, **kwargs: Any) -> tuple[Path, Expected]:
    """Write an image-folder .tar.gz at path; return it and its contents."""
    members, expected = imagefolder_members(**kwargs)
    return write_tar_gz(Path(path), members), expected


# --- SIGNS (HDF5) --------------------------------------------------------------------------


def write_signs_h5(
    path: Path, split: str, images: np.ndarray, labels: np.ndarray, classes: np.ndarray
) -> Path:
    """Write one SIGNS file: ``<split>_set_x``, ``<split>_set_y`` and ``list_classes``."""
    import h5py

    with h5py.File(path, "w") as file:
        file.create_dataset(f"{split}_set_x", data=images)
        file.create_dataset(f"{split}_set_y", data=labels)
        file.create_dataset("list_classes", data=classes)
    return Path(path)


def make_signs(
    directory: Path,
    train: int = 12,
    test: int = 6,
    size: int = 64,
    classes: int = 6,
    seed: int = 4,
) -> tuple[Path, Expected]:
    """Write train_signs.h5 and test_signs.h5 into directory; return it and their contents.

    As published: images (N, size, size, 3) uint8, labels (N,) int64 in 0..classes-1 and
    ``list_classes`` (classes,) int64 [0, 1, ...].
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    values = np.arange(classes, dtype=np.int64)
    arrays = {}
    for split, count in (("train", train), ("test", test)):
        images = _random_images(rng, count, (size, size, 3))
        labels = rng.integers(0, classes, size=count).astype(np.int64)
        write_signs_h5(directory / f"{split}_signs.h5", split, images, labels, values)
        arrays[split] = (images, labels)
    return directory, Expected(*arrays["train"], *arrays["test"], [str(v) for v in values])


# --- hostile archives ---------------------------------------------------------------------

TRAVERSAL_KINDS = ("dotdot", "absolute", "symlink", "hardlink")


def make_traversal_cifar10(directory: Path, kind: str, outside: Path) -> tuple[Path, str]:
    """A cifar-10-python.tar.gz with one hostile member aimed at ``outside``.

    Args:
        directory: where to write the tarball.
        kind: dotdot (a ``../`` name), absolute (an absolute name), symlink or hardlink (a link
            to ``outside``, followed by a file written through it).
        outside: a path outside any extraction directory that must never be created.

    Returns:
        The tarball's path and the hostile member's name.
    """
    members, _ = cifar10_members(per_batch=2, test=2)
    path = Path(directory) / "cifar-10-python.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        _add_dir(tar, "cifar-10-batches-py")
        for name, data in members.items():
            _add_bytes(tar, name, data)
        if kind == "dotdot":
            # deep enough to climb out of <out>.tmp-<pid>/extracted/ to ``outside``
            hostile = "cifar-10-batches-py/" + "../" * 3 + outside.name
            _add_bytes(tar, hostile, b"escaped\n")
        elif kind == "absolute":
            hostile = str(outside)
            _add_bytes(tar, hostile, b"escaped\n")
        elif kind in ("symlink", "hardlink"):
            hostile = "cifar-10-batches-py/escape"
            info = tarfile.TarInfo(hostile)
            info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
            info.linkname = str(outside)
            tar.addfile(info)
            _add_bytes(tar, hostile, b"written through the link\n")
        else:
            raise ValueError(f"unknown traversal kind {kind!r}")
    return path, hostile


class _Evil:
    """Runs a shell command when unpickled by an unrestricted unpickler."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def make_malicious_cifar10(directory: Path, marker: Path) -> Path:
    """A cifar-10-python.tar.gz whose data_batch_1 would create ``marker`` via os.system."""
    members, _ = cifar10_members(per_batch=2, test=2)
    members["cifar-10-batches-py/data_batch_1"] = py2_pickle(
        {b"batch_label": b"training batch 1 of 5", b"labels": [0, 1], b"data": _Evil(marker)}
    )
    return write_tar_gz(
        Path(directory) / "cifar-10-python.tar.gz", members, dirs=("cifar-10-batches-py",)
    )
