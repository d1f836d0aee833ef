"""A training process killed with SIGKILL in the middle of an epoch resumes from its backup.

Real processes, real signals: the train stage's command is started, killed once the backup of
epoch 1 exists (so the kill lands inside epoch 2), and started again. The resumed run must
continue at epoch 2 with the optimizer step and the learning-rate/plateau state it had, and,
on this CPU with a fixed seed, end with exactly the metrics of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run, scratch_repo, set_params, stage_environment

EPOCHS = 3
# simple_cnn: 32 steps of 32 images an epoch on the 1,000-image sample (a few seconds each).
# The schedule steps down after epoch 2 and the plateau reduction (patience 0) fires whenever
# val_loss does not improve, so both kinds of learning-rate state must survive the restart.
PARAMS = {
    "model.names": ["simple_cnn"], "train.epochs": EPOCHS, "train.batch_size": 32,
    "train.lr_milestones": [2], "train.lr_gammas": [0.5],
    "train.plateau": {"monitor": "val_loss", "factor": 0.5, "patience": 0, "min_lr": 1e-6},
    "speed.jit_compile": "auto",  # the default: XLA-compiled steps must resume exactly too
}


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    return stage_environment()


@pytest.fixture(scope="module")
def repo(tmp_path_factory, env) -> Path:
    repo = scratch_repo(tmp_path_factory.mktemp("resume") / "repo", env, PARAMS)
    run(["dvc", "repro", "preprocess"], repo, env)
    return repo


def _train_cmd(tag: str) -> list[str]:
    return [sys.executable, "-m", "tasks.train", "--model", "simple_cnn", "--data", "data/prepared",
            "--out", f"out/{tag}/model", "--live", f"out/{tag}/live", "--plots", f"out/{tag}/plots",
            "--backup", f"out/{tag}/backup"]


def _backup_epoch(backup: Path) -> int:
    try:
        return json.loads((backup / "current/state.json").read_text())["epoch"]
    except (OSError, ValueError):
        return 0


def test_sigkill_mid_epoch_then_restart_continues_exactly(repo, env):
    # the uninterrupted run starts beside a backup of other params: it must not resume from it
    stale = repo / "out/whole/backup/current"
    stale.mkdir(parents=True)
    (stale / "state.json").write_text(json.dumps({"epoch": 2, "fingerprint": "other params"}))
    (stale / "state.weights.h5").write_bytes(b"not weights")
    assert "resuming" not in run(_train_cmd("whole"), repo, env).stdout
    assert [p.name for p in (repo / "out/whole/backup").iterdir()] == ["complete.json"]

    backup = repo / "out/killed/backup"
    process = subprocess.Popen(_train_cmd("killed"), cwd=repo, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while _backup_epoch(backup) < 1:
        assert process.poll() is None, "training ended before its first backup"
        assert time.monotonic() < deadline, "no backup after 300 s"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)  # now inside epoch 2: its backup is not written yet
    assert process.wait() == -signal.SIGKILL
    assert _backup_epoch(backup) == 1
    assert not (repo / "out/killed/model").exists()  # nothing half-written is left as output
    state = json.loads((backup / "current/state.json").read_text())
    assert state["callbacks"]["checkpoint"]["best_epoch"] == 0

    resumed = run(_train_cmd("killed"), repo, env)
    assert "resuming from out/killed/backup after epoch 1 of 3 (optimizer step 32)" in resumed.stdout

    whole = repo / "out/whole"
    killed = repo / "out/killed"
    # the same learning rate at every epoch (steps and plateau reductions as they were)
    schedule = (whole / "plots/schedule.csv").read_text()
    assert (killed / "plots/schedule.csv").read_text() == schedule
    rates = [float(line.split(",")[1]) for line in schedule.splitlines()[1:]]
    assert len(rates) == EPOCHS and rates[0] == pytest.approx(1e-3)
    # every epoch's metrics, the replayed ones included, and the final summary are identical
    for name in ("loss", "val_loss", "val_accuracy", "learning_rate"):
        file = f"live/plots/metrics/{name}.tsv"
        assert (killed / file).read_text() == (whole / file).read_text(), name
    summary = {k: v for k, v in json.loads((whole / "live/metrics.json").read_text()).items()
               if k != "seconds"}
    assert {k: v for k, v in json.loads((killed / "live/metrics.json").read_text()).items()
            if k != "seconds"} == summary
    record = json.loads((killed / "model/params.json").read_text())
    assert record["resumed_after_epoch"] == 1
    # a finished run leaves only the completion marker in its backup directory
    assert [p.name for p in backup.iterdir()] == ["complete.json"]


def test_a_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_backup(repo, env):
    # epochs 1 and 2 train normally; after the milestone (2 epochs) the rate is 1e30 and the
    # loss blows up in epoch 3
    lock = (repo / "dvc.lock").read_text()
    original = (repo / "params.yaml").read_text()
    set_params(repo, {"train.lr_gammas": [1e33]})
    try:
        result = run(["dvc", "repro", "--single-item", "train@simple_cnn"], repo, env, check=False)
    finally:
        (repo / "params.yaml").write_text(original)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "the training loss became nan" in output.lower()
    assert "lower train.learning_rate" in output
    assert "backup of the last good epoch is kept in backups/simple_cnn" in output
    assert _backup_epoch(repo / "backups/simple_cnn") == 2  # the last good epoch
    assert not (repo / "models/simple_cnn").exists()  # no model that evaluate could take
    assert (repo / "dvc.lock").read_text() == lock  # DVC recorded nothing
