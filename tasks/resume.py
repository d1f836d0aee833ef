"""Per-epoch backups of the whole training state, so a killed run continues where it stopped.

Keras's ``BackupAndRestore`` saves the weights, the optimizer and the epoch, but not the state
of our callbacks (the plateau reduction, the best-checkpoint record, the applied rates), not the
per-epoch history, and it overwrites its file in place, so a kill during the write loses it.
:class:`TrainingBackup` saves all of that at the end of every epoch into a fresh directory and
swaps it in with renames:

    <backup>/current/state.weights.h5   model and optimizer variables (optimizer step included)
    <backup>/current/state.json         epoch, history, callback states, fingerprint
    <backup>/current/best.keras         the best model so far (what the train stage exports)

A backup is used only when its fingerprint (the resolved params and the training data) matches
the run's, so changed params never resume a stale run. When training finishes, the directory
is cleared down to ``complete.json``: the stage output DVC records, small and deterministic.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import keras

from tasks.io import write_json

CURRENT, STATE, WEIGHTS, BEST, COMPLETE = (
    "current", "state.json", "state.weights.h5", "best.keras", "complete.json",
)


def fingerprint(params: dict[str, Any], data_file: Path) -> str:
    """A digest of what a backup must match to be resumed: resolved params and the data."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    with open(data_file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _readable(directory: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((directory / STATE).read_text())
    except (OSError, ValueError):
        return None
    return state if (directory / WEIGHTS).exists() else None


class TrainingBackup(keras.callbacks.Callback):
    """Back up the training state at every epoch end; restore it before ``fit``.

    Args:
        directory: the backup directory (a persisted, uncached DVC output).
        fingerprint: see :func:`fingerprint`; a backup with another one is discarded.
        stateful: named callbacks with ``get_state``/``set_state`` whose state is saved.
        best_model: where the best-checkpoint callback writes; copied into the backup.
        live: an optional ``dvclive.Live``; a restored history is replayed into it.

    Put it after the callbacks whose state it saves: it reads them at epoch end.
    """

    def __init__(self, directory: Path, fingerprint: str, stateful: dict[str, Any],
                 best_model: Path, live: Any = None):
        super().__init__()
        self.directory, self.fingerprint = Path(directory), fingerprint
        self.stateful, self.best_model, self.live = stateful, Path(best_model), live
        self.history: list[dict[str, float]] = []

    def _latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest complete backup: ``current``, or one left by a kill in the middle of a swap.

        ``state.json`` is written last, so a directory that has it is complete.
        """
        candidates = [self.directory / CURRENT, *self.directory.glob("next-*"),
                      *self.directory.glob("previous-*")]
        found = [(c, s) for c in candidates if (s := _readable(c)) is not None]
        return max(found, key=lambda item: item[1]["epoch"], default=None)

    def restore(self, model: keras.Model) -> int:
        """Load the latest matching backup into ``model`` and the callbacks.

        Returns:
            The number of completed epochs, to pass to ``fit(initial_epoch=...)``; 0 when
            there is nothing to resume (and any stale backup has been removed).
        """
        found = self._latest() if self.directory.exists() else None
        if found is None or found[1].get("fingerprint") != self.fingerprint:
            if self.directory.exists():
                shutil.rmtree(self.directory)
            return 0
        where, state = found
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.load_weights(where / WEIGHTS)
        for name, callback in self.stateful.items():
            callback.set_state(state["callbacks"][name])
        self.history = list(state["history"])
        if (where / BEST).exists():
            self.best_model.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(where / BEST, self.best_model)
        if self.live is not None:
            for logs in self.history:
                for key, value in logs.items():
                    self.live.log_metric(key, value)
                self.live.next_step()
        return int(state["epoch"])

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.history.append({key: float(value) for key, value in (logs or {}).items()})
        state = {
            "epoch": epoch + 1,
            "fingerprint": self.fingerprint,
            "history": self.history,
            "callbacks": {name: cb.get_state() for name, cb in self.stateful.items()},
        }
        self.directory.mkdir(parents=True, exist_ok=True)
        staging = self.directory / f"next-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        self.model.save_weights(staging / WEIGHTS)
        if self.best_model.exists():
            shutil.copy2(self.best_model, staging / BEST)
        write_json(staging / STATE, state)
        current = self.directory / CURRENT
        previous = self.directory / f"previous-{os.getpid()}"
        if current.exists():
            os.replace(current, previous)
        os.replace(staging, current)
        shutil.rmtree(previous, ignore_errors=True)

    def complete(self, epochs: int) -> None:
        """Training finished: drop the state, leave a small deterministic marker."""
        if self.directory.exists():
            shutil.rmtree(self.directory)
        write_json(self.directory / COMPLETE, {"epochs": epochs, "fingerprint": self.fingerprint})


class EpochSeed(keras.callbacks.Callback):
    """Reseed at every epoch start from (seed, epoch): Python, NumPy, the backend, and the state
    of every seed generator in the model (augmentation, dropout).

    The random draws of epoch ``e`` then depend on ``e`` only, not on how many epochs this
    process has run, which is what lets a resumed run repeat an uninterrupted one. (Keras does
    not save seed-generator states with the weights.)
    """

    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        base = (self.seed * 100_003 + epoch) % (2**31)
        keras.utils.set_random_seed(base)
        generators = [sg for layer in self.model._flatten_layers(include_self=True)
                      for sg in getattr(layer, "_seed_generators", [])]
        for index, generator in enumerate(generators):
            generator.state.assign(
                keras.ops.convert_to_tensor([(base + 7919 * (index + 1)) % (2**31), 0],
                                            dtype=generator.state.dtype)
            )
