"""Evaluate stage: test accuracy and loss, per-class accuracy and the confusion matrix.

Outputs:
    <metrics>             JSON read by `dvc metrics show/diff`: test accuracy and loss, per-class
                          accuracy, image count
    <plots>/confusion.csv one row per test image (actual, predicted) for DVC's confusion template
    <plots>/confusion.png the confusion matrix as a picture
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

from tasks.config import load_params_or_exit
from tasks.io import read_json, write_csv, write_json


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts[i, j] = test images of class i predicted as class j."""
    counts = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(counts, (y_true, y_pred), 1)
    return counts


def summarize(probs: np.ndarray, y_true: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, mean cross-entropy and per-class accuracy from predicted probabilities."""
    y_pred = probs.argmax(axis=1)
    picked = np.clip(probs[np.arange(len(y_true)), y_true], 1e-12, 1.0)
    matrix = confusion_matrix(y_true, y_pred, len(class_names))
    per_class = matrix.diagonal() / np.maximum(matrix.sum(axis=1), 1)
    return {
        "test": {
            "accuracy": round(float((y_pred == y_true).mean()), 6),
            "loss": round(float(-np.log(picked).mean()), 6),
            "images": int(len(y_true)),
        },
        "per_class_accuracy": {
            name: round(float(acc), 6) for name, acc in zip(class_names, per_class, strict=True)
        },
    }


def plot_confusion(matrix: np.ndarray, class_names: list[str], path: Path) -> None:
    """Save the confusion matrix as a PNG with counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(5.0, 0.55 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    if len(class_names) <= 20:
        threshold = matrix.max() / 2
        for i, j in np.ndindex(matrix.shape):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if matrix[i, j] > threshold else "black")
    accuracy = matrix.trace() / max(matrix.sum(), 1)
    ax.set_title(f"confusion matrix, test accuracy {accuracy:.2%}")
    fig.tight_layout()
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".png", delete=False) as tmp:
        fig.savefig(tmp.name, dpi=110)
    plt.close(fig)
    os.replace(tmp.name, path)


def main(argv: list[str] | None = None) -> int:
    """`python -m tasks.evaluate --data data/prepared --model models/model.keras ...`."""
    parser = argparse.ArgumentParser(description="Evaluate the trained model on the test set.")
    parser.add_argument("--model-name", help="which of model.names this is (default: the first)")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    params = load_params_or_exit(args.params, args.model_name)

    from tasks.modeling import load_model
    from tasks.preprocess import load_prepared

    prepared = load_prepared(args.data)
    model = load_model(args.model)
    probs = np.asarray(
        model.predict(prepared.x_test, batch_size=params.evaluate.batch_size, verbose=0)
    )
    y_true = np.asarray(prepared.y_test)
    result = summarize(probs, y_true, prepared.class_names)
    result["model"] = params.model.name
    record = args.model.parent / "params.json"  # what produced this model, from its run record
    if record.exists():
        run = read_json(record)
        result["trained"] = {
            "epochs": run["params"]["train"]["epochs"],
            "recipe": run["params"]["train"]["recipe"],
            "dataset": run["params"]["data"]["dataset"],
            "git_commit": run.get("git_commit"),
        }

    names = np.asarray(prepared.class_names)
    pairs = zip(names[y_true], names[probs.argmax(axis=1)], strict=True)
    write_csv(args.plots / "confusion.csv",
              [{"actual": a, "predicted": p} for a, p in pairs], ["actual", "predicted"])
    matrix = confusion_matrix(y_true, probs.argmax(axis=1), len(names))
    plot_confusion(matrix, prepared.class_names, args.plots / "confusion.png")
    write_json(args.metrics, result)
    test = result["test"]
    print(f"evaluate: test accuracy {test['accuracy']:.4f}, loss {test['loss']:.4f} "
          f"on {test['images']} images")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    raise SystemExit(main())
