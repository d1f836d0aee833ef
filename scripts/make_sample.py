"""Rebuild samples/cifar10-sample.tar.gz, the embedded default dataset, from the CIFAR-10 JPEG archive.

Takes the first N training and M test images (by file name) of every class from a class-folder
archive (train/<class>/NNNN.jpg, test/<class>/NNNN.jpg) and writes them, byte for byte, into a
deterministic tar.gz (sorted members, fixed owner and timestamps), so the output's checksum depends
only on the input.

    python scripts/make_sample.py ../shared/datasets/cifar10-jpeg.tar.gz samples/cifar10-sample.tar.gz
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import tarfile
from collections import defaultdict
from pathlib import Path


def select_members(archive: Path, per_class: dict[str, int]) -> dict[str, bytes]:
    """Map member name -> bytes for the first per_class[split] images of each class, by name."""
    by_class: dict[tuple[str, str], list[str]] = defaultdict(list)
    with tarfile.open(archive, "r:gz") as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
        for name in names:
            split, label, _ = name.split("/", 2)
            by_class[split, label].append(name)
        wanted = {
            name
            for (split, _), members in by_class.items()
            if split in per_class
            for name in sorted(members)[: per_class[split]]
        }
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name in wanted}


def write_deterministic_tar(files: dict[str, bytes], out: Path) -> None:
    """Write files into out as a tar.gz whose bytes depend only on the content."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size = len(files[name])
            info.mode, info.mtime, info.uname, info.gname = 0o644, 0, "", ""
            tar.addfile(info, io.BytesIO(files[name]))
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        gz.write(buffer.getvalue())
    os.replace(tmp, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("archive", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=100, help="training images per class")
    parser.add_argument("--test", type=int, default=20, help="test images per class")
    args = parser.parse_args()
    files = select_members(args.archive, {"train": args.train, "test": args.test})
    write_deterministic_tar(files, args.out)
    print(f"wrote {len(files)} images to {args.out} ({args.out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
