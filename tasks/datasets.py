"""The dataset registry and the readers that turn a downloaded raw directory into uint8 arrays.

:func:`tasks.download.download` writes a raw directory with a ``manifest.json`` saying which
``kind`` of data it holds; :func:`read_raw` reads it back as :class:`Splits`:

- ``cifar``: the CIFAR-10/100 python tarball, extracted under ``extracted/``; the batches are
  Python-2 pickles, loaded with a restricted unpickler (numpy arrays, lists and dicts only).
- ``idx``: the four MNIST-format IDX ``.gz`` files under ``files/``.
- ``imagefolder``: one tar (optionally compressed) of ``train/<class>/<image>`` and
  ``test/<class>/<image>`` under ``files/``, decoded with PIL straight out of the tar.
- ``signs``: the hand-sign set's ``train_signs.h5`` and ``test_signs.h5`` under ``files/``,
  read with h5py (plain numeric datasets only: HDF5 holds no code to run).
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from tasks.safety import check_members, restricted_load


@dataclass(frozen=True)
class RemoteFile:
    """One file of a dataset as published, with its pinned checksum."""

    name: str
    sha256: str
    size: int | None = None
    # other digests of the same content that are accepted too (e.g. a distribution's
    # re-compressed copy of the upstream file, whose gzip header differs)
    also_sha256: tuple[str, ...] = ()

    def accepts(self, digest: str) -> bool:
        """Whether ``digest`` is the pinned sha256 or one of the accepted alternatives."""
        return digest == self.sha256 or digest in self.also_sha256


@dataclass(frozen=True)
class DatasetSpec:
    """Where a canonical dataset lives and what its files must hash to."""

    name: str
    kind: str
    files: tuple[RemoteFile, ...]
    urls: tuple[str, ...]
    class_names: tuple[str, ...]


@dataclass
class Splits:
    """A dataset as arrays: uint8 images (N, H, W, C) channels-last and int64 labels (N,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]


class DatasetFormatError(ValueError):
    """A raw file does not have the layout its format prescribes."""


CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

_CIFAR_URLS = ("https://www.cs.toronto.edu/~kriz/",)

DATASETS: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec(
        name="cifar10",
        kind="cifar",
        files=(
            RemoteFile(
                "cifar-10-python.tar.gz",
                "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
                170498071,
            ),
        ),
        urls=_CIFAR_URLS,
        class_names=CIFAR10_CLASSES,
    ),
    "cifar100": DatasetSpec(
        name="cifar100",
        kind="cifar",
        files=(
            RemoteFile(
                "cifar-100-python.tar.gz",
                "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
                169001437,
            ),
        ),
        urls=_CIFAR_URLS,
        class_names=CIFAR100_CLASSES,
    ),
    "mnist": DatasetSpec(
        name="mnist",
        kind="idx",
        files=(
            RemoteFile(
                "train-images-idx3-ubyte.gz",
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            ),
            RemoteFile(
                "train-labels-idx1-ubyte.gz",
                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            ),
            RemoteFile(
                "t10k-images-idx3-ubyte.gz",
                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            ),
            RemoteFile(
                "t10k-labels-idx1-ubyte.gz",
                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            ),
        ),
        urls=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        class_names=tuple(str(digit) for digit in range(10)),
    ),
    # sha256 is that of Debian's dataset-fashion-mnist copies (/usr/share/datasets/fashion-mnist),
    # whose gzip headers were normalised by strip-nondeterminism (no file name, fixed mtime);
    # also_sha256 is that of the upstream files, whose headers keep the name and the mtime. The
    # deflate streams are identical, and the upstream digests were reproduced by restoring the
    # header and checking the result against the md5 sums published in upstream's README.
    "fashion_mnist": DatasetSpec(
        name="fashion_mnist",
        kind="idx",
        files=(
            RemoteFile(
                "train-images-idx3-ubyte.gz",
                "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
                26421856,
                also_sha256=("3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",),
            ),
            RemoteFile(
                "train-labels-idx1-ubyte.gz",
                "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
                29491,
                also_sha256=("a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",),
            ),
            RemoteFile(
                "t10k-images-idx3-ubyte.gz",
                "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
                4422079,
                also_sha256=("346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",),
            ),
            RemoteFile(
                "t10k-labels-idx1-ubyte.gz",
                "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
                5125,
                also_sha256=("67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",),
            ),
        ),
        urls=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        class_names=FASHION_MNIST_CLASSES,
    ),
}

MANIFEST = "manifest.json"
KINDS = ("cifar", "idx", "imagefolder", "signs")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
_PIL_FORMATS = ("JPEG", "PNG", "BMP")

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

# the hand-sign ("SIGNS") set of the deep-learning course's ResNet50 tutorial:
# split -> (file, images dataset, labels dataset); both files also hold list_classes
SIGNS_FILES = {
    "train": ("train_signs.h5", "train_set_x", "train_set_y"),
    "test": ("test_signs.h5", "test_set_x", "test_set_y"),
}
SIGNS_CLASSES_KEY = "list_classes"


@dataclass(frozen=True)
class _CifarLayout:
    folder: str
    train: tuple[str, ...]
    test: str
    meta: str
    labels_key: bytes
    names_key: bytes


CIFAR_LAYOUTS = {
    "cifar10": _CifarLayout(
        folder="cifar-10-batches-py",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test="test_batch",
        meta="batches.meta",
        labels_key=b"labels",
        names_key=b"label_names",
    ),
    # the fine (100-class) labels; the coarse 20 superclasses are not used
    "cifar100": _CifarLayout(
        folder="cifar-100-python",
        train=("train",),
        test="test",
        meta="meta",
        labels_key=b"fine_labels",
        names_key=b"fine_label_names",
    ),
}


def read_manifest(raw_dir: Path) -> dict[str, Any]:
    """Load and sanity-check ``<raw_dir>/manifest.json``.

    Args:
        raw_dir: a directory written by :func:`tasks.download.download`.

    Returns:
        The manifest mapping.

    Raises:
        DatasetFormatError: the manifest is missing, not JSON, or names an unknown kind.
    """
    path = Path(raw_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetFormatError(
            f"{path} not found: {raw_dir} is not a downloaded dataset; run the download stage "
            "(python -m tasks.download --out <dir>) first"
        ) from None
    except json.JSONDecodeError as error:
        raise DatasetFormatError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("kind") not in KINDS:
        kind = manifest.get("kind") if isinstance(manifest, dict) else None
        raise DatasetFormatError(f"{path}: unknown kind {kind!r}; expected one of {KINDS}")
    return manifest


def read_raw(raw_dir: Path) -> Splits:
    """Read a raw dataset directory into uint8 image arrays and int64 labels.

    Args:
        raw_dir: a directory written by :func:`tasks.download.download` (holding manifest.json).

    Returns:
        The train and test splits, channels-last (MNIST-family and grayscale images get C=1),
        with the class names in label order.

    Raises:
        DatasetFormatError: the manifest or a data file is malformed; the message names the file.
        tasks.safety.UnsafePickleError: a CIFAR batch pickle references a disallowed global.
        tasks.safety.UnsafeArchiveError: an image-folder tar has an unsafe member.
    """
    raw_dir = Path(raw_dir)
    manifest = read_manifest(raw_dir)
    kind = manifest["kind"]
    if kind == "cifar":
        layout = CIFAR_LAYOUTS.get(manifest.get("dataset", ""))
        if layout is None:
            raise DatasetFormatError(
                f"{raw_dir / MANIFEST}: kind 'cifar' needs dataset 'cifar10' or 'cifar100', "
                f"got {manifest.get('dataset')!r}"
            )
        return read_cifar(raw_dir / "extracted" / layout.folder, layout)
    if kind == "idx":
        names = manifest.get("class_names")
        if names is None:
            spec = DATASETS.get(manifest.get("dataset", ""))
            names = list(spec.class_names) if spec else [str(i) for i in range(10)]
        return read_idx_dir(raw_dir / "files", list(names))
    if kind == "signs":
        return read_signs(raw_dir / "files")
    archive = manifest.get("archive") or _only_file(manifest, raw_dir)
    return read_imagefolder(raw_dir / "files" / archive)


def _only_file(manifest: dict[str, Any], raw_dir: Path) -> str:
    """The single file an imagefolder manifest lists."""
    files = list(manifest.get("files", {}))
    if len(files) != 1:
        raise DatasetFormatError(
            f"{raw_dir / MANIFEST}: an imagefolder dataset has exactly one archive, got {files}"
        )
    return files[0]


# --- CIFAR -------------------------------------------------------------------------------


def _load_batch(path: Path) -> dict[bytes, Any]:
    """Unpickle one CIFAR batch or meta file with the restricted unpickler."""
    try:
        with open(path, "rb") as file:
            batch = restricted_load(file, source=str(path))
    except FileNotFoundError:
        raise DatasetFormatError(
            f"{path} not found: the extracted CIFAR archive is incomplete"
        ) from None
    if not isinstance(batch, dict):
        raise DatasetFormatError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    return batch


def _cifar_batch(path: Path, labels_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 32, 32, 3) and labels (N,) of one CIFAR batch file."""
    batch = _load_batch(path)
    data, labels = batch.get(b"data"), batch.get(labels_key)
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DatasetFormatError(
            f"{path}: b'data' must be an (N, 3072) uint8 array, got {type(data).__name__} "
            f"with shape {shape}"
        )
    if data.dtype != np.uint8:
        raise DatasetFormatError(f"{path}: b'data' must be uint8, got {data.dtype}")
    if labels is None or len(labels) != len(data):
        count = None if labels is None else len(labels)
        raise DatasetFormatError(
            f"{path}: {labels_key!r} must hold one label per image ({len(data)}), got {count}"
        )
    # rows are channel-major (1024 red, 1024 green, 1024 blue), each plane row-major
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(labels, dtype=np.int64)


def read_cifar(root: Path, layout: _CifarLayout) -> Splits:
    """Read an extracted CIFAR-10 or CIFAR-100 python folder.

    Args:
        root: the extracted folder (``cifar-10-batches-py`` or ``cifar-100-python``).
        layout: which of :data:`CIFAR_LAYOUTS` it follows.

    Returns:
        The splits, images (N, 32, 32, 3) uint8.

    Raises:
        DatasetFormatError: a batch is missing or malformed.
        tasks.safety.UnsafePickleError: a pickle references a disallowed global.
    """
    meta = _load_batch(root / layout.meta)
    raw_names = meta.get(layout.names_key)
    if not isinstance(raw_names, list) or not raw_names:
        raise DatasetFormatError(f"{root / layout.meta}: no {layout.names_key!r} list")
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in raw_names]
    parts = [_cifar_batch(root / name, layout.labels_key) for name in layout.train]
    x_train = np.concatenate([x for x, _ in parts])
    y_train = np.concatenate([y for _, y in parts])
    x_test, y_test = _cifar_batch(root / layout.test, layout.labels_key)
    for split, labels in (("train", y_train), ("test", y_test)):
        _check_labels(labels, len(class_names), f"{root} ({split})")
    return Splits(x_train, y_train, x_test, y_test, class_names)


def _check_labels(labels: np.ndarray, classes: int, where: str) -> None:
    """Raise DatasetFormatError unless every label indexes a class."""
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise DatasetFormatError(
            f"{where}: labels range over [{labels.min()}, {labels.max()}] but there are "
            f"{classes} classes"
        )


# --- IDX (MNIST family) ------------------------------------------------------------------


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse one IDX file (gzip-compressed when its name ends in .gz) of unsigned bytes.

    Args:
        path: the file.
        magic: the expected magic number: 2051 for images (N, rows, cols), 2049 for labels (N,).

    Returns:
        The uint8 array with the shape its header declares.

    Raises:
        DatasetFormatError: wrong magic number, truncated or oversized data, not gzip.
    """
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as error:
        raise DatasetFormatError(f"{path}: cannot decompress: {error}") from None
    if len(raw) < 4:
        raise DatasetFormatError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DatasetFormatError(
            f"{path}: IDX magic number is {found}, expected {magic} "
            f"({'images' if magic == IDX_IMAGES_MAGIC else 'labels'}); wrong or corrupt file"
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetFormatError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected:
        raise DatasetFormatError(
            f"{path}: header declares shape {shape} ({expected} bytes in all) but the file has "
            f"{len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _idx_path(files_dir: Path, stem: str) -> Path:
    """The .gz (or uncompressed) file named stem in files_dir."""
    for name in (f"{stem}.gz", stem):
        if (files_dir / name).is_file():
            return files_dir / name
    raise DatasetFormatError(f"{files_dir}: missing {stem}.gz")


def read_idx_dir(files_dir: Path, class_names: list[str]) -> Splits:
    """Read the four MNIST-format files (train/t10k images and labels) from a directory.

    Args:
        files_dir: the directory holding ``train-images-idx3-ubyte.gz`` and the other three.
        class_names: the names of the label values 0..K-1.

    Returns:
        The splits, images (N, rows, cols, 1) uint8.

    Raises:
        DatasetFormatError: a file is missing or malformed, or image and label counts differ.
    """
    arrays = {}
    for role, stem in IDX_FILES.items():
        path = _idx_path(files_dir, stem)
        is_images = role.endswith("images")
        array = read_idx(path, IDX_IMAGES_MAGIC if is_images else IDX_LABELS_MAGIC)
        if array.ndim != (3 if is_images else 1):
            raise DatasetFormatError(f"{path}: expected {3 if is_images else 1} dimensions")
        arrays[role] = (path, array)
    splits = {}
    for split in ("train", "test"):
        images_path, images = arrays[f"{split}_images"]
        labels_path, labels = arrays[f"{split}_labels"]
        if len(images) != len(labels):
            raise DatasetFormatError(
                f"{images_path.name} has {len(images)} images but {labels_path.name} has "
                f"{len(labels)} labels"
            )
        labels = labels.astype(np.int64)
        _check_labels(labels, len(class_names), str(labels_path))
        splits[split] = (images[..., np.newaxis].copy(), labels)
    return Splits(*splits["train"], *splits["test"], class_names=list(class_names))


# --- image folders -----------------------------------------------------------------------


@dataclass(frozen=True)
class ImageFolderLayout:
    """Where the images of a class-folder archive are: members per split, in label order."""

    class_names: list[str]
    # split -> [(member name, label)], sorted by (label, member name)
    entries: dict[str, list[tuple[str, int]]]


def is_image_name(name: str) -> bool:
    """Whether a file name has an image suffix and is not hidden."""
    base = PurePosixPath(name).name
    return not base.startswith(".") and base.lower().endswith(IMAGE_SUFFIXES)


def scan_imagefolder(names: Iterable[str], archive: str) -> ImageFolderLayout:
    """Find ``train/<class>/<image>`` and ``test/<class>/<image>`` among member names.

    One enclosing top-level folder (``name/train/...``) is allowed. Non-image and hidden
    files are ignored.

    Args:
        names: the names of the regular-file members.
        archive: the archive's name, for error messages.

    Returns:
        The class names (sorted train folder names) and the images of each split.

    Raises:
        DatasetFormatError: no train/ or test/ folders, images outside class folders, no images
            in a split, or test classes that differ from train classes.
    """
    # pathlib drops "." components, so "./train/a/1.png" is seen as "train/a/1.png"; the
    # original member name is kept for reading the member back
    images = [(PurePosixPath(name), name) for name in names if is_image_name(name)]
    tops = {p.parts[0] for p, _ in images if len(p.parts) > 1}
    prefix: tuple[str, ...] = ()
    if not tops & {"train", "test"} and len(tops) == 1:
        prefix = (next(iter(tops)),)
    by_split: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for path, member in images:
        parts = path.parts[len(prefix) :]
        if path.parts[: len(prefix)] != prefix or not parts or parts[0] not in by_split:
            continue
        if len(parts) != 3:
            raise DatasetFormatError(
                f"{archive}: {path} is not of the form {'/'.join(prefix + (parts[0],))}"
                "/<class>/<image>; put each image in its class folder"
            )
        by_split[parts[0]].append((parts[1], member))
    for split, found in by_split.items():
        if not found:
            raise DatasetFormatError(
                f"{archive}: no images under {'/'.join(prefix + (split,))}/<class>/; an image "
                "folder needs train/<class>/*.jpg|png and test/<class>/*.jpg|png"
            )
    class_names = sorted({label for label, _ in by_split["train"]})
    test_classes = sorted({label for label, _ in by_split["test"]})
    if test_classes != class_names:
        missing = sorted(set(class_names) - set(test_classes))
        extra = sorted(set(test_classes) - set(class_names))
        raise DatasetFormatError(
            f"{archive}: test/ must have the same class folders as train/; "
            f"missing from test: {missing or 'none'}, not in train: {extra or 'none'}"
        )
    index = {name: i for i, name in enumerate(class_names)}
    entries = {
        split: sorted(
            ((member, index[label]) for label, member in found), key=lambda e: (e[1], e[0])
        )
        for split, found in by_split.items()
    }
    return ImageFolderLayout(class_names, entries)


def read_imagefolder(archive: Path) -> Splits:
    """Decode a class-folder tar (any compression) into arrays, streaming it once.

    Labels index the sorted train class folders; within a split images are ordered by
    (label, member name), so the result does not depend on the order inside the tar.

    Args:
        archive: the tar or tar.gz of ``train/<class>/*`` and ``test/<class>/*``.

    Returns:
        The splits: grayscale (mode L) images get C=1, RGB images C=3.

    Raises:
        tasks.safety.UnsafeArchiveError: a member is absolute, has ``..`` or is a link.
        DatasetFormatError: bad folder layout, an undecodable image, an unsupported mode, or
            images of differing size or mode; the message names the offending member.
    """
    from PIL import Image, UnidentifiedImageError

    archive = Path(archive)
    payloads: dict[str, bytes] = {}
    try:
        # one sequential pass: a compressed tar is expensive to seek in
        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                check_members([member], archive)
                if member.isfile() and is_image_name(member.name):
                    source = tar.extractfile(member)
                    assert source is not None  # regular files always have a payload
                    payloads[member.name] = source.read()
    except tarfile.TarError as error:
        raise DatasetFormatError(f"{archive}: not a readable tar archive: {error}") from None
    layout = scan_imagefolder(payloads, str(archive))

    reference: tuple[str, tuple[int, int], str] | None = None
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        entries = layout.entries[split]
        for i, (name, _) in enumerate(entries):
            try:
                # only the formats image folders hold: no probing of every PIL plugin
                image = Image.open(io.BytesIO(payloads[name]), formats=_PIL_FORMATS)
                size, mode = image.size, image.mode
                if reference is None:
                    if mode not in ("L", "RGB"):
                        raise DatasetFormatError(
                            f"{archive}: {name} has mode {mode}; only 8-bit grayscale (L) and "
                            "RGB images are supported: convert the images"
                        )
                    reference = (name, size, mode)
                    arrays["train"] = _allocate(len(layout.entries["train"]), size, mode)
                    arrays["test"] = _allocate(len(layout.entries["test"]), size, mode)
                elif (size, mode) != reference[1:]:
                    raise DatasetFormatError(
                        f"{archive}: {name} is {size[0]}x{size[1]} {mode} but {reference[0]} "
                        f"is {reference[1][0]}x{reference[1][1]} {reference[2]}; all images "
                        "must have the same size and mode"
                    )
                pixels = np.asarray(image)
            except (UnidentifiedImageError, OSError, SyntaxError) as error:
                raise DatasetFormatError(f"{archive}: cannot decode {name}: {error}") from None
            arrays[split][i] = pixels.reshape(arrays[split].shape[1:])
    labels = {
        split: np.fromiter((label for _, label in entries), dtype=np.int64, count=len(entries))
        for split, entries in layout.entries.items()
    }
    return Splits(
        arrays["train"], labels["train"], arrays["test"], labels["test"], layout.class_names
    )


def _allocate(count: int, size: tuple[int, int], mode: str) -> np.ndarray:
    """An uninitialised (count, H, W, C) uint8 array for images of PIL size and mode."""
    width, height = size
    return np.empty((count, height, width, 1 if mode == "L" else 3), dtype=np.uint8)


# --- SIGNS (HDF5) --------------------------------------------------------------------------


def _h5_dataset(file: Any, key: str, path: Path) -> Any:
    """The HDF5 dataset ``key`` of an open file, or DatasetFormatError naming key and file."""
    import h5py

    link = file.get(key, getlink=True)
    if link is not None and not isinstance(link, h5py.HardLink):
        # an external or soft link would make h5py open another file or path
        raise DatasetFormatError(
            f"{path}: {key!r} is a link ({type(link).__name__}), not a dataset stored in the "
            "file itself; use the original file from the hand-sign set"
        )
    node = file.get(key)
    if node is None:
        present = ", ".join(sorted(file.keys())) or "none"
        raise DatasetFormatError(
            f"{path}: no dataset {key!r} (it holds: {present}); a SIGNS file needs "
            f"{key!r}, so use the original {path.name} from the hand-sign set"
        )
    if not isinstance(node, h5py.Dataset):
        raise DatasetFormatError(f"{path}: {key!r} is a {type(node).__name__}, not a dataset")
    return node


def _h5_integers(file: Any, key: str, path: Path, ndim: int) -> np.ndarray:
    """Read an integer dataset of ``ndim`` dimensions, checking its type before reading it."""
    dataset = _h5_dataset(file, key, path)
    if dataset.dtype.kind not in "iu" or dataset.ndim != ndim:
        raise DatasetFormatError(
            f"{path}: {key!r} must be a {ndim}-D integer array, got dtype {dataset.dtype} with "
            f"shape {dataset.shape}"
        )
    return np.asarray(dataset[()])


def _read_signs_file(path: Path, images_key: str, labels_key: str) -> tuple[np.ndarray, ...]:
    """Images (N, H, W, C) uint8, label values (N,) and class values (K,) of one SIGNS file."""
    import h5py

    if not path.is_file():
        raise DatasetFormatError(
            f"{path} not found: a signs dataset needs train_signs.h5 and test_signs.h5; run the "
            "download stage with data.source set to the directory holding them"
        )
    try:
        # read-only and without HDF5 file locking: the file may sit in a read-only DVC cache
        with h5py.File(path, "r", locking=False) as file:
            images = _h5_integers(file, images_key, path, 4)
            labels = _h5_integers(file, labels_key, path, 1)
            classes = _h5_integers(file, SIGNS_CLASSES_KEY, path, 1)
    except OSError as error:
        raise DatasetFormatError(f"{path}: not a readable HDF5 file: {error}") from None
    if images.shape[-1] not in (1, 3):
        raise DatasetFormatError(
            f"{path}: {images_key!r} has shape {images.shape}; expected (N, H, W, C) with 1 or 3 "
            "channels last"
        )
    if images.dtype != np.uint8:
        if images.size and (images.min() < 0 or images.max() > 255):
            raise DatasetFormatError(
                f"{path}: {images_key!r} ({images.dtype}) has values in "
                f"[{images.min()}, {images.max()}]; pixels must be 0..255"
            )
        images = images.astype(np.uint8)
    if len(labels) != len(images):
        raise DatasetFormatError(
            f"{path}: {labels_key!r} has {len(labels)} labels but {images_key!r} has "
            f"{len(images)} images"
        )
    if classes.size == 0 or len(np.unique(classes)) != classes.size:
        raise DatasetFormatError(
            f"{path}: {SIGNS_CLASSES_KEY!r} must list distinct class values, got {classes.tolist()}"
        )
    unknown = np.setdiff1d(labels, classes)
    if unknown.size:
        raise DatasetFormatError(
            f"{path}: {labels_key!r} holds values {unknown[:10].tolist()} that are not in "
            f"{SIGNS_CLASSES_KEY!r} {classes.tolist()}"
        )
    return np.ascontiguousarray(images), labels.astype(np.int64), classes.astype(np.int64)


def read_signs(files_dir: Path) -> Splits:
    """Read the hand-sign set's ``train_signs.h5`` and ``test_signs.h5`` from a directory.

    Each file holds ``<split>_set_x`` (N, 64, 64, 3) uint8, ``<split>_set_y`` (N,) integer
    labels and ``list_classes`` (K,), the label values. Labels are returned as indices into
    ``list_classes`` (the identity for the published files, whose classes are 0..5) and the
    class names are those values as strings.

    Args:
        files_dir: the directory holding the two files.

    Returns:
        The splits, images (N, H, W, C) uint8 with C 1 or 3, labels int64.

    Raises:
        DatasetFormatError: a file or dataset is missing, has the wrong type or shape, labels
            and images differ in number, a label is not in ``list_classes``, or the two files
            disagree on the classes or the image shape; the message names the file.
    """
    files_dir = Path(files_dir)
    parts = {}
    for split, (name, images_key, labels_key) in SIGNS_FILES.items():
        parts[split] = _read_signs_file(files_dir / name, images_key, labels_key)
    (x_train, y_train, classes), (x_test, y_test, test_classes) = parts["train"], parts["test"]
    train_name, test_name = SIGNS_FILES["train"][0], SIGNS_FILES["test"][0]
    if not np.array_equal(classes, test_classes):
        raise DatasetFormatError(
            f"{files_dir / test_name}: {SIGNS_CLASSES_KEY!r} is {test_classes.tolist()} but "
            f"{train_name} has {classes.tolist()}; both files must list the same classes"
        )
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DatasetFormatError(
            f"{files_dir / test_name}: images are {x_test.shape[1:]} but those of {train_name} "
            f"are {x_train.shape[1:]}; both splits must have the same image shape"
        )
    # a label's index is the position of its value in list_classes (every value is there)
    sorter = np.argsort(classes)
    y_train = sorter[np.searchsorted(classes, y_train, sorter=sorter)]
    y_test = sorter[np.searchsorted(classes, y_test, sorter=sorter)]
    return Splits(
        x_train,
        y_train.astype(np.int64),
        x_test,
        y_test.astype(np.int64),
        [str(int(value)) for value in classes],
    )
