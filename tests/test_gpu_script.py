"""benchmarks/gpu.sh, the prepared GPU run, checked on this CPU with ``--smoke``: every part of
the short plan runs through the real scripts (Keras on JAX), each under its own time limit, and
a part that overruns is stopped and reported while the others still finish."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

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
