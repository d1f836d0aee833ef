"""Training-time model assembly and callbacks, backend-agnostic (TensorFlow and JAX).

- :func:`build_training_model` wraps a registry net with the input transform (scale, mean
  subtraction) and on-device augmentation, so the model takes raw uint8 images.
- :func:`step_lr` and :class:`LearningRateController` implement the book's step schedule and
  ReduceLROnPlateau as one controller whose two factors compose (the book's pair of callbacks
  does not: its scheduler overwrites any plateau reduction at the start of every epoch).
- :class:`BestCheckpoint` keeps the best model by a monitored metric and fails loudly when the
  metric is not logged (a misspelt key must not silently change what is kept).
- :class:`LiveLogger` writes per-epoch metrics through DVCLive without importing TensorFlow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

# saved training models may carry the cyclic-momentum optimizers; loading needs them registered
import tasks.schedules  # noqa: F401

AUGMENT_PREFIX = "augment_"
# Keras walks a functional graph recursively, one frame per layer; ResNet-1202 needs ~9,000.
RECURSION_LIMIT = 20_000


def load_model(path: Path, compile: bool = True) -> keras.Model:
    """Load a saved model, deep ones (thousands of layers) included.

    A trained model (models/<name>/model.keras) holds :class:`RandomShift`, which this module
    registers with Keras; ``keras.saving.load_model`` alone cannot load it unless this module
    was imported. The exports (export/<name>/) have no augmentation and load anywhere.
    ``compile=False`` leaves out the saved compile settings (loss, metrics, optimizer and
    ``jit_compile``), as ``keras.saving.load_model`` does.
    """
    import sys

    sys.setrecursionlimit(max(sys.getrecursionlimit(), RECURSION_LIMIT))
    return keras.saving.load_model(path, compile=compile)


def input_layers(mean: np.ndarray, std: np.ndarray) -> list[keras.layers.Layer]:
    """Layers mapping raw uint8 pixels to the network's input: x / 255, then (x - mean) / std.

    Args:
        mean: per-pixel (H, W, C) or per-channel (C,) mean, in [0, 1] units.
        std: same shape as ``mean``.
    """
    mean = np.asarray(mean, np.float32)
    axis = tuple(range(-mean.ndim, 0)) if mean.ndim > 1 else -1
    # float32 whatever the dtype policy: under mixed precision the net casts after them
    return [
        keras.layers.Rescaling(1.0 / 255.0, name="scale", dtype="float32"),
        keras.layers.Normalization(
            axis=axis, mean=mean, variance=np.square(np.asarray(std, np.float32)),
            name="normalize", dtype="float32",
        ),
    ]


@keras.saving.register_keras_serializable(package="deepnets")
class RandomShift(keras.layers.Layer):
    """Translate each image of a batch by its own random offset (training only).

    The shift is two small matrix products per image, ``rows @ image @ cols``, whose matrices
    hold the interpolation weights; that is the same on every backend and compiles with XLA
    (Keras' RandomTranslation does not, so a model holding it runs without XLA).

    Args:
        max_rows, max_cols: the largest shift in pixels along each axis.
        fill: ``"nearest"`` repeats the edge pixels; ``"zero"`` fills with zeros.
        interpolation: ``"bilinear"`` draws shifts uniformly in [-max, max];
            ``"whole_pixels"`` draws integers uniformly in [-max, max] (a pad-and-crop).
        seed: seed of the layer's generator (reseeded every epoch by tasks.resume.EpochSeed).
    """

    def __init__(self, max_rows: float, max_cols: float, *, fill: str = "nearest",
                 interpolation: str = "bilinear", seed: int | None = None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if fill not in ("nearest", "zero"):
            raise ValueError(f"RandomShift fill must be 'nearest' or 'zero', got {fill!r}")
        if interpolation not in ("bilinear", "whole_pixels"):
            raise ValueError("RandomShift interpolation must be 'bilinear' or 'whole_pixels', "
                             f"got {interpolation!r}")
        self.max_rows, self.max_cols = float(max_rows), float(max_cols)
        self.fill, self.interpolation, self.seed = fill, interpolation, seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def _weights(self, shifts, size: int):
        """(batch, size, size) matrices: output pixel i takes input pixel i - shift."""
        ops = keras.ops
        source = ops.arange(size, dtype="float32")[None, :] - shifts[:, None]  # (batch, size)
        columns = ops.arange(size, dtype="float32")[None, None, :]
        if self.interpolation == "whole_pixels":
            # whole shifts: every weight is 1 or 0, the matrices below with frac = 0 exactly,
            # in a third of the ops
            if self.fill == "nearest":
                source = ops.clip(source, 0.0, size - 1.0)
            return ops.cast(ops.equal(source[:, :, None], columns), "float32")
        low = ops.floor(source)
        frac = source - low
        if self.fill == "nearest":
            clip = lambda v: ops.clip(v, 0.0, size - 1.0)  # noqa: E731
            low, high = clip(low), clip(low + 1.0)
        else:
            high = low + 1.0  # a source outside the image matches no column: zero
        return (ops.cast(ops.equal(low[:, :, None], columns), "float32") * (1.0 - frac)[:, :, None]
                + ops.cast(ops.equal(high[:, :, None], columns), "float32") * frac[:, :, None])

    def _draw(self, batch, largest: float):
        if self.interpolation == "whole_pixels":
            span = 2 * int(round(largest)) + 1
            drawn = keras.random.randint((batch,), 0, span, seed=self.seed_generator)
            return keras.ops.cast(drawn, "float32") - float(int(round(largest)))
        return keras.random.uniform((batch,), -largest, largest, seed=self.seed_generator)

    def call(self, images, training=None):
        if not training:
            return images
        ops = keras.ops
        batch = ops.shape(images)[0]
        height, width = images.shape[1], images.shape[2]
        rows = self._weights(self._draw(batch, self.max_rows), height)
        cols = self._weights(self._draw(batch, self.max_cols), width)
        shifted = ops.einsum("bij,bjwc->biwc", rows, images)
        return ops.einsum("bkw,biwc->bikc", cols, shifted)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "max_rows": self.max_rows, "max_cols": self.max_cols,
                "fill": self.fill, "interpolation": self.interpolation, "seed": self.seed}


def build_training_model(
    net: keras.Model,
    mean: np.ndarray,
    std: np.ndarray,
    *,
    shift: float = 0.0,
    flip: bool = False,
    crop_pad: int = 0,
    seed: int | None = None,
) -> keras.Model:
    """Wrap ``net`` so it takes raw uint8 images and augments them on the device during training.

    The order follows the book: normalise first, then shift (filling with the nearest pixel, as
    ImageDataGenerator did) and flip the normalised image. Augmentation layers are inactive at
    inference, and :func:`strip_augmentation` removes them for export.
    """
    inputs = keras.Input(shape=net.input_shape[1:], dtype="uint8", name="image")
    x = inputs
    for layer in input_layers(mean, std):
        x = layer(x)
    if shift > 0:
        # the book's ImageDataGenerator(width/height_shift_range=shift): a uniform shift of up
        # to shift * size pixels, bilinear, edges filled with the nearest pixel
        height, width = net.input_shape[1:3]
        x = RandomShift(shift * height, shift * width, fill="nearest", interpolation="bilinear",
                        seed=seed, name=f"{AUGMENT_PREFIX}shift")(x)
    if crop_pad > 0:
        # the paper's "pad by 4, take a random 32x32 crop": a whole-pixel shift of up to crop_pad
        # pixels with zero fill, zero being the mean once normalised
        x = RandomShift(crop_pad, crop_pad, fill="zero", interpolation="whole_pixels",
                        seed=seed, name=f"{AUGMENT_PREFIX}crop")(x)
    if flip:
        x = keras.layers.RandomFlip("horizontal", seed=seed, name=f"{AUGMENT_PREFIX}flip",
                                    dtype="float32")(x)
    outputs = net(x)
    return keras.Model(inputs, outputs, name=f"{net.name}_uint8")


def strip_augmentation(model: keras.Model) -> keras.Model:
    """The inference model: the same input transform and net (shared weights), no augmentation."""
    import sys

    sys.setrecursionlimit(max(sys.getrecursionlimit(), RECURSION_LIMIT))
    inputs = keras.Input(shape=model.input_shape[1:], dtype="uint8", name="image")
    x = inputs
    for layer in model.layers[1:]:
        if not layer.name.startswith(AUGMENT_PREFIX):
            x = layer(x)
    return keras.Model(inputs, x, name=model.name)


def step_lr(epoch: int, base: float, milestones: Sequence[int], gammas: Sequence[float]) -> float:
    """Learning rate of the step schedule at 0-based ``epoch``.

    ``gammas[i]`` multiplies the rate once ``milestones[i]`` epochs have completed; the book's
    schedule is base 1e-3, milestones (80, 120, 160, 180), gammas (0.1, 0.1, 0.1, 0.5).
    """
    lr = base
    for milestone, gamma in zip(milestones, gammas, strict=True):
        if epoch >= milestone:
            lr *= gamma
    return lr


class LearningRateController(keras.callbacks.Callback):
    """Step schedule times a plateau factor: lr(epoch) = step_lr(epoch) * plateau_scale.

    The plateau part behaves like ReduceLROnPlateau (factor, patience, cooldown 0, min_lr),
    but its reduction is kept as a multiplier that survives the step schedule's milestones
    instead of being overwritten by them. A plateau reduction never takes the rate below
    ``min_lr``; the step schedule alone may (the book's last step ends at 0.5e-6).

    Its state (:meth:`get_state`) is what a resumed run needs to continue exactly.
    """

    def __init__(
        self,
        base_lr: float,
        milestones: Sequence[int] = (),
        gammas: Sequence[float] = (),
        *,
        monitor: str | None = "val_loss",
        factor: float = math.sqrt(0.1),
        patience: int = 5,
        min_lr: float = 0.0,
        warmup_epochs: int = 0,
        warmup_lr: float | None = None,
    ):
        super().__init__()
        self.base_lr, self.milestones, self.gammas = base_lr, list(milestones), list(gammas)
        self.warmup_epochs, self.warmup_lr = warmup_epochs, warmup_lr
        self.monitor, self.factor, self.patience, self.min_lr = monitor, factor, patience, min_lr
        self.mode = "max" if monitor and "acc" in monitor else "min"
        self.plateau_scale = 1.0
        self.wait = 0
        self.best: float | None = None
        self.current_lr = base_lr

    def lr_for(self, epoch: int) -> float:
        if epoch < self.warmup_epochs and self.warmup_lr is not None:
            return self.warmup_lr  # the paper's ResNet-110 starts at 0.01 to get going
        step = step_lr(epoch, self.base_lr, self.milestones, self.gammas)
        return max(step * self.plateau_scale, min(step, self.min_lr))

    def _set_lr(self, lr: float) -> None:
        self.current_lr = lr
        self.model.optimizer.learning_rate.assign(lr)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._set_lr(self.lr_for(epoch))

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs if logs is not None else {}
        logs["learning_rate"] = self.current_lr
        if not self.monitor:
            return
        value = require_metric(logs, self.monitor, "train.plateau.monitor")
        improved = self.best is None or (
            value > self.best if self.mode == "max" else value < self.best
        )
        if improved:
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience and self.current_lr > self.min_lr:
            step = step_lr(epoch, self.base_lr, self.milestones, self.gammas)
            reduced = max(self.current_lr * self.factor, self.min_lr)
            self.plateau_scale = reduced / step
            self.wait = 0

    def get_state(self) -> dict[str, Any]:
        return {"plateau_scale": self.plateau_scale, "wait": self.wait, "best": self.best}

    def set_state(self, state: dict[str, Any]) -> None:
        self.plateau_scale, self.wait, self.best = (
            state["plateau_scale"], state["wait"], state["best"],
        )


def require_metric(logs: dict, key: str, setting: str) -> float:
    """``logs[key]``, or a ValueError naming the setting and the metrics that were logged."""
    if key not in logs:
        raise ValueError(
            f"{setting} = {key!r} is not a metric this run logs; logged metrics: "
            f"{', '.join(sorted(logs))}. Set {setting} to one of them."
        )
    return float(logs[key])


class BestCheckpoint(keras.callbacks.Callback):
    """Save the model whenever ``monitor`` improves; raise if ``monitor`` is never logged."""

    def __init__(self, path: Path, monitor: str = "val_accuracy", setting: str = "monitor"):
        super().__init__()
        self.path, self.monitor, self.setting = Path(path), monitor, setting
        self.mode = "max" if "acc" in monitor else "min"
        self.best: float | None = None
        self.best_epoch: int | None = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        value = require_metric(logs or {}, self.monitor, self.setting)
        if not math.isfinite(value):
            return
        if self.best is None or (value > self.best if self.mode == "max" else value < self.best):
            self.best, self.best_epoch = value, epoch
            self.model.save(self.path)

    def get_state(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def set_state(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]


class EpochRates(keras.callbacks.Callback):
    """Record (first step of the epoch, learning rate, None) at the start of every epoch."""

    def __init__(self):
        super().__init__()
        self.rows: list[tuple[int, float, float | None]] = []

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self.rows.append((epoch * self.params["steps"], rate, None))

    def get_state(self) -> dict[str, Any]:
        return {"rows": [list(row) for row in self.rows]}

    def set_state(self, state: dict[str, Any]) -> None:
        self.rows = [tuple(row) for row in state["rows"]]


class LiveLogger(keras.callbacks.Callback):
    """Log every epoch's metrics through a ``dvclive.Live`` (no TensorFlow import needed)."""

    def __init__(self, live):
        super().__init__()
        self.live = live

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        for name, value in (logs or {}).items():
            self.live.log_metric(name, float(value))
        self.live.next_step()


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class StopOnNonFinite(keras.callbacks.Callback):
    """Raise when a batch loss is NaN or infinite (Keras' TerminateOnNaN only stops quietly).

    Safe for Keras' asynchronous callback dispatch (JAX and torch backends): the check then runs
    in Keras' callback thread and the device is not made to wait for each batch's loss; the
    error reaches ``fit`` a batch or two later, and at the latest before the epoch's end
    callbacks save anything.
    """

    async_safe = True

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise NonFiniteLossError(
                f"the training loss became {float(loss)} at batch {batch}; lower "
                "train.learning_rate or check the input data"
            )


class EpochShuffledArrays(keras.utils.PyDataset):
    """Training batches from in-memory arrays, in an order drawn from ``(seed, epoch)``.

    ``fit(x, y, shuffle=True)`` draws its orders from a random state that a restarted process
    cannot put back where it was, so a resumed run would see other batches than the run it
    continues. Here epoch ``e``'s order depends on ``seed`` and ``e`` only.

    Args:
        x, y: the training arrays (kept as they are; batches are gathered by index).
        batch_size: images per batch; the last batch may be smaller.
        seed: the run's seed.
        initial_epoch: the first epoch this fit runs (a resumed run's completed epochs).
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int,
                 initial_epoch: int = 0):
        super().__init__(workers=1, use_multiprocessing=False)
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self.epoch = initial_epoch
        self.order = self.order_for(self.epoch)

    def order_for(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.x))

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        return self.x[rows], self.y[rows]

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self.order = self.order_for(self.epoch)
