"""Time the README's main job and a no-op `dvc repro`, against their targets and DVC's own start-up.

    python benchmarks/pipeline.py            # clone HEAD into a scratch dir, run both, print a table
    python benchmarks/pipeline.py --repeat 9

The main job is `dvc repro` from scratch on the embedded sample (the install step of `make demo`
is not included). The no-op repro runs right after it, when every stage is up to date; its
reference is `dvc --version` in the same run (the cost of starting DVC at all).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS_S = {"main job": 300.0, "no-op dvc repro": 1.0}  # the performance targets


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs of each short command")
    args = parser.parse_args()

    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    with tempfile.TemporaryDirectory() as scratch:
        repo = Path(scratch) / "repo"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(repo)], check=True)
        main_job = timed(["dvc", "repro"], repo, env)
        noop = [timed(["dvc", "repro"], repo, env) for _ in range(args.repeat)]
        startup = [timed(["dvc", "--version"], repo, env) for _ in range(args.repeat)]

    noop_s, startup_s = statistics.median(noop), statistics.median(startup)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"{'measure':<18} {'seconds':>8} {'target':>7} {'ratio to target':>16}")
    for name, value in (("main job", main_job), ("no-op dvc repro", noop_s)):
        target = TARGETS_S[name]
        print(f"{name:<18} {value:8.2f} {target:7.0f} {value / target:16.2f}")
    print(f"no-op dvc repro / dvc --version start-up ({startup_s:.2f} s): {noop_s / startup_s:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
