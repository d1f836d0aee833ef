"""The flows' access to a DVC workspace: every DVC call and params.yaml edit under one file lock.

DVC refuses two commands at once in one workspace, so the flows make DVC a single writer: each
``dvc`` call here takes an exclusive ``flock`` on ``.dvc/tmp/deepnets-flow.lock`` first, which
serialises the calls of every flow run (threads and processes alike) working in that
workspace. Training itself runs between DVC calls, outside the lock, in processes of its own;
DVC records its outputs afterwards with ``dvc commit``.

Every subprocess started here dies with the process that started it (Linux's parent-death
signal), so cancelling or killing a flow run never leaves a training behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

LOCK = Path(".dvc/tmp/deepnets-flow.lock")
PR_SET_PDEATHSIG = 1


class StageFailed(RuntimeError):
    """A DVC command or a stage's command exited non-zero."""


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL this process when the thread that started it ends."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def child_environment() -> dict[str, str]:
    """The environment for stage commands: this interpreter's bin directory first on PATH."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """Hold the workspace's flow lock (blocking until other flow runs release it)."""
    path = Path(root) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_command(args: list[str], root: Path, env: dict[str, str] | None = None,
                log: Callable[[str], None] | None = None) -> str:
    """Run ``args`` in ``root``, streaming its output lines to ``log``; return the output.

    Raises:
        StageFailed: the command exited non-zero (the message holds its last lines).
    """
    process = subprocess.Popen(
        args, cwd=root, env=env or child_environment(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, preexec_fn=_die_with_parent,
    )
    lines = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        if log is not None:
            log(line.rstrip())
    code = process.wait()
    output = "".join(lines)
    if code != 0:
        tail = "".join(lines[-25:])
        raise StageFailed(f"`{shlex.join(args)}` exited with {code}:\n{tail}")
    return output


def dvc(args: list[str], root: Path, log: Callable[[str], None] | None = None) -> str:
    """``dvc ARGS`` in ``root`` under the workspace lock."""
    with locked(root):
        return run_command(["dvc", *args], root, log=log)


def stage_changed(stage: str, root: Path) -> bool:
    """Whether DVC would run ``stage`` (its deps, params or outs changed)."""
    status = json.loads(dvc(["status", "--json", stage], root) or "{}")
    return bool(status)


def pipeline_changed(root: Path) -> bool:
    """Whether DVC would run any stage of the pipeline (one ``dvc status`` over all of them)."""
    return bool(json.loads(dvc(["status", "--json"], root) or "{}"))


def stage_command(stage: str, root: Path) -> str:
    """The command dvc.yaml gives ``stage`` (templated, e.g. ``train@resnet20_v1``)."""
    from dvc.repo import Repo

    with locked(root), Repo(str(root)) as repo:
        (found,) = repo.stage.collect(stage)
        return found.cmd


def set_params(root: Path, updates: dict[str, Any], add_models: list[str] = ()) -> None:
    """Set dotted keys (``{"train.epochs": 1}``) in params.yaml, keeping its comments, and
    append ``add_models`` to model.names where missing.

    Like ``dvc exp run -S``: the edit stays in the workspace and the stages it touches rerun.
    Read, changed and written (to a temporary file, then renamed) under the workspace lock, so
    two runs adding different models both land.
    """
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    path = Path(root) / "params.yaml"
    with locked(root):
        data = yaml.load(path.read_text())
        for dotted, value in updates.items():
            *parents, key = dotted.split(".")
            node = data
            for part in parents:
                if part not in node or node[part] is None:
                    node[part] = {}
                node = node[part]
            node[key] = value
        names = data["model"]["names"]
        names.extend(m for m in add_models if m not in names)
        tmp = path.with_name(f"params.yaml.tmp-{os.getpid()}")
        with open(tmp, "w") as handle:
            yaml.dump(data, handle)
        os.replace(tmp, path)


def listed_models(root: Path) -> list[str]:
    """model.names from params.yaml, validated."""
    from tasks.config import load_params

    with locked(root):
        return list(load_params(Path(root) / "params.yaml").model.names)
