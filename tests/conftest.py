"""Shared fixtures: the repository root and a quiet environment for stage subprocesses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def stage_environment() -> dict[str, str]:
    """Environment for running stage entry points and dvc in a subprocess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    env["DVC_NO_ANALYTICS"] = "1"
    return env


@pytest.fixture
def stage_env() -> dict[str, str]:
    return stage_environment()


def run(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command, failing with its output when ``check`` and it exits non-zero."""
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=3600)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def set_params(repo: Path, updates: dict[str, object]) -> None:
    """Set dotted keys (``"train.epochs"``) in ``repo``'s params.yaml."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for dotted, value in updates.items():
        *parents, key = dotted.split(".")
        node = params
        for parent in parents:
            node = node.setdefault(parent, {})
        node[key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def scratch_repo(path: Path, env: dict, params: dict[str, object]) -> Path:
    """A git repository at ``path`` holding this checkout's files with ``params`` applied.

    Training there runs without XLA (``speed.jit_compile: false``) unless ``params`` says
    otherwise: the suite's runs are one or two short epochs, where compiling costs more than it
    saves. tests/test_speed.py and tests/test_resume.py run the default.
    """
    files = run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], ROOT, env)
    for name in files.stdout.splitlines():
        source = ROOT / name
        if source.is_file():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, path / name)
    set_params(path, {"speed.jit_compile": False, **params})
    run(["git", "init", "-q"], path, env)
    run(["git", "add", "-A"], path, env)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "scratch"], path, env)
    return path
