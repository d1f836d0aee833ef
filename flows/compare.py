"""Compare results across git commits, tags, branches and DVC experiments.

    deepnets compare [REV ...] [--experiments] [--out reports/compare] [--artifact]

DVC is the source: ``dvc exp show --json`` reads each revision's params and metrics straight
from git (and lists the experiments derived from it), so no checkout is needed. pandas shapes
them into one row per (revision, architecture), with the book's and the paper's numbers and the
differences, printed and written as Markdown and CSV; ``--artifact`` also publishes the table
to the Prefect server (PREFECT_API_URL) as a table artifact.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tasks.io import write_text
from tasks.references import compared

COLUMNS = ["revision", "model", "dataset", "recipe", "epochs", "test_accuracy", "book",
           "vs_book", "paper", "vs_paper", "vs_first"]


class CompareError(RuntimeError):
    """DVC could not read a revision, or there is nothing to compare."""


def exp_show(revisions: list[str], root: Path, experiments: bool) -> list[dict[str, Any]]:
    """``dvc exp show --json`` for the revisions (default: HEAD), as parsed JSON."""
    args = ["dvc", "exp", "show", "--json"]
    if revisions:
        args.append("--hide-workspace")  # only what was named
    for revision in revisions:
        args += ["--rev", revision]
    if not experiments:
        args.append("--hide-queued")
    result = subprocess.run(args, cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        raise CompareError(f"`{' '.join(args)}` failed: {result.stderr.strip() or result.stdout}")
    return json.loads(result.stdout or "[]")


def _entries(shown: list[dict[str, Any]], experiments: bool):
    """(label, data) for each revision and, if asked, each experiment derived from it."""
    for entry in shown:
        if entry.get("error"):
            continue
        label = entry["rev"] if entry["rev"] == "workspace" else (
            entry.get("name") or entry["rev"][:7])
        yield label, entry.get("data") or {}
        for group in (entry.get("experiments") or []) if experiments else []:
            for exp in group.get("revs") or []:
                yield exp.get("name") or exp["rev"][:7], exp.get("data") or {}


def rows_from(shown: list[dict[str, Any]], experiments: bool = False) -> list[dict[str, Any]]:
    """One row per (revision, architecture) with an evaluation in that revision."""
    rows = []
    for label, data in _entries(shown, experiments):
        params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
        metrics = data.get("metrics") or {}
        for path, found in metrics.items():
            if not path.startswith("metrics/evaluate/") or "data" not in found:
                continue
            model = Path(path).stem
            accuracy = round(100 * found["data"]["test"]["accuracy"], 2)
            # what trained this model (the evaluate stage copies it from the model's run record);
            # the revision's params.yaml may have moved on without the stage being rerun
            trained = found["data"].get("trained") or {}
            dataset = trained.get("dataset", (params.get("data") or {}).get("dataset"))
            train = {**(params.get("train") or {}), **trained}
            rows.append({"revision": label, "model": model, "dataset": dataset,
                         "recipe": train.get("recipe"), "epochs": train.get("epochs"),
                         "test_accuracy": accuracy, **compared(model, accuracy, dataset)})
    return rows


def table(rows: list[dict[str, Any]]):
    """The rows as a pandas DataFrame, with each model's change against its first revision."""
    import pandas as pd

    frame = pd.DataFrame(rows, columns=COLUMNS[:-1])
    for column in ("book", "vs_book", "paper", "vs_paper"):
        frame[column] = pd.to_numeric(frame[column])  # None -> NaN, shown as a dash
    first = frame.groupby("model")["test_accuracy"].transform("first")
    frame["vs_first"] = (frame["test_accuracy"] - first).round(2)
    return frame


def write(frame, out: Path) -> tuple[Path, Path]:
    """comparison.md and comparison.csv under ``out`` (each written to a temp file, renamed)."""
    markdown, csv = out / "comparison.md", out / "comparison.csv"
    write_text(markdown, frame.to_markdown(index=False, missingval="–") + "\n")
    write_text(csv, frame.to_csv(index=False))
    return markdown, csv


def publish(frame) -> None:
    """The table as a Prefect artifact, from a small flow run on the configured server."""
    from prefect import flow
    from prefect.artifacts import create_table_artifact

    records = json.loads(frame.to_json(orient="records"))

    @flow(name="deepnets-compare")
    def compare_flow() -> None:
        create_table_artifact(key="deepnets-comparison", table=records,
                              description="Test accuracy (%) across revisions, against the "
                                          "book and the paper (differences in points).")

    compare_flow()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deepnets compare", description=__doc__.splitlines()[0])
    parser.add_argument("revisions", nargs="*",
                        help="commits, tags or branches (default: HEAD and the workspace)")
    parser.add_argument("--experiments", action="store_true",
                        help="also the DVC experiments derived from each revision")
    parser.add_argument("--out", type=Path, default=Path("reports/compare"))
    parser.add_argument("--artifact", action="store_true",
                        help="publish the table to the Prefect server as an artifact")
    parser.add_argument("--root", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    try:
        rows = rows_from(exp_show(args.revisions, args.root, args.experiments), args.experiments)
        if not rows:
            raise CompareError(
                "no evaluation metrics in " + (", ".join(args.revisions) or "HEAD or the workspace")
                + ": commit dvc.lock and metrics/ after a run (or name other revisions)")
    except CompareError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    frame = table(rows)
    print(frame.to_string(index=False, na_rep="–"))
    for path in write(frame, args.root / args.out):
        print(f"wrote {path}")
    if args.artifact:
        publish(frame)
        print("published the table as Prefect artifact 'deepnets-comparison'")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
