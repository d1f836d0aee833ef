"""Train stage: fit one registry net on the prepared arrays with the recipe in params.yaml.

Outputs (one set per architecture listed in model.names):
    <out>/model.keras     the best model by ``train.checkpoint_monitor`` (takes raw uint8 images,
                          includes the input transform and the augmentation layers)
    <out>/params.json     the resolved params, library versions, backend and git commit
    <out>/summary.txt     the model summary
    <live>/metrics.json   DVCLive summary of the last epoch, plus the best epoch
    <live>/plots/metrics/*.tsv   per-epoch loss, accuracy, validation metrics and learning rate

    <backup>/             the training state after the last completed epoch (tasks.resume)

The output directories are written to temporary siblings and renamed at the end, so a failed or
interrupted run leaves no model that evaluate or export could take for a finished one. With
``--backup``, a run killed part-way continues from its last completed epoch when started again
with the same params and data.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.config import Params, load_params_or_exit
from tasks.io import atomic_dir, write_csv, write_json


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
            # dvc.lock, metrics and plots are rewritten by runs; they do not make the code dirty
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!dvc.lock",
             ":!metrics", ":!plots"],
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


@dataclass
class TrainResult:
    """What a training run produced, beyond the saved model."""

    model: Any
    history: dict[str, list[float]]
    checkpoint: Any  # BestCheckpoint: best value and epoch
    rates: list[tuple[int, float, float | None]]  # (step, learning rate, momentum) as applied
    activations: Any = None  # ActivationStats, when train.activation_stats
    backup: Any = None  # TrainingBackup, when backing up
    initial_epoch: int = 0  # epochs restored from a backup rather than run here
    speed: dict[str, Any] | None = None  # the resolved speed settings (tasks.speed)


def rate_callback(cfg, steps_per_epoch: int):
    """The callback that sets the learning rate: the step/plateau controller or one-cycle."""
    from tasks.modeling import LearningRateController
    from tasks.schedules import OneCycle

    if cfg.schedule == "one_cycle":
        oc = cfg.one_cycle
        return OneCycle(oc.lr_max, total_steps=cfg.epochs * steps_per_epoch, div=oc.div,
                        div_final=oc.div_final, pct_start=oc.pct_start, moms=oc.moms)
    plateau = cfg.plateau
    return LearningRateController(
        cfg.learning_rate, cfg.milestones(), cfg.lr_gammas,
        monitor=plateau.monitor if plateau else None,
        factor=plateau.factor if plateau else 1.0,
        patience=plateau.patience if plateau else 0,
        min_lr=plateau.min_lr if plateau else 0.0,
        warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
    )


def train(params: Params, prepared, model_path: Path, live=None,
          verbose: int | str = 2, backup: Path | None = None,
          fingerprint: str | None = None) -> TrainResult:
    """Build the net named in params, wrap it for uint8 input, and fit it with the recipe.

    Args:
        params: validated params (uses ``model`` and the resolved ``train`` recipe).
        prepared: a :class:`tasks.preprocess.Prepared`.
        model_path: where the best model (by ``train.checkpoint_monitor``) is saved.
        live: an optional ``dvclive.Live`` receiving per-epoch metrics.
        verbose: Keras fit verbosity.
        backup: a directory for per-epoch backups; a matching backup there is resumed.
        fingerprint: what a backup must match (:func:`tasks.resume.fingerprint`).

    Returns:
        The trained model, its history, the best-checkpoint record, the applied rates and,
        when asked for, the activation statistics.

    Raises:
        ValueError: a builder option or a monitor key that does not exist.
        NonFiniteLossError: the loss became NaN or infinite.
    """
    import keras

    from nets import builder_options, create_model
    from tasks.activations import ActivationStats
    from tasks.modeling import (
        BestCheckpoint,
        EpochRates,
        EpochShuffledArrays,
        LiveLogger,
        StopOnNonFinite,
        build_training_model,
    )
    from tasks.preprocess import input_statistics
    from tasks.resume import EpochSeed, TrainingBackup
    from tasks.schedules import with_cyclic_momentum
    from tasks.speed import apply as apply_speed
    from tasks.speed import compile_options

    cfg = params.train
    speed = apply_speed(params.speed)  # before the model is built: it sets the dtype policy
    keras.utils.set_random_seed(cfg.seed)
    # a recipe's builder options apply where the builder takes them (the paper's l2 means
    # nothing to a net without it); options set in model.options must all be taken
    accepted = builder_options(params.model.name)
    recipe_options = {k: v for k, v in cfg.model_options.items() if k in accepted}
    net = create_model(
        params.model.name,
        input_shape=tuple(prepared.x_train.shape[1:]),
        num_classes=len(prepared.class_names),
        **{**recipe_options, **params.model.options},
    )
    mean, std = prepared.mean, prepared.std
    if cfg.normalization and cfg.normalization != prepared.normalization:
        mean, std = input_statistics(prepared.x_train, cfg.normalization)
    model = build_training_model(
        net, mean, std, shift=cfg.augment.shift, flip=cfg.augment.flip,
        crop_pad=cfg.augment.crop_pad, seed=cfg.seed,
    )
    optimizer = make_optimizer(cfg)
    if cfg.schedule == "one_cycle":
        optimizer = with_cyclic_momentum(optimizer)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"], **compile_options(speed))
    steps_per_epoch = -(-len(prepared.x_train) // cfg.batch_size)
    rates = rate_callback(cfg, steps_per_epoch)
    checkpoint = BestCheckpoint(model_path, cfg.checkpoint_monitor, "train.checkpoint_monitor")
    # epoch e's random draws depend on (seed, e) only, so a resumed run repeats the original
    callbacks = [EpochSeed(cfg.seed), rates, checkpoint, StopOnNonFinite()]
    stateful = {"rates": rates, "checkpoint": checkpoint}
    epoch_rates = None
    if cfg.schedule != "one_cycle":
        epoch_rates = EpochRates()
        callbacks.insert(2, epoch_rates)
        stateful["epoch_rates"] = epoch_rates
    initial_epoch, saver = 0, None
    if backup is not None:
        saver = TrainingBackup(backup, fingerprint or "", stateful, model_path, live)
        initial_epoch = saver.restore(model)
        if initial_epoch:
            step = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
            print(f"train: resuming from {backup} after epoch {initial_epoch} of {cfg.epochs} "
                  f"(optimizer step {step})", flush=True)
        callbacks.append(saver)
    activations = None
    if cfg.activation_stats:
        # a fixed probe batch, measured ~20 times an epoch (see tasks.activations)
        activations = ActivationStats(prepared.x_train[:32], every=max(1, steps_per_epoch // 20))
        callbacks.append(activations)
    if live is not None:
        callbacks.append(LiveLogger(live))
    # epoch e's batch order depends on (seed, e) only, so a resumed run sees the same batches
    batches = EpochShuffledArrays(prepared.x_train, prepared.y_train, cfg.batch_size, cfg.seed,
                                  initial_epoch)
    history = model.fit(
        batches,
        epochs=cfg.epochs,
        initial_epoch=initial_epoch,
        validation_data=(prepared.x_val, prepared.y_val),
        validation_batch_size=cfg.batch_size,
        callbacks=callbacks,
        verbose=verbose,
    )
    applied = epoch_rates.rows if epoch_rates is not None else list(rates.history)
    logs = history.history
    if saver is not None:  # the whole run's history, resumed epochs included
        logs = {key: [epoch.get(key) for epoch in saver.history] for key in saver.history[0]}
    return TrainResult(model, logs, checkpoint, applied, activations, saver, initial_epoch, speed)


def write_plots(result: TrainResult, out: Path) -> None:
    """The applied schedule and, if recorded, the activation statistics, as PNG and CSV."""
    from tasks.activations import plot_stats, stats_rows
    from tasks.schedules import plot_schedule, schedule_rows

    out.mkdir(parents=True, exist_ok=True)
    plot_schedule(result.rates, out / "schedule.png")
    write_csv(out / "schedule.csv", schedule_rows(result.rates))
    if result.activations is not None:
        plot_stats(result.activations.stats, out)
        write_csv(out / "activations.csv", stats_rows(result.activations.stats))


def write_diagram(model: Any, path: Path) -> str | None:
    """Draw the architecture with keras.utils.plot_model; returns why not, if it cannot.

    Edges take Graphviz's default spline routing. Keras' default, ``splines="ortho"``, makes
    Debian 12's Graphviz (2.42.2, ``dot -V`` says 2.43.0) abort on ResNet32, 44, 56 and 110 v1,
    and the diagram is drawn after training: a Graphviz failure must not cost the trained
    model, so any that is left skips the diagram and says why.
    """
    import shutil

    import keras

    if shutil.which("dot") is None:
        return "Graphviz's dot is not installed (apt-get install graphviz) so no diagram was drawn"
    try:
        keras.utils.plot_model(model, to_file=str(path), show_shapes=True, expand_nested=True,
                               show_layer_names=True, dpi=72, splines="spline")
    except Exception as error:  # noqa: BLE001 - any drawing failure only skips the picture
        path.unlink(missing_ok=True)
        reason = " ".join(str(error).split()) or type(error).__name__
        return f"Graphviz could not draw {path}, so it was skipped ({reason[:400]})"
    return None


def main(argv: list[str] | None = None) -> int:
    """`python -m tasks.train --model NAME --data data/prepared --out models/NAME --live ...`."""
    parser = argparse.ArgumentParser(description="Train one of the nets listed in params.yaml.")
    parser.add_argument("--model", help="one of model.names (default: the first)")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--live", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True)
    parser.add_argument("--backup", type=Path,
                        help="per-epoch backup directory; a killed run resumes from it")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args(argv)
    params = load_params_or_exit(args.params, args.model)
    from tasks.speed import select_backend

    try:
        select_backend(params.speed.backend)  # before anything imports Keras
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from dvclive import Live

    from tasks.modeling import NonFiniteLossError
    from tasks.preprocess import load_prepared
    from tasks.resume import fingerprint

    prepared = load_prepared(args.data)
    verbose = 1 if sys.stdout.isatty() else 2
    started = time.perf_counter()
    with (
        atomic_dir(args.out) as out,
        atomic_dir(args.live) as live_dir,
        atomic_dir(args.plots) as plots_dir,
    ):
        live = Live(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None)
        try:
            result = train(
                params, prepared, out / "model.keras", live=live, verbose=verbose,
                backup=args.backup,
                fingerprint=fingerprint(params.model_dump(mode="json"), args.data / "data.npz"),
            )
        except ValueError as error:
            # bad model options or monitor keys are configuration errors
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        except NonFiniteLossError as error:
            kept = f"; the backup of the last good epoch is kept in {args.backup}" if args.backup else ""
            print(f"error: {error}{kept}", file=sys.stderr)
            raise SystemExit(1) from None
        elapsed = time.perf_counter() - started
        checkpoint = result.checkpoint
        write_plots(result, plots_dir)
        live.summary["best_epoch"] = checkpoint.best_epoch + 1  # 1-based, as Keras prints
        live.summary[f"best_{checkpoint.monitor}"] = checkpoint.best
        live.summary["seconds"] = round(elapsed, 2)
        live.end()
        meta = run_metadata(params)
        meta["train_images"] = int(len(prepared.x_train))
        ran = params.train.epochs - result.initial_epoch
        meta["seconds_per_epoch"] = round(elapsed / ran, 3) if ran else None
        meta["resumed_after_epoch"] = result.initial_epoch
        meta["speed"] = result.speed
        write_json(out / "params.json", meta)
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            result.model.summary(expand_nested=True, line_length=110)
        (out / "summary.txt").write_text(buffer.getvalue())
        skipped = write_diagram(result.model, out / "architecture.png")
        if skipped:
            print(f"train: {skipped}", file=sys.stderr)
    if result.backup is not None:  # only once the outputs are in place
        result.backup.complete(params.train.epochs)
    print(
        f"train: {params.model.name}, {params.train.epochs} epoch(s) in {elapsed:.1f} s; best "
        f"{checkpoint.monitor} {checkpoint.best:.4f} at epoch {checkpoint.best_epoch + 1}"
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    raise SystemExit(main())
