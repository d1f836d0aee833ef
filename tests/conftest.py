"""Shared fixtures: the repository root and a quiet environment for stage subprocesses."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

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
