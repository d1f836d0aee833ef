"""The pipeline as Prefect flows over the DVC stages of dvc.yaml.

``pipeline``: check params → download → preprocess → train each selected architecture →
evaluate → export → report, then a results table and a links page as Prefect artifacts.
``train_model``: the on-demand deployment's flow; one architecture, params given at run time.

DVC decides what is up to date. A stage DVC calls unchanged is skipped, so a second run with
nothing changed trains nothing. Trainings run side by side in processes of their own (a GPU's
memory is freed when each ends); DVC stays a single writer: each finished training is recorded
with ``dvc commit`` under the workspace lock (see flows/workspace.py and docs/orchestration.md).
A training that fails is not retried blindly: the next run resumes it from its backup.
"""

from __future__ import annotations

import os
import queue
import shlex
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from flows import workspace


def default_root() -> Path:
    """The workspace the flows run in: $DEEPNETS_ROOT, else the current directory."""
    return Path(os.environ.get("DEEPNETS_ROOT") or ".").resolve()


@task(name="check-params", cache_policy=NO_CACHE)
def check_params(root: Path) -> None:
    workspace.dvc(["repro", "--single-item", "check-params"], root)


@task(name="download", cache_policy=NO_CACHE, retries=3,
      retry_delay_seconds=exponential_backoff(backoff_factor=10), retry_jitter_factor=0.5)
def download(root: Path) -> None:
    # the download itself retries each source (data.retries); this retries the whole stage
    workspace.dvc(["repro", "--single-item", "download"], root, log=get_run_logger().info)


@task(name="dvc-stage", cache_policy=NO_CACHE)
def run_stage(root: Path, stage: str) -> bool:
    """``dvc repro --single-item STAGE``; returns whether the stage ran (False: up to date)."""
    output = workspace.dvc(["repro", "--single-item", stage], root, log=get_run_logger().info)
    return f"Running stage '{stage}'" in output


@task(name="train", cache_policy=NO_CACHE, retries=0, tags=["training"])
def train(root: Path, model: str, devices: queue.Queue | None = None) -> str:
    """Train one architecture in its own process unless DVC says it is up to date.

    Returns "skipped" or "trained". A failure (a NaN loss, a kill) leaves dvc.lock and the
    previous outputs untouched and the backup in place; the next run resumes from it.
    """
    logger = get_run_logger()
    stage = f"train@{model}"
    if not workspace.stage_changed(stage, root):
        logger.info("%s is up to date: not training", stage)
        return "skipped"
    command = workspace.stage_command(stage, root)
    env = workspace.child_environment()
    device = devices.get() if devices is not None else None
    try:
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(device)
        logger.info("training %s%s: %s", model, f" on device {device}" if device else "", command)
        workspace.run_command(shlex.split(command), root, env=env, log=logger.info)
    finally:
        if device is not None:
            devices.put(device)
    workspace.dvc(["commit", "--force", stage], root)  # the single writer records the result
    return "trained"


@task(name="publish", cache_policy=NO_CACHE)
def publish(root: Path, models: list[str], trained: dict[str, str]) -> list[dict[str, Any]]:
    """The results table and a links page, as Prefect artifacts."""
    from tasks.report import load_result, outputs, result_rows

    results = [r for r in (load_result(m, root) for m in models) if r is not None]
    rows = result_rows(results)
    for row in rows:
        row["this_run"] = trained.get(row["model"], "not selected")
    create_table_artifact(
        key="deepnets-results", table=rows,
        description="Test accuracy (%) per architecture, against the book and the paper "
                    "(differences in points, CIFAR-10 runs only).",
    )
    lines = ["# deepnets run", "", f"Workspace: `{root}`", ""]
    for name in models:
        lines.append(f"## {name}")
        lines += [f"- {what}: [{where}]({(root / where).as_uri()})"
                  for what, where in outputs(name).items()]
        lines.append("")
    lines.append(f"Report: [{root / 'reports/summary.md'}]({(root / 'reports/summary.md').as_uri()})")
    create_markdown_artifact(key="deepnets-links", markdown="\n".join(lines),
                             description="Where this run's plots, models and exports are.")
    return rows


@flow(name="deepnets-pipeline", log_prints=True)
def pipeline(models: list[str] | None = None, params: dict[str, Any] | None = None,
             root: str | None = None, devices: list[str] | None = None,
             parallel: int = 1) -> dict[str, str]:
    """The whole pipeline over the DVC stages; the arguments are run_pipeline's."""
    return run_pipeline(models, params, root, devices, parallel)


def run_pipeline(models: list[str] | None = None, params: dict[str, Any] | None = None,
                 root: str | None = None, devices: list[str] | None = None,
                 parallel: int = 1) -> dict[str, str]:
    """Run the pipeline; DVC skips every stage whose inputs did not change.

    Args:
        models: architectures to run (default: model.names); any not listed is added to it.
        params: dotted params.yaml overrides applied first, like ``dvc exp run -S``
            (e.g. ``{"train.epochs": 1}``).
        root: the DVC workspace (default: $DEEPNETS_ROOT or the current directory).
        devices: GPU ids; one training runs on each at a time (``CUDA_VISIBLE_DEVICES``).
        parallel: trainings at once when no devices are given.

    Returns:
        For each selected architecture, "trained" or "skipped".
    """
    where = Path(root).resolve() if root else default_root()
    if params or models:
        workspace.set_params(where, dict(params or {}), add_models=list(models or []))
    selected = list(models or workspace.listed_models(where))
    if not workspace.pipeline_changed(where):
        # one status call instead of one per stage: a scheduled run with nothing new costs a
        # second of DVC, not ten
        get_run_logger().info("every stage is up to date: nothing to run")
        trained = dict.fromkeys(selected, "skipped")
        publish(where, selected, trained)
        return trained
    check_params(where)
    download(where)
    run_stage(where, "preprocess")

    pool = None
    if devices:
        pool = queue.Queue()
        for device in devices:
            pool.put(device)
    width = len(devices) if devices else max(1, parallel)
    trained: dict[str, str] = {}
    # at most `width` trainings at once: submit in waves of that size
    for start in range(0, len(selected), width):
        wave = {m: train.submit(where, m, pool) for m in selected[start:start + width]}
        trained.update({m: future.result() for m, future in wave.items()})
    for model in selected:
        run_stage(where, f"evaluate@{model}")
        run_stage(where, f"export@{model}")
    run_stage(where, "report")
    publish(where, selected, trained)
    return trained


@flow(name="deepnets-train", log_prints=True)
def train_model(model: str = "resnet20_v1", params: dict[str, Any] | None = None,
                root: str | None = None) -> dict[str, str]:
    """Train, evaluate and export one architecture with params given at run time."""
    return run_pipeline(models=[model], params=params, root=root)


if __name__ == "__main__":
    pipeline()
