"""Defences for untrusted archives: member checks, safe tar extraction, a restricted unpickler.

Downloaded archives are verified against pinned checksums before they are opened, but the
checks here hold even for a file that matched: a tarball may not write outside its destination
(absolute names, ``..``, symbolic or hard links, devices) and a pickle may only rebuild the numpy
arrays, lists and dicts that the CIFAR batches consist of.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import shutil
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO


class UnsafeArchiveError(ValueError):
    """A tar member would escape the destination or is not a plain file or directory."""


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global outside the CIFAR allow-list."""


def member_problem(member: tarfile.TarInfo) -> str | None:
    """Say why a tar member is unsafe.

    Args:
        member: a member of an untrusted archive.

    Returns:
        A phrase such as "is a symbolic link (to '/etc/passwd')", or None when the member is a
        regular file or directory with a relative name free of ``..`` components.
    """
    name = member.name
    if not name:
        return "has an empty name"
    # A leading slash or a Windows drive/UNC prefix would make the name absolute on some platform.
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "is an absolute path"
    if ".." in PurePosixPath(name).parts or ".." in name.split("\\"):
        return "contains a '..' component"
    if member.issym():
        return f"is a symbolic link (to {member.linkname!r})"
    if member.islnk():
        return f"is a hard link (to {member.linkname!r})"
    if not (member.isfile() or member.isdir()):
        return "is not a regular file or directory (device, fifo or other special member)"
    return None


def check_members(members: list[tarfile.TarInfo], archive: str | os.PathLike[str]) -> None:
    """Check every member of an untrusted archive.

    Args:
        members: the archive's members.
        archive: the archive's name, for the message.

    Raises:
        UnsafeArchiveError: naming the first member that :func:`member_problem` objects to.
    """
    for member in members:
        problem = member_problem(member)
        if problem is not None:
            raise UnsafeArchiveError(
                f"refusing to use {os.fspath(archive)}: member {member.name!r} {problem}; "
                "only plain files and directories with relative paths are accepted"
            )


def safe_extract(archive: Path, dest: Path) -> list[str]:
    """Extract a tar archive (any compression) into ``dest``, refusing anything unsafe.

    Every member is checked before anything is written, so a refused archive leaves ``dest``
    as it was. Files are written by this function, not by ``tarfile.extract``, so neither the
    archive's owners nor its permission bits nor its links are ever applied.

    Args:
        archive: the tar file to extract.
        dest: the directory to extract into (created if missing).

    Returns:
        The names of the regular files extracted, in archive order.

    Raises:
        UnsafeArchiveError: a member is absolute, has a ``..`` component, is a link or a
            special file, or would resolve outside ``dest``.
        tarfile.TarError: the archive is not a readable tar file.
    """
    dest = Path(dest)
    root = dest.resolve()
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        check_members(members, archive)
        targets: list[tuple[tarfile.TarInfo, Path]] = []
        for member in members:
            target = (root / member.name).resolve()
            # Belt and braces: the name checks above should make this impossible.
            if target != root and root not in target.parents:
                raise UnsafeArchiveError(
                    f"refusing to use {archive}: member {member.name!r} would be written "
                    f"outside {dest}"
                )
            targets.append((member, target))
        root.mkdir(parents=True, exist_ok=True)
        written = []
        for member, target in targets:
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            source = tar.extractfile(member)
            assert source is not None  # regular files always have a payload
            with source, open(target, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
            written.append(member.name)
    return written


def _import_global(module: str, name: str) -> Any:
    return getattr(importlib.import_module(module), name)


def _reconstruct() -> Any:
    """numpy's array reconstructor, from numpy._core (numpy 2) or numpy.core (numpy 1)."""
    try:
        return _import_global("numpy._core.multiarray", "_reconstruct")
    except ImportError:  # numpy < 2
        return _import_global("numpy.core.multiarray", "_reconstruct")


# module, name -> loader: exactly the globals that numpy arrays in a protocol-2 pickle need.
# The legacy numpy.core name is what the real (Python 2) CIFAR batches reference; resolving it
# to numpy._core directly avoids numpy 2's deprecated-module shim.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): lambda: _import_global("numpy", "ndarray"),
    ("numpy", "dtype"): lambda: _import_global("numpy", "dtype"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can only rebuild numpy arrays plus plain containers and scalars.

    Any other global (``os.system``, ``subprocess.Popen``, ``builtins.eval``, ...) raises
    :class:`UnsafePickleError` before it is imported, so a malicious pickle cannot run code.
    """

    def find_class(self, module: str, name: str) -> Any:
        """Resolve only the allow-listed numpy globals."""
        loader = _ALLOWED_GLOBALS.get((module, name))
        if loader is None:
            allowed = ", ".join(f"{m}.{n}" for m, n in _ALLOWED_GLOBALS)
            raise UnsafePickleError(
                f"refusing to unpickle global {module}.{name}: only numpy array "
                f"reconstruction ({allowed}) is allowed in dataset pickles"
            )
        return loader()


def restricted_load(file: BinaryIO | bytes, *, source: str = "<pickle>") -> Any:
    """Unpickle with :class:`RestrictedUnpickler` and ``encoding="bytes"`` (Python 2 pickles).

    Args:
        file: an open binary file or the pickle's bytes.
        source: a name for the pickle, used in error messages.

    Returns:
        The unpickled object.

    Raises:
        UnsafePickleError: the pickle references a global outside the allow-list; the message
            names ``source``.
        pickle.UnpicklingError: the data is not a valid pickle.
    """
    stream = io.BytesIO(file) if isinstance(file, bytes | bytearray) else file
    try:
        return RestrictedUnpickler(stream, encoding="bytes").load()
    except UnsafePickleError as error:
        raise UnsafePickleError(f"{source}: {error}") from None
