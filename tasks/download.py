"""The download stage: fetch a dataset's canonical files, verify them, lay out the raw directory.

``python -m tasks.download --out data/raw [--params params.yaml]``

Sources are tried in order: ``data.mirror`` (a local directory, ``file://`` or ``http(s)://``
URL holding the files under their canonical names), then the official hosts. Each transfer is
retried with exponential backoff on network errors and truncated bodies; every file must match
its pinned sha256 before it is kept. Everything is written into a temporary sibling of the
output directory and renamed onto it at the very end, so a failed run leaves nothing behind.

The raw directory holds ``manifest.json`` (dataset, kind, sha256 and origin of every file),
``files/`` (the verified files as fetched) and, for CIFAR, the safely extracted tarball under
``extracted/``. An ``imagefolder`` dataset is a directory or tar(.gz) of class folders
(``data.source``); it is stored as one tar in ``files/`` and never extracted. A ``signs``
dataset (the hand-sign set, which has no official download) is a directory (``data.source``)
holding ``train_signs.h5`` and ``test_signs.h5``; both are copied into ``files/`` and checked.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import socket
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import BinaryIO

from tasks import datasets
from tasks.config import DEFAULT_PARAMS, load_params_or_exit
from tasks.datasets import DatasetFormatError, DatasetSpec, RemoteFile
from tasks.safety import UnsafeArchiveError, check_members, safe_extract

CHUNK = 1 << 20
USER_AGENT = "deepnets-download/0.1 (+python urllib)"
# HTTP statuses worth retrying: the server or a proxy may recover
_TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
# datasets read from data.source rather than downloaded: no pinned files, no official host
LOCAL_DATASETS = ("imagefolder", "signs")
SIGNS_HINT = "the directory holding train_signs.h5 and test_signs.h5 (the hand-sign set)"


class DownloadError(RuntimeError):
    """No source delivered a verified copy, or the fetched data could not be laid out."""


class _Transient(Exception):
    """A failure that another attempt at the same source may not repeat."""


class _Permanent(Exception):
    """A failure that retrying the same source will repeat (missing file, wrong checksum)."""


@dataclass
class _Attempts:
    """What happened at one source, for the final error message."""

    location: str
    reason: str
    attempts: int

    def describe(self) -> str:
        """One clause: the location, why it failed, and after how many attempts."""
        tries = f" after {self.attempts} attempts" if self.attempts > 1 else ""
        return f"{self.location} ({self.reason}{tries})"


def _is_url(location: str) -> bool:
    return urllib.parse.urlsplit(location).scheme.lower() in ("http", "https", "file")


def _join(base: str, name: str) -> str:
    """The location of file ``name`` under a base directory or URL."""
    if _is_url(base):
        return base.rstrip("/") + "/" + urllib.parse.quote(name)
    return str(Path(base).expanduser() / name)


def _local_path(location: str) -> Path | None:
    """The filesystem path of a plain path or file:// URL; None for http(s)."""
    parts = urllib.parse.urlsplit(location)
    if parts.scheme.lower() == "file":
        return Path(urllib.request.url2pathname(parts.path))
    if parts.scheme.lower() in ("http", "https"):
        return None
    return Path(location)


def _copy_stream(
    source: BinaryIO, dest: Path, total: int | None, desc: str, progress: bool
) -> tuple[int, str]:
    """Copy source into dest with a progress bar; return (bytes copied, sha256)."""
    from tqdm import tqdm

    digest = hashlib.sha256()
    received = 0
    with (
        open(dest, "wb") as out,
        tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=desc,
            file=sys.stderr,
            disable=not progress,
            leave=False,
        ) as bar,
    ):
        while chunk := source.read(CHUNK):
            out.write(chunk)
            digest.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    return received, digest.hexdigest()


def _fetch_once(
    remote: RemoteFile, location: str, dest: Path, timeout_s: float, progress: bool
) -> None:
    """One attempt to put a verified copy of ``remote`` at ``dest``.

    Raises _Transient for failures worth retrying and _Permanent for the others.
    """
    part = dest.with_name(dest.name + ".part")
    declared: int | None = None
    local = _local_path(location)
    try:
        if local is not None:
            if not local.is_file():
                raise _Permanent("no such file")
            with open(local, "rb") as source:
                received, digest = _copy_stream(source, part, remote.size, remote.name, progress)
        else:
            request = urllib.request.Request(location, headers={"User-Agent": USER_AGENT})
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                length = response.headers.get("Content-Length")
                declared = int(length) if length and length.isdigit() else None
                received, digest = _copy_stream(
                    response, part, declared or remote.size, remote.name, progress
                )
    except urllib.error.HTTPError as error:
        part.unlink(missing_ok=True)
        reason = f"HTTP {error.code} {error.reason}"
        raise (_Transient if error.code in _TRANSIENT_HTTP else _Permanent)(reason) from None
    except urllib.error.URLError as error:
        part.unlink(missing_ok=True)
        # an unknown host name stays unknown (offline, or a typo in data.mirror); a temporary
        # resolver failure (EAI_AGAIN) and everything else may clear up
        reason = error.reason
        if isinstance(reason, socket.gaierror) and reason.errno == socket.EAI_NONAME:
            raise _Permanent(f"host not found: {reason}") from None
        raise _Transient(f"network error: {reason}") from None
    except (HTTPException, TimeoutError, ConnectionError) as error:
        part.unlink(missing_ok=True)
        raise _Transient(f"network error: {type(error).__name__}: {error}") from None
    except OSError as error:
        part.unlink(missing_ok=True)
        # a local read error will not go away; a socket-level one might
        if local is not None:
            raise _Permanent(f"cannot read: {error}") from None
        raise _Transient(f"network error: {error}") from None

    # http.client returns a short body without complaint when the connection closes early
    if declared is not None and received < declared:
        part.unlink()
        raise _Transient(f"truncated transfer: received {received} of {declared} bytes")
    if not remote.accepts(digest):
        part.unlink()
        # without a Content-Length only the expected size can reveal a cut-off body
        if local is None and declared is None and remote.size and received < remote.size:
            raise _Transient(f"truncated transfer: received {received} of {remote.size} bytes")
        raise _Permanent(
            f"sha256 checksum mismatch: got {digest}, expected {remote.sha256} "
            f"({received} bytes); the file was deleted"
        )
    os.replace(part, dest)


def _fetch(
    remote: RemoteFile,
    locations: list[str],
    dest: Path,
    *,
    retries: int,
    timeout_s: float,
    backoff_s: float,
    progress: bool,
) -> tuple[str | None, list[_Attempts]]:
    """Try each location in turn; return (the one that delivered or None, the failures)."""
    failures: list[_Attempts] = []
    for location in locations:
        for attempt in range(retries + 1):
            try:
                _fetch_once(remote, location, dest, timeout_s, progress)
                return location, failures
            except _Permanent as error:
                failures.append(_Attempts(location, str(error), attempt + 1))
                print(f"warning: {location}: {error}", file=sys.stderr)
                break
            except _Transient as error:
                if attempt == retries:
                    failures.append(_Attempts(location, str(error), attempt + 1))
                    print(f"warning: {location}: {error}; giving up on it", file=sys.stderr)
                    break
                delay = backoff_s * 2**attempt
                print(f"warning: {location}: {error}; retrying in {delay:g} s", file=sys.stderr)
                time.sleep(delay)
    return None, failures


def _fix_hint(dataset: str, spec: DatasetSpec) -> str:
    """The sentence telling the user how to get the files another way."""
    names = [remote.name for remote in spec.files]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    hint = (
        "To fix this, set data.mirror in params.yaml to a local directory, or a file:// or "
        f"http(s):// URL, that holds {listed} under exactly those names (they are checked "
        "against the pinned sha256, so any copy of the canonical files will do)"
    )
    if dataset == "fashion_mnist":
        return hint + (
            "; for offline use install the Debian package dataset-fashion-mnist "
            f"(apt-get install dataset-fashion-mnist) and set data.mirror: {DEBIAN_FASHION_MNIST}."
        )
    return hint + (
        "; for offline use copy the files into such a directory from a machine that has them "
        "(as, for Fashion-MNIST, the Debian package dataset-fashion-mnist does at "
        f"{DEBIAN_FASHION_MNIST})."
    )


def _registry_spec(dataset: str) -> DatasetSpec:
    """The pinned spec, looked up at call time so tests can swap the registry."""
    try:
        return datasets.DATASETS[dataset]
    except KeyError:
        known = ", ".join(sorted([*datasets.DATASETS, *LOCAL_DATASETS]))
        raise DownloadError(
            f"unknown dataset {dataset!r}: set data.dataset in params.yaml to one of {known}"
        ) from None


def _download_canonical(
    dataset: str,
    spec: DatasetSpec,
    work: Path,
    out_dir: Path,
    *,
    mirror: str | None,
    retries: int,
    timeout_s: float,
    backoff_s: float,
    progress: bool,
) -> dict[str, object]:
    """Fetch and verify every file of spec into work/files; return the manifest."""
    files_dir = work / "files"
    files_dir.mkdir()
    bases = ([mirror] if mirror else []) + list(spec.urls)
    digests: dict[str, str] = {}
    sources: dict[str, str] = {}
    for remote in spec.files:
        locations = [_join(base, remote.name) for base in bases]
        dest = files_dir / remote.name
        found, failures = _fetch(
            remote,
            locations,
            dest,
            retries=retries,
            timeout_s=timeout_s,
            backoff_s=backoff_s,
            progress=progress,
        )
        if found is None:
            tried = "; ".join(f.describe() for f in failures) or "no sources configured"
            raise DownloadError(
                f"could not download {remote.name} for dataset {dataset}: every source failed: "
                f"{tried}. Nothing was written to {out_dir}. {_fix_hint(dataset, spec)}"
            )
        digests[remote.name] = _sha256(dest)
        sources[remote.name] = found
    if spec.kind == "cifar":
        for remote in spec.files:
            try:
                safe_extract(files_dir / remote.name, work / "extracted")
            except (UnsafeArchiveError, tarfile.TarError) as error:
                raise DownloadError(
                    f"cannot extract {remote.name} (from {sources[remote.name]}): {error}. "
                    f"Nothing was written to {out_dir}."
                ) from None
    manifest: dict[str, object] = {
        "dataset": dataset,
        "kind": spec.kind,
        "files": digests,
        "sources": sources,
    }
    if spec.kind == "idx":
        manifest["class_names"] = list(spec.class_names)
    return manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _pack_directory(source: Path, dest: Path) -> None:
    """Pack the images under source/{train,test}/<class>/ into a reproducible plain tar."""
    names: list[str] = []
    for split in ("train", "test"):
        top = source / split
        if not top.is_dir():
            continue
        for folder, dirs, files in os.walk(top):
            dirs.sort()
            for name in sorted(files):
                rel = (Path(folder) / name).relative_to(source).as_posix()
                if datasets.is_image_name(rel):
                    names.append(rel)
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel in names:
            data = (source / rel).read_bytes()
            # fixed metadata: the tar's checksum then depends only on names and contents
            info = tarfile.TarInfo(rel)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))


def _stage_imagefolder(source: str | None, work: Path, out_dir: Path) -> dict[str, object]:
    """Copy or pack an image-folder source into work/files; return the manifest."""
    if not source:
        raise DownloadError(
            "dataset imagefolder needs a source: set data.source in params.yaml to a directory "
            "or .tar.gz holding train/<class>/*.jpg|png and test/<class>/*.jpg|png"
        )
    path = Path(source).expanduser()
    files_dir = work / "files"
    files_dir.mkdir()
    if path.is_dir():
        name = f"{path.resolve().name or 'images'}.tar"
        _pack_directory(path, files_dir / name)
    elif path.is_file() and tarfile.is_tarfile(path):
        name = path.name
        shutil.copyfile(path, files_dir / name)
    else:
        what = "does not exist" if not path.exists() else "is neither a directory nor a tar archive"
        raise DownloadError(
            f"data.source = {source!r} {what}: set data.source in params.yaml to a directory "
            "or .tar.gz holding train/<class>/*.jpg|png and test/<class>/*.jpg|png"
        )
    archive = files_dir / name
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
        check_members(members, path)
        layout = datasets.scan_imagefolder([m.name for m in members if m.isfile()], str(path))
    except (UnsafeArchiveError, DatasetFormatError, tarfile.TarError) as error:
        raise DownloadError(f"{error}. Nothing was written to {out_dir}.") from None
    return {
        "dataset": "imagefolder",
        "kind": "imagefolder",
        "files": {name: _sha256(archive)},
        # as configured, not resolved: a relative source keeps dvc.lock the same in every checkout
        "sources": {name: str(path)},
        "archive": name,
        "class_names": layout.class_names,
    }


def _stage_signs(source: str | None, work: Path, out_dir: Path) -> dict[str, object]:
    """Copy the two SIGNS HDF5 files into work/files and check them; return the manifest."""
    if not source:
        raise DownloadError(
            f"dataset signs needs a source: set data.source in params.yaml to {SIGNS_HINT}"
        )
    path = Path(source).expanduser()
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a directory"
        raise DownloadError(
            f"data.source = {source!r} {what}: set data.source in params.yaml to {SIGNS_HINT}"
        )
    names = [name for name, _, _ in datasets.SIGNS_FILES.values()]
    missing = [name for name in names if not (path / name).is_file()]
    if missing:
        raise DownloadError(
            f"{' and '.join(missing)} not found in data.source = {source!r}: set data.source in "
            f"params.yaml to {SIGNS_HINT}. Nothing was written to {out_dir}."
        )
    files_dir = work / "files"
    files_dir.mkdir()
    for name in names:
        try:
            shutil.copyfile(path / name, files_dir / name)
        except OSError as error:
            raise DownloadError(
                f"cannot copy {path / name}: {error}. Nothing was written to {out_dir}."
            ) from None
    try:
        splits = datasets.read_signs(files_dir)
    except DatasetFormatError as error:
        raise DownloadError(f"{error}. Nothing was written to {out_dir}.") from None
    return {
        "dataset": "signs",
        "kind": "signs",
        "files": {name: _sha256(files_dir / name) for name in names},
        "sources": {name: str(path / name) for name in names},  # as configured, see above
        "class_names": splits.class_names,
    }


def download(
    dataset: str,
    out_dir: Path,
    *,
    mirror: str | None = None,
    source: str | None = None,
    retries: int = 4,
    timeout_s: float = 60.0,
    backoff_s: float = 1.0,
    spec: DatasetSpec | None = None,
    progress: bool = True,
) -> Path:
    """Fetch, verify and lay out a dataset in ``out_dir``, atomically.

    Args:
        dataset: cifar10, cifar100, mnist, fashion_mnist, imagefolder or signs.
        out_dir: the raw directory to (re)create; an existing one is replaced on success only.
        mirror: a directory or file:// / http(s):// URL holding the canonical files, tried
            before the official hosts.
        source: imagefolder: a directory or tar(.gz) of train/<class>/, test/<class>/;
            signs: the directory holding train_signs.h5 and test_signs.h5.
        retries: extra attempts per source after a network error or truncated transfer.
        timeout_s: socket timeout of each HTTP request.
        backoff_s: the wait before the first retry; it doubles with each further retry.
        spec: the files, checksums and URLs to use instead of the pinned registry entry.
        progress: show a tqdm progress bar on stderr.

    Returns:
        ``out_dir``.

    Raises:
        DownloadError: every source failed for some file (the message lists what was tried and
            how to set ``data.mirror``), or the data was unsafe or malformed. Nothing is written.
    """
    out_dir = Path(out_dir)
    if dataset not in LOCAL_DATASETS and spec is None:
        spec = _registry_spec(dataset)
    missing_parents = [p for p in out_dir.absolute().parents if not p.exists()]
    work = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    if work.exists():
        shutil.rmtree(work)
    try:
        work.mkdir(parents=True)
        if dataset == "imagefolder":
            manifest = _stage_imagefolder(source, work, out_dir)
        elif dataset == "signs":
            manifest = _stage_signs(source, work, out_dir)
        else:
            assert spec is not None
            manifest = _download_canonical(
                dataset,
                spec,
                work,
                out_dir,
                mirror=mirror,
                retries=retries,
                timeout_s=timeout_s,
                backoff_s=backoff_s,
                progress=progress,
            )
        (work / datasets.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out_dir.is_symlink() or out_dir.is_file():
            out_dir.unlink()
        elif out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        for parent in missing_parents:  # nearest first: leave no empty folders we made
            try:
                parent.rmdir()
            except OSError:
                break
        raise
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.download --out data/raw``: download the dataset params.yaml names.

    Args:
        argv: command-line arguments (default: sys.argv[1:]).

    Returns:
        0 on success, 1 when the download failed (the reason is printed on stderr). Bad
        params exit with status 2 before anything is touched.
    """
    parser = argparse.ArgumentParser(
        prog="python -m tasks.download",
        description="Download, verify and lay out the dataset named by params.yaml.",
    )
    parser.add_argument("--out", type=Path, default=Path("data/raw"), help="raw data directory")
    parser.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    data = load_params_or_exit(args.params).data
    try:
        out = download(
            data.dataset,
            args.out,
            mirror=data.mirror,
            source=data.source,
            retries=data.retries,
            timeout_s=data.timeout_s,
            progress=not args.no_progress,
        )
    except DownloadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    manifest = json.loads((out / datasets.MANIFEST).read_text())
    for name, digest in manifest["files"].items():
        print(f"{out / 'files' / name}  sha256 {digest}  from {manifest['sources'][name]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
