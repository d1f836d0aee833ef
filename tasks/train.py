"""Train stage: fit one registry net on the prepared arrays with the recipe in params.yaml.

Outputs:
    <out>/model.keras     the best model by ``train.checkpoint_monitor`` (takes raw uint8 images,
                          includes the input transform and the augmentation layers)
    <out>/params.json     the resolved params, library versions, backend and git commit
    <out>/summary.txt     the model summary
    <live>/metrics.json   DVCLive summary of the last epoch, plus the best epoch
    <live>/plots/metrics/*.tsv   per-epoch loss, accuracy, validation metrics and learning rate

Both directories are written to temporary siblings and renamed at the end, so a failed or
interrupted run leaves no model that evaluate or export could take for a finished one.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tasks.config import Params, load_params_or_exit
from tasks.io import atomic_dir, write_json


def make_optimizer(train) -> Any:
    """The optimizer named by ``train.optimizer`` at the schedule's starting rate."""
    import keras

    table = {
        "adam": lambda: keras.optimizers.Adam(learning_rate=train.learning_rate),
        "sgd": lambda: keras.optimizers.SGD(
            learning_rate=train.learning_rate, momentum=train.momentum, nesterov=train.nesterov
        ),
        "rmsprop": lambda: keras.optimizers.RMSprop(learning_rate=train.learning_rate),
    }
    return table[train.optimizer]()


def git_commit() -> str | None:
    """The current commit (with a -dirty suffix for uncommitted changes), or None outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if dirty else "")


def run_metadata(params: Params) -> dict[str, Any]:
    """The resolved params plus what is needed to trace a number back to its code."""
    import keras
    import numpy

    return {
        "params": params.model_dump(mode="json"),
        "git_commit": git_commit(),
        "versions": {
            "python": platform.python_version(),
            "keras": keras.__version__,
            "numpy": numpy.__version__,
            "backend": keras.backend.backend(),
        },
        "machine": platform.machine(),
    }


def train(params: Params, prepared, model_path: Path, live=None, verbose: int | str = 2):
    """Build the net named in params, wrap it for uint8 input, and fit it.

    Args:
        params: validated params (uses ``model`` and ``train``).
        prepared: a :class:`tasks.preprocess.Prepared`.
        model_path: where the best model (by ``train.checkpoint_monitor``) is saved.
        live: an optional ``dvclive.Live`` receiving per-epoch metrics.
        verbose: Keras fit verbosity.

    Returns:
        (history dict, best-checkpoint callback).

    Raises:
        ValueError: a builder option or a monitor key that does not exist.
        NonFiniteLossError: the loss became NaN or infinite.
    """
    import keras

    from nets import create_model
    from tasks.modeling import (
        BestCheckpoint,
        LearningRateController,
        LiveLogger,
        StopOnNonFinite,
        build_training_model,
    )
    from tasks.preprocess import input_statistics

    cfg = params.train
    keras.utils.set_random_seed(cfg.seed)
    net = create_model(
        params.model.name,
        input_shape=tuple(prepared.x_train.shape[1:]),
        num_classes=len(prepared.class_names),
        **{**cfg.model_options, **params.model.options},
    )
    mean, std = prepared.mean, prepared.std
    if cfg.normalization and cfg.normalization != prepared.normalization:
        mean, std = input_statistics(prepared.x_train, cfg.normalization)
    model = build_training_model(
        net, mean, std, shift=cfg.augment.shift, flip=cfg.augment.flip,
        crop_pad=cfg.augment.crop_pad, seed=cfg.seed,
    )
    model.compile(
        optimizer=make_optimizer(cfg),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    plateau = cfg.plateau
    controller = LearningRateController(
        cfg.learning_rate, cfg.milestones(), cfg.lr_gammas,
        monitor=plateau.monitor if plateau else None,
        factor=plateau.factor if plateau else 1.0,
        patience=plateau.patience if plateau else 0,
        min_lr=plateau.min_lr if plateau else 0.0,
        warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
    )
    checkpoint = BestCheckpoint(model_path, cfg.checkpoint_monitor, "train.checkpoint_monitor")
    callbacks = [controller, checkpoint, StopOnNonFinite()]
    if live is not None:
        callbacks.append(LiveLogger(live))
    history = model.fit(
        prepared.x_train, prepared.y_train,
        batch_size=cfg.batch_size,
        epochs=cfg.epochs,
        validation_data=(prepared.x_val, prepared.y_val),
        shuffle=True,
        callbacks=callbacks,
        verbose=verbose,
    )
    return model, history.history, checkpoint


def main(argv: list[str] | None = None) -> int:
    """`python -m tasks.train --data data/prepared --out models --live metrics/train`."""
    parser = argparse.ArgumentParser(description="Train the net named in params.yaml.")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--live", type=Path, required=True)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    params = load_params_or_exit(args.params)

    from dvclive import Live

    from tasks.modeling import NonFiniteLossError
    from tasks.preprocess import load_prepared

    prepared = load_prepared(args.data)
    verbose = 1 if sys.stdout.isatty() else 2
    started = time.perf_counter()
    with atomic_dir(args.out) as out, atomic_dir(args.live) as live_dir:
        live = Live(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None)
        try:
            model, history, checkpoint = train(
                params, prepared, out / "model.keras", live=live, verbose=verbose
            )
        except ValueError as error:
            # bad model options or monitor keys are configuration errors
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        except NonFiniteLossError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(1) from None
        elapsed = time.perf_counter() - started
        live.summary["best_epoch"] = checkpoint.best_epoch + 1  # 1-based, as Keras prints
        live.summary[f"best_{checkpoint.monitor}"] = checkpoint.best
        live.summary["seconds"] = round(elapsed, 2)
        live.end()
        meta = run_metadata(params)
        meta["train_images"] = int(len(prepared.x_train))
        meta["seconds_per_epoch"] = round(elapsed / params.train.epochs, 3)
        write_json(out / "params.json", meta)
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            model.summary(expand_nested=True, line_length=110)
        (out / "summary.txt").write_text(buffer.getvalue())
    print(
        f"train: {params.model.name}, {params.train.epochs} epoch(s) in {elapsed:.1f} s; best "
        f"{checkpoint.monitor} {checkpoint.best:.4f} at epoch {checkpoint.best_epoch + 1}"
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    raise SystemExit(main())
