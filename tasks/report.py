"""Report stage: one Markdown page with every listed net's result, the published numbers, and
where everything is.

`python -m tasks.report --print` also prints it, which is how the README's main job ends.
:func:`result_rows` is the table the Prefect flow publishes as an artifact.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tasks.config import load_params_or_exit
from tasks.io import read_json, write_text
from tasks.references import compared


def outputs(name: str) -> dict[str, str]:
    """Where the pipeline writes one net's results (the paths of dvc.yaml)."""
    return {
        "metrics": f"metrics/evaluate/{name}.json",
        "training metrics": f"metrics/train/{name}/metrics.json",
        "training curves": f"metrics/train/{name}/plots/metrics/",
        "schedule": f"plots/train/{name}/schedule.png",
        "confusion matrix": f"plots/evaluate/{name}/confusion.png",
        "model": f"models/{name}/model.keras",
        "run record": f"models/{name}/params.json",
        "export": f"export/{name}/",
        "export check": f"export/{name}/check.json",
    }


def load_result(name: str, root: Path = Path(".")) -> dict[str, Any] | None:
    """One net's evaluation, run record and export check, or None if it has not run yet."""
    paths = outputs(name)
    try:
        return {
            "name": name,
            "evaluation": read_json(root / paths["metrics"]),
            "run": read_json(root / paths["run record"]),
            "check": read_json(root / paths["export check"]),
        }
    except FileNotFoundError:
        return None


def comparable(run: dict[str, Any]) -> bool:
    """Whether the published CIFAR-10 numbers apply to this run's data."""
    return run["params"]["data"]["dataset"] == "cifar10"


def result_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per net: our test accuracy, the book's and the paper's, and the differences."""
    rows = []
    for result in results:
        run, params = result["run"], result["run"]["params"]
        ours = round(100 * result["evaluation"]["test"]["accuracy"], 2)
        row: dict[str, Any] = {
            "model": result["name"],
            "dataset": params["data"]["dataset"],
            "epochs": params["train"]["epochs"],
            "test_accuracy": ours,
            **compared(result["name"], ours, params["data"]["dataset"]),
        }
        row["seconds_per_epoch"] = run.get("seconds_per_epoch")
        row["commit"] = run.get("git_commit")
        rows.append(row)
    return rows


def _cell(value: Any, signed: bool = False) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:+.2f}" if signed else f"{value:.2f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The result rows as a Markdown table (differences in points, signed)."""
    header = ["model", "data", "epochs", "ours (%)", "book (%)", "ours − book", "paper (%)",
              "ours − paper", "s/epoch"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        cells = [row["model"], row["dataset"], row["epochs"], _cell(row["test_accuracy"]),
                 _cell(row["book"]), _cell(row["vs_book"], True), _cell(row["paper"]),
                 _cell(row["vs_paper"], True), _cell(row["seconds_per_epoch"])]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def render(results: list[dict[str, Any]], missing: list[str]) -> str:
    """The report as Markdown."""
    lines = ["# Results", ""]
    if results:
        lines += [markdown_table(result_rows(results)), ""]
    if missing:
        lines += [f"Not run yet: {', '.join(missing)} (`dvc repro` trains them).", ""]
    if any(not comparable(r["run"]) or r["run"]["params"]["train"]["epochs"] < 200
           for r in results):
        lines += [
            "The published numbers are for the full CIFAR-10 set (pickled, lossless) after 200 "
            "epochs; a run that differs in data or length compares indicatively only; "
            "differences are given for CIFAR-10 runs only.",
            "",
        ]
    for result in results:
        name, run, evaluation = result["name"], result["run"], result["evaluation"]
        params, test = run["params"], evaluation["test"]
        data = params["data"]
        source = data["dataset"] + (f" ({data['source']})" if data.get("source") else "")
        check = result["check"]
        resumed = run.get("resumed_after_epoch") or 0
        lines += [
            f"## {name} on {source}",
            "",
            f"Test accuracy **{100 * test['accuracy']:.2f}%** (loss {test['loss']:.4f}) on "
            f"{test['images']} test images, after {params['train']['epochs']} epoch(s) of the "
            f"{params['train']['recipe']} recipe on {run['train_images']} training images "
            f"(Keras {run['versions']['keras']} on {run['versions']['backend']}), commit "
            f"{run['git_commit'] or 'unknown'}"
            + (f"; resumed from its backup after epoch {resumed}" if resumed else "") + ".",
            "",
            "| per class | accuracy |",
            "| --- | --- |",
        ]
        lines += [f"| {cls} | {100 * acc:.1f}% |" for cls, acc in
                  evaluation["per_class_accuracy"].items()]
        lines += ["", "Where things are:", ""]
        lines += [f"- {what}: `{where}`" for what, where in outputs(name).items()]
        lines += [
            "",
            f"The exports take raw uint8 images; reloaded, they matched the trained model on "
            f"{check['images']} test images (max |diff| "
            f"{max(check['keras_max_abs_diff'], check['saved_model_max_abs_diff']):.2g}).",
            "",
        ]
    lines += ["`dvc metrics show` and `dvc plots show` read the same files; "
              "`deepnets compare` tabulates them across commits."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """`python -m tasks.report --out reports/summary.md [--print]`."""
    parser = argparse.ArgumentParser(description="Write (and optionally print) the run report.")
    parser.add_argument("--out", type=Path, default=Path("reports/summary.md"))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--print", action="store_true", help="print the report after writing it")
    args = parser.parse_args(argv)
    names = load_params_or_exit(args.params).model.names
    loaded = {name: load_result(name) for name in names}
    results = [result for result in loaded.values() if result is not None]
    text = render(results, [name for name, result in loaded.items() if result is None])
    write_text(args.out, text)
    if args.print:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
