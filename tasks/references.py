"""Published CIFAR-10 test accuracies (%) that our results are compared against.

book: the Keras book's tables 2.2 and 2.3 and its DenseNet section (tf.keras, Adam recipe);
paper: He et al. 2015 / 2016 and Huang et al. 2017 as quoted by the book. None: not reported.
"""

from __future__ import annotations

REFERENCES: dict[str, dict[str, float | None]] = {
    "resnet20_v1": {"book": 92.16, "paper": 91.25},
    "resnet32_v1": {"book": 92.46, "paper": 92.49},
    "resnet44_v1": {"book": 92.50, "paper": 92.83},
    "resnet56_v1": {"book": 92.71, "paper": 93.03},
    "resnet110_v1": {"book": 92.65, "paper": 93.57},
    "resnet56_v2": {"book": 93.01, "paper": None},
    "resnet110_v2": {"book": 93.15, "paper": 93.63},
    "densenet_bc_100_k12": {"book": 93.74, "paper": 95.49},
}


def reference_for(model: str) -> dict[str, float | None]:
    """The book's and the paper's CIFAR-10 accuracy for ``model`` (None where not published)."""
    return REFERENCES.get(model, {"book": None, "paper": None})


def compared(model: str, accuracy: float, dataset: str | None) -> dict[str, float | None]:
    """The book's and the paper's numbers for ``model`` and ``accuracy`` minus each (points).

    Differences are given for CIFAR-10 runs only; other data compares with nothing published.
    """
    refs = reference_for(model)
    columns: dict[str, float | None] = {}
    for key in ("book", "paper"):
        value = refs.get(key)
        columns[key] = value
        columns[f"vs_{key}"] = (
            round(accuracy - value, 2) if value is not None and dataset == "cifar10" else None
        )
    return columns
