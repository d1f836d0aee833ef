"""benchmarks/gpu.sh, the prepared GPU run, checked on this CPU with ``--smoke``: every part of
the short plan runs through the real scripts (Keras on JAX), each under its own time limit, and
a part that overruns is stopped and reported while the others still finish, and stopping the
script stops every part it started."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.archives import make_imagefolder_tar
from tests.conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu.sh"


def _gpu_sh(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})},
                          timeout=600)


def test_bad_arguments_stop_the_gpu_script_before_it_writes_anything(tmp_path) -> None:
    out = tmp_path / "out"
    empty = tmp_path / "wheels"
    empty.mkdir()
    for args, message in (
        (["--plan", "long", str(out)], "--plan long: use full or short"),
        (["--frobnicate", str(out)], "unknown option --frobnicate"),
        ([str(out), str(tmp_path / "missing.tar.gz")], "missing.tar.gz not found"),
        (["--wheels", str(empty), str(out)], "run bash benchmarks/gpu_prepare.sh first"),
    ):
        done = _gpu_sh(*args)
        assert done.returncode == 2, done.stderr
        assert message in done.stderr
        assert not out.exists()
    assert "--plan short" in _gpu_sh("--help").stdout


def test_the_short_gpu_plan_runs_every_part_and_stops_one_at_its_limit(tmp_path) -> None:
    archive, _ = make_imagefolder_tar(tmp_path / "images.tar.gz", train_per_class=22,
                                      test_per_class=11, size=(32, 32))
    out = tmp_path / "out"
    done = _gpu_sh("--plan", "short", "--smoke", str(out), str(archive),
                   env={"TIMEOUT_MEMORY": "1"})
    log = (out / "gpu.log").read_text()
    assert done.stdout == log
    summary = log[log.index("== summary"):]
    # the memory part got one second: it is stopped, said so, and the run ends with exit 1
    assert "  memory: over its 1 s limit: stopped" in summary
    assert done.returncode == 1
    assert not (out / "memory.json").exists()
    # the accuracy runs beside it finished and were merged
    for name in ("precision float32 seed 1", "precision float32 seed 2",
                 "precision mixed_bfloat16 seed 1", "precision mixed_bfloat16 seed 2",
                 "precision (merged)"):
        assert f"  {name}: ok (" in summary, summary
    # the timing ran after them; without torch (not installed for the suite) it says how to
    # get it
    written = ["gpu.log", "precision.json"]
    if importlib.util.find_spec("torch"):
        assert "  throughput resnet20_v1: ok (" in summary
        timing = json.loads((out / "throughput-resnet20_v1.json").read_text())
        assert set(timing["nets"]["resnet20_v1"]["results"]) == {
            "keras:params", "torch:bf16+channels_last"}
        written.append("throughput-resnet20_v1.json")
    else:
        assert "  throughput resnet20_v1: failed (exit 2, " in summary
        assert "pip install -e .[benchmark]" in log
    precision = json.loads((out / "precision.json").read_text())
    assert sorted((r["setting"], r["seed"]) for r in precision["runs"]) == [
        ("precision=float32", 1), ("precision=float32", 2),
        ("precision=mixed_bfloat16", 1), ("precision=mixed_bfloat16", 2)]
    assert {r["speed"]["backend"] for r in precision["runs"]} == {"jax"}
    assert (precision["train_images"], precision["test_images"]) == (64, 32)
    assert sorted(p.name for p in out.iterdir()) == written


def _processes_naming(*texts: str) -> list[str]:
    """The command lines of running processes that hold every one of ``texts``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        if all(text in line for text in texts):
            found.append(line)
    return found


def test_stopping_the_gpu_script_stops_the_parts_it_started(tmp_path) -> None:
    archive, _ = make_imagefolder_tar(tmp_path / "images.tar.gz", train_per_class=22,
                                      test_per_class=11, size=(32, 32))
    out = tmp_path / "out"
    script = subprocess.Popen(["bash", str(SCRIPT), "--plan", "short", "--smoke", str(out),
                               str(archive)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHON": sys.executable}, text=True)
    deadline = time.monotonic() + 120
    # the four accuracy runs and memory.py's worker are under way
    while (len(_processes_naming("precision_accuracy.py", str(archive))) < 8  # timeout + python
           or not _processes_naming(str(ROOT / "benchmarks/memory.py"), "--worker")):
        assert script.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    script.send_signal(signal.SIGTERM)
    output, _ = script.communicate(timeout=60)
    assert script.returncode == 130
    assert "interrupted: stopping the parts still running" in output
    def left() -> list[str]:
        return (_processes_naming(str(tmp_path))
                + _processes_naming(str(ROOT / "benchmarks/memory.py"), "--worker"))

    deadline = time.monotonic() + 20
    while left() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left() == []


def test_gpu_prepare_stops_on_a_missing_archive_before_it_fetches_anything(tmp_path) -> None:
    before = sorted(p.name for p in ROOT.iterdir())
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_prepare.sh"),
                           str(tmp_path / "cifar.tar.gz")], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)
    assert done.returncode == 2
    assert f"{tmp_path / 'cifar.tar.gz'} not found" in done.stderr
    assert sorted(p.name for p in ROOT.iterdir()) == before  # no .gpu-staging.* left behind
