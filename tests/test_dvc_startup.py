"""What every dvc command pays before it does any work.

A no-op `dvc repro` is mostly DVC's start-up (docs/benchmarks.md). DVC imports networkx to build
its stage graph; networkx 3.2 and later read the entry points of every installed package while
they import, which in this environment of several hundred packages cost about 0.1 s per dvc
command. pyproject.toml pins networkx below 3.2; this test fails if an upgrade brings the scan
back.
"""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import importlib.metadata as metadata
import json

calls = []
real = metadata.entry_points

def counting(*args, **kwargs):
    calls.append(kwargs.get("group") or repr(args))
    return real(*args, **kwargs)

metadata.entry_points = counting
import networkx  # noqa: E402

print(json.dumps({"version": networkx.__version__, "calls": calls}))
"""


def test_importing_networkx_reads_no_entry_points():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    probe = json.loads(result.stdout)
    assert probe["calls"] == [], (
        f"networkx {probe['version']} read entry points {probe['calls']} on import, which slows "
        "every dvc command; keep networkx below 3.2 (pyproject.toml) or drop this test once "
        "networkx stops doing so"
    )


def test_the_probe_sees_an_entry_point_scan():
    """The probe itself counts a scan made the way networkx 3.2+ makes one."""
    probe = PROBE.replace("import networkx  # noqa: E402",
                          "from importlib.metadata import entry_points\n"
                          "entry_points(group='networkx.backends')\n"
                          "import types\nnetworkx = types.SimpleNamespace(__version__='stand-in')")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout)["calls"] == ["networkx.backends"]
