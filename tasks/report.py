"""Report stage: one Markdown page with the result, the published numbers, and where everything is.

`python -m tasks.report --print` also prints it, which is how the README's main job ends.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tasks.io import read_json
from tasks.references import reference_for


def render(evaluation: dict, run: dict, check: dict, paths: dict[str, str]) -> str:
    """The report as Markdown."""
    params = run["params"]
    model = params["model"]["name"]
    accuracy = 100 * evaluation["test"]["accuracy"]
    refs = reference_for(model)
    data = params["data"]
    source = data["dataset"] + (f" ({data['source']})" if data.get("source") else "")
    lines = [
        f"# {model} on {source}",
        "",
        f"Test accuracy **{accuracy:.2f}%** (loss {evaluation['test']['loss']:.4f}) on "
        f"{evaluation['test']['images']} test images, after {params['train']['epochs']} epoch(s) "
        f"on {run['train_images']} training images ({run['seconds_per_epoch']:.1f} s/epoch, "
        f"Keras {run['versions']['keras']} on {run['versions']['backend']}), "
        f"commit {run['git_commit'] or 'unknown'}.",
        "",
        "| source | CIFAR-10 test accuracy (%) | ours minus it (points) |",
        "| --- | --- | --- |",
    ]
    comparable = data["dataset"] == "cifar10"
    for label, key in (("the book (Keras, Adam)", "book"), ("the paper", "paper")):
        value = refs.get(key)
        if value is None:
            lines.append(f"| {label} | not reported | |")
        else:
            difference = f"{accuracy - value:+.2f}" if comparable else "n/a (other data)"
            lines.append(f"| {label} | {value:.2f} | {difference} |")
    if not comparable or params["train"]["epochs"] < 200:
        lines += [
            "",
            "The published numbers are for the full CIFAR-10 set (pickled, lossless) after 200 "
            "epochs; this run differs in data or length, so the comparison is indicative only.",
        ]
    lines += ["", "| per class | accuracy |", "| --- | --- |"]
    lines += [f"| {name} | {100 * acc:.1f}% |" for name, acc in
              evaluation["per_class_accuracy"].items()]
    lines += ["", "## Where things are", ""]
    lines += [f"- {what}: `{where}`" for what, where in paths.items()]
    lines += [
        "",
        f"The exports take raw uint8 images; reloaded, they matched the trained model on "
        f"{check['images']} test images (max |diff| "
        f"{max(check['keras_max_abs_diff'], check['saved_model_max_abs_diff']):.2g}).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """`python -m tasks.report --metrics metrics/evaluate.json ... --out reports/summary.md`."""
    parser = argparse.ArgumentParser(description="Write (and optionally print) the run report.")
    parser.add_argument("--metrics", type=Path, default=Path("metrics/evaluate.json"))
    parser.add_argument("--run", type=Path, default=Path("models/params.json"))
    parser.add_argument("--check", type=Path, default=Path("export/check.json"))
    parser.add_argument("--out", type=Path, default=Path("reports/summary.md"))
    parser.add_argument("--print", action="store_true", help="print the report after writing it")
    args = parser.parse_args(argv)
    paths = {
        "metrics (dvc metrics show)": f"{args.metrics}, metrics/train/metrics.json",
        "training curves (dvc plots show)": "metrics/train/plots/metrics/",
        "confusion matrix": "plots/confusion.png, plots/confusion.csv",
        "exported model": f"{args.check.parent}/model.keras, {args.check.parent}/saved_model/",
        "resolved params and versions": str(args.run),
        "this report": str(args.out),
    }
    text = render(read_json(args.metrics), read_json(args.run), read_json(args.check), paths)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f"{args.out.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, args.out)
    if args.print:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
