"""The download stage on generated archives: mirrors, HTTP, retries, checksums, safety, failure."""

from __future__ import annotations

import io
import json
import socket
import tarfile
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml

from tasks import datasets
from tasks.datasets import DatasetSpec, Splits, read_raw
from tasks.download import DownloadError, download, main
from tasks.safety import UnsafeArchiveError, restricted_load
from tests.archives import (
    MNIST_FILES,
    TRAVERSAL_KINDS,
    Expected,
    imagefolder_members,
    make_cifar10,
    make_cifar100,
    make_imagefolder_dir,
    make_imagefolder_tar,
    make_mnist,
    make_traversal_cifar10,
    sha256,
    spec_for,
)

FAST = {"retries": 2, "timeout_s": 5.0, "backoff_s": 0.01, "progress": False}


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


class FileServer:
    """Serves files from a directory on 127.0.0.1, counting requests and cutting bodies short.

    truncate: how many requests per path get half the body; -1 means every request.
    send_length: whether to send Content-Length (when truncating, the full length is declared).
    """

    def __init__(self, root: Path, truncate: int = 0, send_length: bool = True) -> None:
        self.root, self.truncate, self.send_length = root, truncate, send_length
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                name = self.path.lstrip("/")
                server.requests.append(name)
                path = server.root / name
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                cut = server.truncate == -1 or server.requests.count(name) <= server.truncate
                self.send_response(200)
                if server.send_length:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2] if cut else data)
                self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def offline() -> str:
    return closed_port_url()


def assert_splits(splits: Splits, expected: Expected) -> None:
    assert splits.x_train.dtype == np.uint8 and splits.x_test.dtype == np.uint8
    assert splits.y_train.dtype == np.int64 and splits.y_test.dtype == np.int64
    np.testing.assert_array_equal(splits.x_train, expected.x_train)
    np.testing.assert_array_equal(splits.y_train, expected.y_train)
    np.testing.assert_array_equal(splits.x_test, expected.x_test)
    np.testing.assert_array_equal(splits.y_test, expected.y_test)
    assert splits.class_names == expected.class_names


def generate(name: str, directory: Path, urls: tuple[str, ...]) -> tuple[DatasetSpec, Expected]:
    """Generate dataset ``name`` into directory and a spec pinning it, served from urls."""
    directory.mkdir(parents=True, exist_ok=True)
    if name == "cifar10":
        path, expected = make_cifar10(directory)
        return spec_for(name, "cifar", [path], urls, expected.class_names), expected
    if name == "cifar100":
        path, expected = make_cifar100(directory)
        return spec_for(name, "cifar", [path], urls, expected.class_names), expected
    paths, expected = make_mnist(directory)
    return spec_for(name, "idx", paths, urls, expected.class_names), expected


def leftovers(parent: Path) -> list[str]:
    """Temporary directories or partial files a download left in parent."""
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or p.suffix == ".part")


# --- successful downloads -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "mnist"])
def test_download_from_mirror_directory_and_read(tmp_path: Path, offline: str, name: str) -> None:
    mirror = tmp_path / "mirror"
    spec, expected = generate(name, mirror, (offline,))
    out = tmp_path / "data" / "raw"

    assert download(name, out, mirror=str(mirror), spec=spec, **FAST) == out

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"] == name
    assert manifest["kind"] == spec.kind
    assert manifest["files"] == {f.name: f.sha256 for f in spec.files}
    assert manifest["sources"] == {f.name: str(mirror / f.name) for f in spec.files}
    for remote in spec.files:
        assert sha256(out / "files" / remote.name) == remote.sha256
    assert (out / "extracted").is_dir() == (spec.kind == "cifar")
    assert leftovers(out.parent) == []
    assert_splits(read_raw(out), expected)


def test_cifar_pixels_are_channels_last(tmp_path: Path, offline: str) -> None:
    spec, expected = generate("cifar10", tmp_path / "mirror", (offline,))
    out = download("cifar10", tmp_path / "raw", mirror=str(tmp_path / "mirror"), spec=spec, **FAST)
    splits = read_raw(out)
    assert splits.x_train.shape == (50, 32, 32, 3)
    assert splits.x_test.shape == (10, 32, 32, 3)
    # the first 1024 bytes of a CIFAR row are the red plane, row-major
    with tarfile.open(tmp_path / "mirror" / "cifar-10-python.tar.gz") as tar:
        member = tar.extractfile("cifar-10-batches-py/data_batch_1")
        assert member is not None
        rows = restricted_load(member.read())[b"data"]
    np.testing.assert_array_equal(splits.x_train[:10, :, :, 0].reshape(10, 1024), rows[:, :1024])
    np.testing.assert_array_equal(splits.x_train[:10, 0, 1, 2], rows[:, 2048 + 1])


def test_download_from_file_url_mirror(tmp_path: Path, offline: str) -> None:
    spec, expected = generate("mnist", tmp_path / "mirror", (offline,))
    mirror = (tmp_path / "mirror").as_uri()
    out = download("mnist", tmp_path / "raw", mirror=mirror, spec=spec, **FAST)
    assert json.loads((out / "manifest.json").read_text())["sources"] == {
        name: f"{mirror}/{name}" for name in MNIST_FILES
    }
    assert_splits(read_raw(out), expected)


@pytest.mark.parametrize("as_mirror", [True, False], ids=["mirror", "official"])
def test_download_over_http(tmp_path: Path, offline: str, as_mirror: bool) -> None:
    served = tmp_path / "served"
    with FileServer(served) as server:
        urls = (offline,) if as_mirror else (server.url,)
        spec, expected = generate("cifar10", served, urls)
        out = download(
            "cifar10", tmp_path / "raw", mirror=server.url if as_mirror else None, spec=spec, **FAST
        )
    assert server.requests == ["cifar-10-python.tar.gz"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sources"] == {"cifar-10-python.tar.gz": server.url + "cifar-10-python.tar.gz"}
    assert_splits(read_raw(out), expected)


def test_mirror_is_tried_before_official_and_missing_files_fall_through(tmp_path: Path) -> None:
    served = tmp_path / "served"
    with FileServer(served) as official:
        spec, expected = generate("mnist", served, (official.url,))
        mirror = tmp_path / "mirror"
        mirror.mkdir()
        # the mirror has only two of the four files
        for name in MNIST_FILES[:2]:
            (mirror / name).write_bytes((served / name).read_bytes())
        out = download("mnist", tmp_path / "raw", mirror=str(mirror), spec=spec, **FAST)
    assert official.requests == list(MNIST_FILES[2:])
    sources = json.loads((out / "manifest.json").read_text())["sources"]
    assert sources[MNIST_FILES[0]] == str(mirror / MNIST_FILES[0])
    assert sources[MNIST_FILES[3]] == official.url + MNIST_FILES[3]
    assert_splits(read_raw(out), expected)


def test_success_replaces_an_old_output_directory(tmp_path: Path, offline: str) -> None:
    spec, _ = generate("mnist", tmp_path / "mirror", (offline,))
    out = tmp_path / "raw"
    (out / "files").mkdir(parents=True)
    (out / "stale.txt").write_text("old")
    download("mnist", out, mirror=str(tmp_path / "mirror"), spec=spec, **FAST)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in (out / "files").iterdir()) == sorted(MNIST_FILES)


def test_registry_spec_is_used_without_spec(tmp_path: Path, monkeypatch, offline: str) -> None:
    spec, expected = generate("mnist", tmp_path / "mirror", (offline,))
    monkeypatch.setitem(datasets.DATASETS, "mnist", spec)
    out = download("mnist", tmp_path / "raw", mirror=str(tmp_path / "mirror"), **FAST)
    assert_splits(read_raw(out), expected)


# --- checksums and truncation --------------------------------------------------------------


def test_checksum_mismatch_deletes_reports_and_writes_nothing(
    tmp_path: Path, offline: str, capsys
) -> None:
    spec, _ = generate("mnist", tmp_path / "mirror", (offline,))
    wrong = replace(spec.files[1], sha256="0" * 64)
    spec = replace(spec, files=(spec.files[0], wrong, *spec.files[2:]))
    out = tmp_path / "raw"

    with pytest.raises(DownloadError) as caught:
        download("mnist", out, mirror=str(tmp_path / "mirror"), spec=spec, **FAST)

    message = str(caught.value)
    assert "sha256 checksum mismatch" in message
    assert f"got {sha256(tmp_path / 'mirror' / wrong.name)}" in message
    assert "expected " + "0" * 64 in message
    assert "deleted" in message
    assert "checksum mismatch" in capsys.readouterr().err
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_checksum_mismatch_on_mirror_falls_back_to_next_source(tmp_path: Path) -> None:
    served = tmp_path / "served"
    with FileServer(served) as official:
        spec, expected = generate("cifar10", served, (official.url,))
        mirror = tmp_path / "mirror"
        mirror.mkdir()
        (mirror / "cifar-10-python.tar.gz").write_bytes(b"not the real tarball")
        out = download("cifar10", tmp_path / "raw", mirror=str(mirror), spec=spec, **FAST)
    assert official.requests == ["cifar-10-python.tar.gz"]
    assert (mirror / "cifar-10-python.tar.gz").exists()  # the mirror itself is never touched
    assert_splits(read_raw(out), expected)


@pytest.mark.parametrize("send_length", [True, False], ids=["content-length", "expected-size"])
def test_truncated_transfer_is_retried_until_whole(tmp_path: Path, send_length: bool) -> None:
    served = tmp_path / "served"
    with FileServer(served, truncate=1, send_length=send_length) as server:
        spec, expected = generate("cifar10", served, (server.url,))
        out = download("cifar10", tmp_path / "raw", spec=spec, **FAST)
    assert server.requests == ["cifar-10-python.tar.gz"] * 2
    assert_splits(read_raw(out), expected)


def test_always_truncated_transfer_fails_after_retries(tmp_path: Path) -> None:
    served = tmp_path / "served"
    out = tmp_path / "raw"
    with FileServer(served, truncate=-1) as server:
        spec, _ = generate("cifar10", served, (server.url,))
        with pytest.raises(DownloadError) as caught:
            download("cifar10", out, spec=spec, **FAST)
    assert server.requests == ["cifar-10-python.tar.gz"] * (FAST["retries"] + 1)
    assert "truncated transfer" in str(caught.value)
    assert f"after {FAST['retries'] + 1} attempts" in str(caught.value)
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_http_404_is_not_retried(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with FileServer(tmp_path / "empty") as server:
        spec, _ = generate("cifar10", tmp_path / "elsewhere", (server.url,))
        with pytest.raises(DownloadError, match="HTTP 404"):
            download("cifar10", tmp_path / "raw", spec=spec, **FAST)
    assert server.requests == ["cifar-10-python.tar.gz"]


# --- offline and main() ----------------------------------------------------------------------


def test_offline_without_mirror_explains_data_mirror(tmp_path: Path, offline: str) -> None:
    spec, _ = generate("mnist", tmp_path / "elsewhere", (offline, offline + "second/"))
    out = tmp_path / "data" / "raw"

    with pytest.raises(DownloadError) as caught:
        download("mnist", out, spec=spec, **FAST)

    message = str(caught.value)
    assert "\n" not in message  # one paragraph
    assert "data.mirror" in message and "params.yaml" in message
    for name in MNIST_FILES:
        assert name in message
    assert f"{offline}train-images-idx3-ubyte.gz" in message
    assert f"{offline}second/train-images-idx3-ubyte.gz" in message
    assert "network error" in message and f"after {FAST['retries'] + 1} attempts" in message
    assert "dataset-fashion-mnist" in message
    assert not out.exists() and not out.parent.exists()


def test_offline_keeps_an_existing_output_directory(tmp_path: Path, offline: str) -> None:
    spec, _ = generate("mnist", tmp_path / "elsewhere", (offline,))
    out = tmp_path / "raw"
    out.mkdir()
    (out / "keep.txt").write_text("previous run")
    with pytest.raises(DownloadError):
        download("mnist", out, spec=spec, **FAST)
    assert (out / "keep.txt").read_text() == "previous run"
    assert leftovers(tmp_path) == []


def write_params(path: Path, **data: object) -> Path:
    path.write_text(yaml.safe_dump({"data": data}))
    return path


def test_main_offline_returns_nonzero(tmp_path: Path, monkeypatch, offline: str, capsys) -> None:
    spec, _ = generate("mnist", tmp_path / "elsewhere", (offline,))
    monkeypatch.setitem(datasets.DATASETS, "mnist", spec)
    params = write_params(tmp_path / "params.yaml", dataset="mnist", retries=0, timeout_s=5)
    out = tmp_path / "raw"

    assert main(["--out", str(out), "--params", str(params), "--no-progress"]) == 1

    err = capsys.readouterr().err
    assert err.startswith("error: ") or "\nerror: " in err
    assert "data.mirror" in err
    assert not out.exists()


def test_main_downloads_from_params_mirror(tmp_path: Path, monkeypatch, offline: str) -> None:
    spec, expected = generate("mnist", tmp_path / "mirror", (offline,))
    monkeypatch.setitem(datasets.DATASETS, "mnist", spec)
    params = write_params(
        tmp_path / "params.yaml", dataset="mnist", mirror=str(tmp_path / "mirror"), retries=0
    )
    out = tmp_path / "raw"
    assert main(["--out", str(out), "--params", str(params), "--no-progress"]) == 0
    assert_splits(read_raw(out), expected)


def test_main_bad_params_exit_2(tmp_path: Path) -> None:
    params = write_params(tmp_path / "params.yaml", dataset="imagenet")
    with pytest.raises(SystemExit) as caught:
        main(["--out", str(tmp_path / "raw"), "--params", str(params)])
    assert caught.value.code == 2
    assert not (tmp_path / "raw").exists()


# --- hostile archives -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", TRAVERSAL_KINDS)
def test_path_traversal_tarball_is_refused(tmp_path: Path, offline: str, kind: str) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    outside = tmp_path / "escaped.txt"
    path, hostile = make_traversal_cifar10(mirror, kind, outside)
    spec = spec_for("cifar10", "cifar", [path], (offline,))
    out = tmp_path / "raw"

    with pytest.raises(DownloadError) as caught:
        download("cifar10", out, mirror=str(mirror), spec=spec, **FAST)

    assert repr(hostile) in str(caught.value)
    assert not outside.exists()
    assert not out.exists()
    assert leftovers(tmp_path) == []


# --- image folders ----------------------------------------------------------------------------


def test_imagefolder_from_directory(tmp_path: Path) -> None:
    source, expected = make_imagefolder_dir(tmp_path / "pets")
    (source / "train" / "cat" / ".DS_Store").write_bytes(b"junk")  # ignored
    out = download("imagefolder", tmp_path / "raw", source=str(source), progress=False)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "imagefolder" and manifest["archive"] == "pets.tar"
    assert manifest["files"] == {"pets.tar": sha256(out / "files" / "pets.tar")}
    assert manifest["sources"] == {"pets.tar": str(source)}
    assert not (out / "extracted").exists()

    with tarfile.open(out / "files" / "pets.tar") as tar:  # plain tar, images only
        assert all(m.name.endswith(".png") for m in tar.getmembers())
    splits = read_raw(out)
    assert splits.x_train.shape == (12, 6, 8, 3)
    assert_splits(splits, expected)

    # packing is reproducible, so DVC sees the same file for the same images
    again = download("imagefolder", tmp_path / "raw2", source=str(source), progress=False)
    assert sha256(again / "files" / "pets.tar") == manifest["files"]["pets.tar"]


def test_a_relative_source_is_recorded_as_configured(tmp_path: Path, monkeypatch) -> None:
    # the manifest is part of data/raw's hash in dvc.lock: it must not name the checkout's path
    manifests = []
    for copy in ("one", "two"):
        make_imagefolder_dir(tmp_path / copy / "pets")
        monkeypatch.chdir(tmp_path / copy)
        out = download("imagefolder", Path("raw"), source="pets", progress=False)
        manifests.append((out / "manifest.json").read_bytes())
    assert json.loads(manifests[0])["sources"] == {"pets.tar": "pets"}
    assert manifests[0] == manifests[1]


@pytest.mark.parametrize(
    "prefix", ["", "./", "pets/"], ids=["flat", "dot-slash", "enclosing-folder"]
)
def test_imagefolder_from_tar_gz(tmp_path: Path, prefix: str) -> None:
    source, expected = make_imagefolder_tar(tmp_path / "pets.tar.gz", prefix=prefix)
    out = download("imagefolder", tmp_path / "raw", source=str(source), progress=False)
    assert (out / "files" / "pets.tar.gz").read_bytes() == source.read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"] == {"pets.tar.gz": sha256(source)}
    assert manifest["class_names"] == ["cat", "dog", "frog"]
    assert_splits(read_raw(out), expected)


def test_imagefolder_grayscale_has_one_channel(tmp_path: Path) -> None:
    source, expected = make_imagefolder_tar(tmp_path / "gray.tar.gz", channels=1, size=(5, 7))
    splits = read_raw(download("imagefolder", tmp_path / "raw", source=str(source)))
    assert splits.x_train.shape == (12, 7, 5, 1)
    assert_splits(splits, expected)


def test_imagefolder_mismatched_size_names_the_file(tmp_path: Path) -> None:
    source, _ = make_imagefolder_dir(tmp_path / "pets")
    from PIL import Image

    Image.new("RGB", (9, 6)).save(source / "test" / "dog" / "odd.png")
    out = download("imagefolder", tmp_path / "raw", source=str(source), progress=False)
    with pytest.raises(datasets.DatasetFormatError) as caught:
        read_raw(out)
    message = str(caught.value)
    assert "test/dog/odd.png is 9x6 RGB" in message and "8x6 RGB" in message


def test_imagefolder_mismatched_mode_names_the_file(tmp_path: Path) -> None:
    source, _ = make_imagefolder_dir(tmp_path / "pets")
    from PIL import Image

    Image.new("L", (8, 6)).save(source / "train" / "frog" / "gray.png")
    out = download("imagefolder", tmp_path / "raw", source=str(source), progress=False)
    with pytest.raises(datasets.DatasetFormatError, match="train/frog/gray.png is 8x6 L"):
        read_raw(out)


def test_imagefolder_test_classes_must_match_train(tmp_path: Path) -> None:
    source, _ = make_imagefolder_dir(tmp_path / "pets")
    for image in (source / "test" / "frog").iterdir():
        image.unlink()
    (source / "test" / "frog").rmdir()
    out = tmp_path / "raw"
    with pytest.raises(DownloadError, match=r"missing from test: \['frog'\]"):
        download("imagefolder", out, source=str(source), progress=False)
    assert not out.exists()


def test_imagefolder_tar_with_symlink_is_refused(tmp_path: Path) -> None:
    members, _ = imagefolder_members()
    hostile = tmp_path / "hostile.tar"
    with tarfile.open(hostile, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("train/cat/link.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    out = tmp_path / "raw"
    with pytest.raises(DownloadError, match=r"'train/cat/link.png' is a symbolic link"):
        download("imagefolder", out, source=str(hostile), progress=False)
    assert not out.exists()
    # the reader refuses it too, should such an archive reach it by another route
    with pytest.raises(UnsafeArchiveError, match="link.png"):
        datasets.read_imagefolder(hostile)


@pytest.mark.parametrize("source", [None, "missing-dir"])
def test_imagefolder_needs_an_existing_source(tmp_path: Path, source: str | None) -> None:
    with pytest.raises(DownloadError, match="data.source"):
        download("imagefolder", tmp_path / "raw", source=source and str(tmp_path / source))
    assert not (tmp_path / "raw").exists()
