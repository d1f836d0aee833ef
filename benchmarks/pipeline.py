"""Time the README's main job and a no-op `dvc repro`, against their targets and DVC's own start-up.

    python benchmarks/pipeline.py            # clone HEAD into a scratch dir, run both, print a table
    python benchmarks/pipeline.py --repeat 9

The main job is `dvc repro` from scratch on the embedded sample (the install step of `make demo`
is not included). The no-op repro runs right after it, when every stage is up to date; its
reference is `dvc --version` in the same run (the cost of starting DVC at all). Then the no-op
Prefect pipeline flow: `scripts/prefect-up.sh` starts a local server for the clone, and
`python -c "from flows.pipeline import pipeline; pipeline()"` runs with everything up to date,
timed whole (Python start-up and imports included) and against `python -c "import prefect"`.
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
TARGETS_S = {"main job": 300.0, "no-op dvc repro": 1.0, "no-op flow": 5.0}  # the targets


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    """Seconds ``cmd`` took; exits with the end of its output when it fails."""
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        tail = "\n".join(result.stdout.splitlines()[-25:])
        raise SystemExit(f"{tail}\nerror: `{' '.join(cmd)}` exited with {result.returncode} in "
                         f"the scratch clone of HEAD; nothing was timed (its output ends above)")
    return elapsed


def noop_flow(repo: Path, env: dict[str, str], repeat: int) -> tuple[float, float]:
    """Median seconds of the no-op pipeline flow and of importing prefect, on a local server."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "DEEPNETS_ROOT": str(repo),
           "PREFECT_HOME": str(repo / ".prefect")}
    up = ["bash", "scripts/prefect-up.sh", "--port", str(port)]
    subprocess.run(up, cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL)
    try:
        code = "from flows.pipeline import pipeline; pipeline()"
        flows = [timed([sys.executable, "-c", code], repo, env) for _ in range(repeat)]
        imports = [timed([sys.executable, "-c", "import prefect"], repo, env)
                   for _ in range(repeat)]
    finally:
        subprocess.run([*up, "--down"], cwd=repo, env=env, stdout=subprocess.DEVNULL)
    return statistics.median(flows), statistics.median(imports)


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
        flow, prefect_import = noop_flow(repo, env, args.repeat)

    noop_s, startup_s = statistics.median(noop), statistics.median(startup)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"{'measure':<18} {'seconds':>8} {'target':>7} {'ratio to target':>16}")
    for name, value in (("main job", main_job), ("no-op dvc repro", noop_s), ("no-op flow", flow)):
        target = TARGETS_S[name]
        print(f"{name:<18} {value:8.2f} {target:7.0f} {value / target:16.2f}")
    print(f"no-op dvc repro / dvc --version start-up ({startup_s:.2f} s): {noop_s / startup_s:.2f}")
    print(f"no-op flow / python -c 'import prefect' ({prefect_import:.2f} s): "
          f"{flow / prefect_import:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
