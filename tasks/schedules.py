"""One-cycle training (Smith's 1cycle policy, with fastai's cosine phases), backend-agnostic.

Schedules are pure functions of the training progress ``p`` in [0, 1] (the share of the run's
batches already done); :class:`OneCycle` applies them before every batch.

- :func:`one_cycle_lr`: warm up from ``lr_max / div`` to ``lr_max`` over the first
  ``pct_start`` of training, then anneal to ``lr_max / div_final``; both phases are cosine.
- :func:`one_cycle_momentum`: the momentum moves the other way, ``moms[0]`` down to ``moms[1]``
  during the warm-up and back up to ``moms[2]`` during the annealing.

Defaults are fastai's ``fit_one_cycle``: div 25, div_final 1e5, pct_start 0.25,
moms (0.95, 0.85, 0.95).

Why the Cyclic* optimizers: Keras 3 optimizers keep ``momentum`` (SGD) and ``beta_1`` (Adam)
as Python floats that are read once, when the train step is traced, so assigning a new value to
the attribute during ``fit`` has no effect on the updates (SGD even tests ``momentum != 0`` in
Python inside its update step, so a variable cannot simply be put in its place). The learning
rate is different: it is an optimizer variable, read on every step. :class:`CyclicSGD`,
:class:`CyclicAdam` and :class:`CyclicAdamW` hold the momentum in an optimizer variable too
(``cyclic_momentum``), tracked like the learning rate, so that it is read on every step under
TensorFlow and JAX alike, saved with the optimizer's state and restored with it. Their configs
keep plain floats, so a saved model stays loadable, provided this module has been imported (it
registers the classes with Keras serialization).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
from keras import ops

DEFAULT_MOMS = (0.95, 0.85, 0.95)
_PACKAGE = "deepnets"


# --- schedules: pure functions of progress p -------------------------------------------------


def cos_anneal(start: float, end: float, p: float) -> float:
    """Half a cosine from ``start`` (p = 0) to ``end`` (p = 1); flat at both ends."""
    return end + (start - end) * (1.0 + math.cos(math.pi * p)) / 2.0


def two_phase_cos(p: float, pct: float, start: float, middle: float, end: float) -> float:
    """``start`` to ``middle`` over the first ``pct`` of training, then ``middle`` to ``end``.

    Each phase is a :func:`cos_anneal`; ``p`` outside [0, 1] is clipped. At ``p == pct`` the value
    is ``middle``. ``pct`` 0 or 1 leaves only one phase.
    """
    if not 0.0 <= pct <= 1.0:
        raise ValueError(f"pct must be in [0, 1], got {pct}")
    p = min(max(float(p), 0.0), 1.0)
    if p < pct:
        return cos_anneal(start, middle, p / pct)
    if pct == 1.0:
        return middle
    return cos_anneal(middle, end, (p - pct) / (1.0 - pct))


def one_cycle_lr(
    p: float, lr_max: float, div: float = 25.0, div_final: float = 1e5, pct_start: float = 0.25
) -> float:
    """Learning rate at progress ``p``: lr_max/div -> lr_max (at pct_start) -> lr_max/div_final."""
    return two_phase_cos(p, pct_start, lr_max / div, lr_max, lr_max / div_final)


def one_cycle_momentum(
    p: float, moms: Sequence[float] = DEFAULT_MOMS, pct_start: float = 0.25
) -> float:
    """Momentum at progress ``p``: moms[0] -> moms[1] (at pct_start) -> moms[2]."""
    first, low, last = moms
    return two_phase_cos(p, pct_start, first, low, last)


# --- optimizers whose momentum can change between steps --------------------------------------


def _momentum_variable(optimizer: keras.optimizers.Optimizer, value: float) -> keras.Variable:
    return optimizer.add_variable(
        shape=(),
        initializer=keras.initializers.Constant(value),
        aggregation="only_first_replica",
        name="cyclic_momentum",
    )


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CyclicSGD(keras.optimizers.SGD):
    """Keras SGD whose momentum is the variable ``cyclic_momentum``, read on every step.

    Same update rule as ``keras.optimizers.SGD`` (Nesterov included), with the momentum taken
    from the variable. ``momentum`` stays the initial float (it sizes the state and fills the
    config); it must be > 0, since SGD without momentum keeps no velocity to cycle.
    """

    def __init__(self, learning_rate=0.01, momentum=0.9, nesterov=False, **kwargs):
        momentum = float(momentum)
        if momentum <= 0.0:
            raise ValueError(
                "CyclicSGD needs momentum > 0 (SGD without momentum keeps no velocity); "
                "cycle only the learning rate with OneCycle(moms=None) instead"
            )
        super().__init__(learning_rate=learning_rate, momentum=momentum, nesterov=nesterov,
                         **kwargs)
        self.cyclic_momentum = _momentum_variable(self, momentum)

    def update_step(self, gradient, variable, learning_rate):
        learning_rate = ops.cast(learning_rate, variable.dtype)
        gradient = ops.cast(gradient, variable.dtype)
        momentum = ops.cast(self.cyclic_momentum, variable.dtype)
        velocity = self.momentums[self._get_variable_index(variable)]
        step = ops.multiply(gradient, learning_rate)
        self.assign(velocity, ops.subtract(ops.multiply(velocity, momentum), step))
        if self.nesterov:
            self.assign_add(variable, ops.subtract(ops.multiply(velocity, momentum), step))
        else:
            self.assign_add(variable, velocity)


class _CyclicBeta1:
    """Adam-family mixin: ``beta_1`` becomes the variable ``cyclic_momentum``.

    Keras' Adam and AdamW use ``beta_1`` only through ops (a variable works there); the config
    keeps the initial float.
    """

    def _make_beta_1_cyclic(self) -> None:
        self._initial_beta_1 = float(self.beta_1)
        self.cyclic_momentum = _momentum_variable(self, self._initial_beta_1)
        self.beta_1 = self.cyclic_momentum

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["beta_1"] = self._initial_beta_1
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CyclicAdam(_CyclicBeta1, keras.optimizers.Adam):
    """Keras Adam whose ``beta_1`` is the variable ``cyclic_momentum``, read on every step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._make_beta_1_cyclic()


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CyclicAdamW(_CyclicBeta1, keras.optimizers.AdamW):
    """Keras AdamW whose ``beta_1`` is the variable ``cyclic_momentum``, read on every step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._make_beta_1_cyclic()


_CYCLIC = {
    keras.optimizers.SGD: CyclicSGD,
    keras.optimizers.Adam: CyclicAdam,
    keras.optimizers.AdamW: CyclicAdamW,
}


def with_cyclic_momentum(optimizer: keras.optimizers.Optimizer) -> keras.optimizers.Optimizer:
    """The Cyclic* twin of an unbuilt SGD, Adam or AdamW, with the same config.

    Use it on the optimizer before ``compile`` when :class:`OneCycle` is to cycle the momentum.
    A Cyclic* optimizer is returned as it is.
    """
    if hasattr(optimizer, "cyclic_momentum"):
        return optimizer
    cls = _CYCLIC.get(type(optimizer))
    if cls is None:
        raise TypeError(
            f"no cyclic-momentum version of {type(optimizer).__name__}; use SGD (with "
            "momentum), Adam or AdamW, or OneCycle(moms=None) to cycle only the learning rate"
        )
    return cls.from_config(optimizer.get_config())


# --- the callback ----------------------------------------------------------------------------


class OneCycle(keras.callbacks.Callback):
    """Set the learning rate and momentum of the 1cycle policy before every training batch.

    Progress is ``p = step / total_steps`` (fastai's convention: the last batch runs at
    ``(total_steps - 1) / total_steps``), where the global step counts batches across epochs:
    ``step = epoch * steps_per_epoch + batch``, ``steps_per_epoch`` being ``params["steps"]`` of
    the fit. ``total_steps`` defaults to ``epochs * steps_per_epoch`` of the fit.

    Resuming: ``fit(initial_epoch=e)`` continues the schedule at step ``e * steps_per_epoch``
    by itself; ``initial_step`` overrides where this fit's first batch sits (a run resumed in
    the middle of an epoch, or several fits chained into one schedule). ``total_steps`` should
    then be given, as the whole run's length.

    The momentum is the optimizer's ``cyclic_momentum`` variable (see :class:`CyclicSGD`,
    :class:`CyclicAdam`, :func:`with_cyclic_momentum`); a stock Keras optimizer raises a
    TypeError unless ``moms=None``, which cycles only the learning rate. With
    ``steps_per_execution > 1`` the rates change once per execution, not per batch.

    ``history`` lists every applied ``(step, learning_rate, momentum)`` (momentum None when not
    cycled); :func:`schedule_rows` and :func:`plot_schedule` turn it into a table and a figure.
    """

    def __init__(
        self,
        lr_max: float,
        total_steps: int | None = None,
        div: float = 25.0,
        div_final: float = 1e5,
        pct_start: float = 0.25,
        moms: Sequence[float] | None = DEFAULT_MOMS,
        initial_step: int | None = None,
    ):
        super().__init__()
        if not 0.0 <= pct_start <= 1.0:
            raise ValueError(f"pct_start must be in [0, 1], got {pct_start}")
        if moms is not None and len(moms) != 3:
            raise ValueError(f"moms must be (start, lowest, end), got {moms}")
        self.lr_max, self.div, self.div_final, self.pct_start = lr_max, div, div_final, pct_start
        self.moms = tuple(moms) if moms is not None else None
        self.total_steps, self.initial_step = total_steps, initial_step
        self.history: list[tuple[int, float, float | None]] = []
        self._total: int | None = None
        self._epoch_start: int | None = None
        self._batches_in_epoch = 0
        self._last: tuple[float, float | None] | None = None

    def lr_at(self, step: int) -> float:
        return one_cycle_lr(self._progress(step), self.lr_max, self.div, self.div_final,
                            self.pct_start)

    def momentum_at(self, step: int) -> float | None:
        if self.moms is None:
            return None
        return one_cycle_momentum(self._progress(step), self.moms, self.pct_start)

    def _progress(self, step: int) -> float:
        if not self._total:
            raise RuntimeError("OneCycle does not know the run's length yet (total_steps)")
        return min(step / self._total, 1.0)

    def on_train_begin(self, logs: dict | None = None) -> None:
        optimizer = self.model.optimizer
        if not isinstance(optimizer.learning_rate, keras.Variable):
            raise TypeError(
                "OneCycle sets the learning rate itself; compile with a float learning rate, "
                "not a LearningRateSchedule"
            )
        if self.moms is not None and not hasattr(optimizer, "cyclic_momentum"):
            raise TypeError(
                f"{type(optimizer).__name__} reads its momentum as a constant once traced, so "
                "OneCycle cannot change it; compile with "
                "tasks.schedules.with_cyclic_momentum(optimizer) or pass moms=None"
            )
        steps = self.params.get("steps")
        epochs = self.params.get("epochs")
        self._steps_per_epoch = steps
        self._total = self.total_steps
        if self._total is None:
            if not steps or not epochs:
                raise ValueError("OneCycle needs total_steps when the fit's steps are unknown")
            self._total = int(epochs) * int(steps)
        self._epoch_start = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if self._epoch_start is None:
            if self.initial_step is not None:
                self._epoch_start = int(self.initial_step)
            elif epoch == 0:
                self._epoch_start = 0
            elif self._steps_per_epoch:
                self._epoch_start = epoch * int(self._steps_per_epoch)
            else:
                raise ValueError("OneCycle needs initial_step to resume when steps are unknown")
        else:
            self._epoch_start += self._batches_in_epoch
        self._batches_in_epoch = 0

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        step = self._epoch_start + batch
        self._batches_in_epoch = max(self._batches_in_epoch, batch + 1)
        optimizer = self.model.optimizer
        lr = self.lr_at(step)
        optimizer.learning_rate.assign(lr)
        momentum = self.momentum_at(step)
        if momentum is not None:
            optimizer.cyclic_momentum.assign(momentum)
        self.history.append((step, lr, momentum))
        self._last = (lr, momentum)

    # on_train_batch_end only counts batches: safe in Keras' callback thread, so this callback
    # does not make the device wait for each batch (JAX and torch backends)
    async_safe = True

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        # steps_per_execution > 1 reports the last batch of the execution here
        self._batches_in_epoch = max(self._batches_in_epoch, batch + 1)

    def get_state(self) -> dict[str, Any]:
        return {"history": [list(row) for row in self.history]}

    def set_state(self, state: dict[str, Any]) -> None:
        self.history = [tuple(row) for row in state["history"]]

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None and self._last is not None:
            lr, momentum = self._last
            logs["learning_rate"] = lr
            if momentum is not None:
                logs["momentum"] = momentum


# --- reporting -------------------------------------------------------------------------------


def schedule_rows(history: Sequence[tuple[int, float, float | None]]) -> list[dict[str, Any]]:
    """One dict per applied step: {step, learning_rate, momentum} (momentum left out if None)."""
    rows = []
    for step, lr, momentum in history:
        row: dict[str, Any] = {"step": int(step), "learning_rate": float(lr)}
        if momentum is not None:
            row["momentum"] = float(momentum)
        rows.append(row)
    return rows


def plot_schedule(history: Sequence[tuple[int, float, float | None]], path: Path) -> Path:
    """PNG of the applied learning rate (and momentum, when cycled) against the global step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row[0] for row in history]
    rates = [row[1] for row in history]
    moms = [row[2] for row in history]
    with_moms = any(m is not None for m in moms)
    fig, axes = plt.subplots(1, 2 if with_moms else 1, figsize=(10 if with_moms else 5, 3.6),
                             squeeze=False)
    try:
        ax = axes[0, 0]
        ax.plot(steps, rates, color="tab:blue")
        ax.set(title="learning rate", xlabel="step")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if with_moms:
            ax = axes[0, 1]
            ax.plot(steps, [math.nan if m is None else m for m in moms], color="tab:orange")
            ax.set(title="momentum", xlabel="step")
        for ax in axes.ravel():
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path
