"""The Prefect flows with real parts: a Prefect server on 127.0.0.1, the `gpu` process work pool,
the deployments of prefect.yaml, real workers, real DVC, in a scratch copy of this repository.

One server and workspace back the module, in order: two on-demand trainings of different
architectures at once (two workers), a second pipeline run that trains nothing, a cancelled
run that leaves no process behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import run, scratch_repo, stage_environment

NETS = ["simple_cnn", "resnet20_v1"]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _start(cmd: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """(repo, env): a running server, the gpu pool, prefect.yaml deployed, two workers."""
    base = tmp_path_factory.mktemp("flows")
    env = stage_environment()
    repo = scratch_repo(base / "repo", env, {"train.epochs": 1, "model.names": [NETS[0]]})
    port = _free_port()
    env.update(PREFECT_API_URL=f"http://127.0.0.1:{port}/api", DEEPNETS_ROOT=str(repo))
    processes = []
    try:
        # the README's one command: server, gpu pool, deployments, crash automation
        up = run(["bash", "scripts/prefect-up.sh", "--port", str(port)], repo, env)
        assert "server: http://127.0.0.1" in up.stdout
        env["PREFECT_HOME"] = str(repo / ".prefect")
        for index in range(2):  # two workers, one flow run each at a time
            processes.append(_start(["prefect", "worker", "start", "--pool", "gpu", "--limit", "1"],
                                    repo, env, base / f"worker{index}.log"))
        yield repo, env
    finally:
        for process in reversed(processes):
            _stop(process)
        run(["bash", "scripts/prefect-up.sh", "--port", str(port), "--down"], repo, env,
            check=False)


def _client_call(env: dict, code: str) -> object:
    """Run ``code`` (sync Prefect client as ``c``; it sets ``result``) in a subprocess."""
    script = (
        "import json\n"
        "from prefect.client.orchestration import get_client\n"
        "with get_client(sync_client=True) as c:\n"
        + "".join(f"    {line}\n" for line in code.strip().splitlines())
        + "print('RESULT=' + json.dumps(result, default=str))\n"
    )
    output = run([sys.executable, "-c", script], Path.cwd(), env).stdout
    return json.loads(output.split("RESULT=", 1)[1])


def _trigger(env: dict, deployment: str, parameters: dict) -> str:
    return _client_call(env, f"""
deployment = c.read_deployment_by_name({deployment!r})
result = str(c.create_flow_run_from_deployment(deployment.id, parameters={parameters!r}).id)
""")


def _state(env: dict, flow_run: str) -> str:
    return _client_call(env, f"result = c.read_flow_run({flow_run!r}).state.type.value")


def _artifacts(env: dict, flow_run: str) -> dict[str, object]:
    return _client_call(env, f"""
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from uuid import UUID
found = c.read_artifacts(artifact_filter=ArtifactFilter(
    flow_run_id=ArtifactFilterFlowRunId(any_=[UUID({flow_run!r})])))
result = {{a.key: a.data for a in found}}
""")


def _processes_of(flow_run: str) -> list[int]:
    """PIDs whose environment names the flow run (the flow process and everything it started)."""
    marker = f"PREFECT__FLOW_RUN_ID={flow_run}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_two_on_demand_trainings_at_once_then_a_rerun_that_trains_nothing(stack):
    repo, env = stack
    runs = {net: _trigger(env, "deepnets-train/train-on-demand", {"model": net}) for net in NETS}
    states = {net: _wait(lambda r=r: (s := _state(env, r)) in TERMINAL and s, 900,
                         f"flow run of {net}", interval=2) for net, r in runs.items()}
    assert states == dict.fromkeys(NETS, "COMPLETED"), states

    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    for net in NETS:
        for stage in ("train", "evaluate", "export"):
            assert f"{stage}@{net}" in lock, f"{stage}@{net} missing from dvc.lock"
        assert (repo / f"metrics/evaluate/{net}.json").exists()
        artifacts = _artifacts(env, runs[net])
        table = artifacts["deepnets-results"]
        rows = json.loads(table) if isinstance(table, str) else table
        assert [row["model"] for row in rows] == [net] and rows[0]["this_run"] == "trained"
        assert 0 <= rows[0]["test_accuracy"] <= 100
        assert f"plots/evaluate/{net}/confusion.png" in artifacts["deepnets-links"]
    assert yaml.safe_load((repo / "params.yaml").read_text())["model"]["names"] == NETS
    # dvc.lock is valid and matches the workspace: DVC has nothing to do
    assert json.loads(run(["dvc", "status", "--json"], repo, env).stdout or "{}") == {}

    lock_before = (repo / "dvc.lock").read_text()
    started = time.perf_counter()
    rerun = run([sys.executable, "-c", "from flows.pipeline import pipeline; "
                 "print('TRAINED=' + repr(pipeline()))"], repo, env)
    print(f"\nno-op pipeline flow: {time.perf_counter() - started:.1f} s (process included)")
    assert "TRAINED={'simple_cnn': 'skipped', 'resnet20_v1': 'skipped'}" in rerun.stdout
    assert "Running stage" not in rerun.stdout + rerun.stderr
    assert (repo / "dvc.lock").read_text() == lock_before


def test_compare_tabulates_two_commits_and_publishes_the_table(stack):
    repo, env = stack
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    run(git + ["add", "-A"], repo, env)
    run(git + ["commit", "-qm", "first results"], repo, env)
    run(git + ["tag", "first"], repo, env)
    # a second commit: simple_cnn trained for 2 epochs instead of 1, resnet20_v1 as it was
    run([sys.executable, "-c", "from flows.pipeline import pipeline; "
         "pipeline(models=['simple_cnn'], params={'train.epochs': 2})"], repo, env)
    run(git + ["add", "-A"], repo, env)
    run(git + ["commit", "-qm", "two epochs"], repo, env)

    result = run([sys.executable, "-m", "tasks.cli", "compare", "first", "HEAD", "--artifact"],
                 repo, env)
    import pandas as pd

    frame = pd.read_csv(repo / "reports/compare/comparison.csv")
    assert len(frame) == 4 and set(frame["model"]) == set(NETS)
    epochs = {(r.revision, r.model): r.epochs for r in frame.itertuples()}
    head = next(label for label in frame["revision"] if label != "first")
    assert epochs[("first", "simple_cnn")] == 1 and epochs[(head, "simple_cnn")] == 2
    assert epochs[(head, "resnet20_v1")] == 1
    evaluated = json.loads((repo / "metrics/evaluate/simple_cnn.json").read_text())
    row = frame[(frame.revision == head) & (frame.model == "simple_cnn")].iloc[0]
    assert row.test_accuracy == round(100 * evaluated["test"]["accuracy"], 2)
    first = frame[(frame.revision == "first") & (frame.model == "simple_cnn")].iloc[0]
    assert row.vs_first == pytest.approx(row.test_accuracy - first.test_accuracy, abs=0.011)
    assert frame[frame.model == "resnet20_v1"]["book"].tolist() == [92.16, 92.16]
    assert "| first" in (repo / "reports/compare/comparison.md").read_text()
    assert "published" in result.stdout
    table = _client_call(env, """
result = [a.data for a in c.read_artifacts() if a.key == "deepnets-comparison"]
""")
    assert table and "simple_cnn" in json.dumps(table[-1])


def test_cancelling_a_run_ends_its_whole_process_tree(stack):
    repo, env = stack
    flow_run = _trigger(env, "deepnets-train/train-on-demand",
                        {"model": NETS[0], "params": {"train.epochs": 40}})

    def training_started() -> list[int]:
        pids = _processes_of(flow_run)
        return [p for p in pids if b"tasks.train" in Path(f"/proc/{p}/cmdline").read_bytes()]

    training = _wait(training_started, 300, "the training process")
    run(["prefect", "flow-run", "cancel", flow_run], repo, env)
    _wait(lambda: _state(env, flow_run) == "CANCELLED", 120, "the run to be cancelled", 1)
    _wait(lambda: not _processes_of(flow_run), 30, "every process of the run to end")
    assert not any(Path(f"/proc/{pid}").exists() for pid in training)
    # nothing half-written: the previous model stays, dvc.lock still describes it
    assert (repo / f"models/{NETS[0]}/model.keras").exists()


@pytest.mark.slow  # waits out a heartbeat window (90 s): about 4 minutes
def test_a_dead_worker_leaves_the_run_crashed_and_a_rerun_resumes_training(stack):
    repo, env = stack
    params = {"train.epochs": 6, "train.batch_size": 16}
    flow_run = _trigger(env, "deepnets-train/train-on-demand",
                        {"model": NETS[0], "params": params})
    state = repo / f"backups/{NETS[0]}/current/state.json"
    _wait(state.exists, 600, "the first epoch's backup")
    # the machine dies: the worker that runs the flow, the flow run and its training
    flow_pids = _processes_of(flow_run)
    parents = {int(Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[1])
               for pid in flow_pids}
    for pid in set(flow_pids) | (parents - set(flow_pids)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    completed = json.loads(state.read_text())["epoch"]
    assert completed >= 1
    _wait(lambda: _state(env, flow_run) == "CRASHED", 300, "the run to be marked crashed", 2)
    rerun = _trigger(env, "deepnets-train/train-on-demand", {"model": NETS[0], "params": params})
    _wait(lambda: _state(env, rerun) in TERMINAL, 900, "the rerun", 2)
    assert _state(env, rerun) == "COMPLETED"
    record = json.loads((repo / f"models/{NETS[0]}/params.json").read_text())
    assert record["resumed_after_epoch"] >= completed
