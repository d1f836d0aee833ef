"""Activation statistics during training (fastai's ActivationStats and "colorful dimension").

:class:`ActivationStats` records, for chosen layers and every ``every`` training batches, the
mean, the standard deviation, the share of activations near zero and a histogram of the
layer's output. :func:`plot_stats` draws them; :func:`stats_rows` flattens them for a DVC plot.

How activations are measured: Keras 3 has no forward hooks, so the callback cannot look inside
the training forward pass. Instead, after each recorded training batch it runs a *probe* model,
which shares the trained model's layers and weights and outputs the chosen layers' activations,
on a fixed sample batch given to the constructor, by default in inference mode (augmentation
off, BatchNormalization on its moving statistics, dropout off; ``training=True`` measures in
training mode instead, without touching the moving statistics). The statistics therefore follow
the network's weights on one fixed batch, not the (shuffled, augmented) training batches; that
costs one forward pass of the sample per recorded step and works on any backend. The
statistics are computed on the device, in the probe's graph (:func:`summary_tensor`), so only
``3 + bins`` numbers per layer come back to the host.

Caveat of inference mode in BatchNormalization nets: the moving statistics lag the weights
(Keras' BN momentum 0.99 averages over ~100 steps), so while the weights change fast (early
training, high learning rates) the probe can see activations far larger than the training pass
does; the spike fades as the moving statistics catch up. Use ``training=True`` to see the
activations as normalised by the batch itself.

Choices, following fastai's ActivationStats unless said otherwise:

- Layers: by default the output of every layer that applies a non-linearity, i.e. the
  activation layers (Activation, ReLU, LeakyReLU, ELU, PReLU, Softmax) and the layers with a
  non-linear built-in ``activation`` (``Conv2D(..., activation="relu")``, the softmax Dense),
  nested models included. fastai hooks every module that has parameters, so in a
  conv-BN-ReLU net it sees the conv and BN outputs before the ReLU; here, in this project's
  nets, a conv or BN output always goes through an Activation layer, and it is that
  post-activation output (the one the "near zero" share and the 0..10 histogram are meant for)
  that is recorded. Any layer can be chosen by name instead.
- Near zero: an activation ``x <= 0.05`` (fastai's test, one-sided). On post-ReLU outputs
  (never negative) it is the share within 0.05 of zero; on a signed output it also counts
  every negative value.
- Histogram: 40 bins over [0, 10], as fastai's ``histc(40, 0, 10)``: values outside the range
  (negative ones, and those above 10) are not counted, NaN neither; a value of exactly 10
  falls in the last bin. So the counts sum to the number of activations in [0, 10].
- Standard deviation: with Bessel's correction (``ddof=1``), as torch's ``std``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import ops

NEAR_ZERO = 0.05
HIST_BINS = 40
HIST_RANGE = (0.0, 10.0)
_ACTIVATION_LAYERS = (
    keras.layers.Activation,
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.ELU,
    keras.layers.PReLU,
    keras.layers.Softmax,
)


@dataclass
class LayerStats:
    """One layer's record: a value per recorded step, a histogram (counts per bin) per step."""

    hist_range: tuple[float, float] = HIST_RANGE
    steps: list[int] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    near_zero: list[float] = field(default_factory=list)
    hist: list[np.ndarray] = field(default_factory=list)


def summarize(
    values: np.ndarray,
    near_zero: float = NEAR_ZERO,
    bins: int = HIST_BINS,
    hist_range: tuple[float, float] = HIST_RANGE,
) -> tuple[float, float, float, np.ndarray]:
    """(mean, std, near-zero share, histogram counts) of all the values of one layer output.

    The NumPy reference of :func:`summary_tensor` (which the callback runs on the device).
    """
    values = np.asarray(values)
    x = values.astype(np.float64).ravel()
    std = float(np.std(x, ddof=1)) if x.size > 1 else 0.0
    counts, _ = np.histogram(x, bins=bins, range=hist_range)
    near = float(np.mean(values <= near_zero))  # in the values' own precision, as on the device
    return float(np.mean(x)), std, near, counts.astype(np.int64)


def summary_tensor(
    x,
    near_zero: float = NEAR_ZERO,
    bins: int = HIST_BINS,
    hist_range: tuple[float, float] = HIST_RANGE,
):
    """``[mean, std, near-zero share, *histogram counts]`` of all of ``x``, with keras.ops.

    Works on symbolic tensors, so the probe computes its statistics on the device and returns
    ``3 + bins`` numbers per layer instead of every activation. Bins are ``floor((x - low) /
    width)``, the top edge falling in the last bin; values outside the range and NaN are left
    out (the same rule as :func:`summarize`, up to float32 rounding at bin edges).
    """
    low, high = float(hist_range[0]), float(hist_range[1])
    x = ops.reshape(ops.cast(x, "float32"), (-1,))
    n = ops.cast(ops.size(x), "float32")
    mean = ops.mean(x)
    std = ops.sqrt(ops.sum(ops.square(ops.subtract(x, mean))) / ops.maximum(n - 1.0, 1.0))
    near = ops.mean(ops.cast(ops.less_equal(x, near_zero), "float32"))
    inside = ops.logical_and(ops.greater_equal(x, low), ops.less_equal(x, high))
    position = (ops.where(inside, x, low) - low) * (bins / (high - low))
    index = ops.minimum(ops.cast(ops.floor(position), "int32"), bins - 1)
    index = ops.where(inside, index, bins)  # one extra bin for what is left out
    counts = ops.segment_sum(ops.ones_like(x), index, num_segments=bins + 1)
    counts = ops.slice(counts, [0], [bins])
    return ops.concatenate([ops.stack([mean, std, near]), counts])


# --- choosing layers and building the probe ---------------------------------------------------


def is_activation_layer(layer: keras.layers.Layer) -> bool:
    """Whether ``layer``'s output is the output of a non-linearity (the default choice)."""
    if isinstance(layer, keras.Model):
        return False
    if isinstance(layer, _ACTIVATION_LAYERS):
        return getattr(getattr(layer, "activation", None), "__name__", "") != "linear"
    activation = getattr(layer, "activation", None)
    return callable(activation) and getattr(activation, "__name__", "") != "linear"


def layer_paths(model: keras.Model, prefix: str = "") -> list[tuple[str, keras.layers.Layer]]:
    """Every layer as (path, layer), nested models walked in place: ``"net/conv1"``."""
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        path = f"{prefix}{layer.name}"
        found.append((path, layer))
        if isinstance(layer, keras.Model):
            found.extend(layer_paths(layer, prefix=f"{path}/"))
    return found


def default_layers(model: keras.Model) -> list[str]:
    """Paths of the layers :class:`ActivationStats` watches by default (see the module doc)."""
    return [path for path, layer in layer_paths(model) if is_activation_layer(layer)]


def _resolve(model: keras.Model, names: Sequence[str] | None) -> dict[int, str]:
    """id(layer) -> path for the chosen layers; a name is a path or a bare name, unique."""
    paths = layer_paths(model)
    if names is None:
        chosen = [(path, layer) for path, layer in paths if is_activation_layer(layer)]
        if not chosen:
            raise ValueError("the model has no activation layers; pass layer_names")
    else:
        chosen = []
        for name in names:
            matches = [entry for entry in paths if entry[0] == name] or [
                entry for entry in paths if entry[0].rsplit("/", 1)[-1] == name
            ]
            if len(matches) != 1:
                known = ", ".join(p for p, _ in paths)
                raise ValueError(
                    f"layer {name!r} {'is ambiguous' if matches else 'not found'}; layers: {known}"
                )
            chosen.append(matches[0])
    return {id(layer): path for path, layer in chosen}


def build_probe(model: keras.Model, names: Sequence[str] | None = None) -> keras.Model:
    """A model from ``model``'s inputs to the chosen layers' outputs, sharing all weights.

    Layers inside nested functional (or Sequential) sub-models are reached by re-running each
    graph layer by layer with ``keras.models.clone_model(..., clone_function=identity,
    call_function=...)``, which reuses every layer (no copy) and lets the call of each layer be
    intercepted: a nested sub-model is re-run the same way, wrapped into a model that also
    outputs its taps, and called in the outer graph in its place. The probe's outputs are a
    dict keyed by layer path, in the order of ``names`` (graph order by default). A subclassed
    sub-model is called as one layer (its inside cannot be tapped, its own output can).
    """
    wanted = _resolve(model, names)
    order = list(wanted.values())

    def expand(submodel: keras.Model, taps: dict[str, Any]):
        """Re-run ``submodel``'s graph on fresh inputs, recording the chosen layers' outputs."""

        def call(layer, *args, **kwargs):
            if isinstance(layer, keras.Model) and getattr(layer, "inputs", None):
                inner_taps: dict[str, Any] = {}
                clone = expand(layer, inner_taps)
                if inner_taps:
                    flat_out = keras.tree.flatten(clone.output)
                    wrapper = keras.Model(
                        clone.input,
                        {**{f"output:{i}": t for i, t in enumerate(flat_out)}, **inner_taps},
                        name=f"{layer.name}_tapped",
                    )
                    result = wrapper(args[0])
                    taps.update({path: result[path] for path in inner_taps})
                    outputs = keras.tree.pack_sequence_as(
                        clone.output, [result[f"output:{i}"] for i in range(len(flat_out))]
                    )
                else:
                    outputs = layer(*args, **kwargs)
            else:
                outputs = layer(*args, **kwargs)
            path = wanted.get(id(layer))
            if path is not None and path not in taps:
                taps[path] = outputs
            return outputs

        twin = keras.Model(submodel.input, submodel.output, name=f"{submodel.name}_twin")
        return keras.models.clone_model(twin, clone_function=lambda op: op, call_function=call)

    taps: dict[str, Any] = {}
    clone = expand(model, taps)
    missing = [path for path in order if path not in taps]
    if missing:
        raise ValueError(f"layers not reached from the model's inputs: {', '.join(missing)}")
    return keras.Model(
        clone.input, {path: taps[path] for path in order}, name=f"{model.name}_activations"
    )


# --- the callback ----------------------------------------------------------------------------


class ActivationStats(keras.callbacks.Callback):
    """Record activation statistics of chosen layers every ``every`` training batches.

    Args:
        sample: a batch of raw model inputs (what ``fit`` feeds the model) on which the
            activations are measured after each recorded batch; keep it small (a few dozen
            images): all its activations of all chosen layers are computed every time.
        layer_names: layer paths (``"net/stage1_relu1"``) or unique bare names; None takes every
            post-activation output (see the module doc).
        every: record after training batches whose global step is a multiple of ``every``.
        bins, hist_range: the histogram (fastai: 40 bins over [0, 10]).
        near_zero: the threshold of the near-zero share (``x <= near_zero``; fastai: 0.05).
        training: measure in training mode (BatchNormalization on the sample's own batch
            statistics, dropout and augmentation active), through ``stateless_call`` so that
            no moving statistic is updated; closer to what fastai's hooks see, but run eagerly
            (slower) and noisier. Default: inference mode, compiled.

    Global steps count batches across epochs: ``epoch * steps_per_epoch + batch``.
    ``stats`` maps each layer path to its :class:`LayerStats`, in the order of ``layer_names``
    (graph order by default).
    """

    def __init__(
        self,
        sample: np.ndarray,
        layer_names: Sequence[str] | None = None,
        every: int = 1,
        bins: int = HIST_BINS,
        hist_range: tuple[float, float] = HIST_RANGE,
        near_zero: float = NEAR_ZERO,
        training: bool = False,
    ):
        super().__init__()
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.sample = sample
        self.layer_names = list(layer_names) if layer_names is not None else None
        self.every, self.bins, self.near_zero = every, bins, near_zero
        self.training = training
        self.hist_range = (float(hist_range[0]), float(hist_range[1]))
        self.stats: dict[str, LayerStats] = {}
        self.probe: keras.Model | None = None
        self.summary_probe: keras.Model | None = None
        self._probed: keras.Model | None = None
        self._epoch_start = 0
        self._batches_in_epoch = 0
        self._first_epoch = True

    def on_train_begin(self, logs: dict | None = None) -> None:
        if self.probe is None or self._probed is not self.model:
            self.probe = build_probe(self.model, self.layer_names)
            summaries = {
                path: summary_tensor(x, self.near_zero, self.bins, self.hist_range)
                for path, x in self.probe.output.items()
            }
            self.summary_probe = keras.Model(self.probe.input, summaries,
                                             name=f"{self.model.name}_activation_stats")
            self.summary_probe.jit_compile = bool(self.model.jit_compile)
            self._probed = self.model
        for path in self.probe.output:
            self.stats.setdefault(path, LayerStats(hist_range=self.hist_range))
        self._steps_per_epoch = self.params.get("steps")
        self._first_epoch = True

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if self._first_epoch:
            self._epoch_start = epoch * int(self._steps_per_epoch or 0)
            self._first_epoch = False
        else:
            self._epoch_start += self._batches_in_epoch
        self._batches_in_epoch = 0

    # A batch's statistics are taken when the next batch begins, or at the epoch's end, in the
    # main thread: on_train_batch_end only counts, so it may run in Keras' callback thread, and
    # the device does not wait for every batch's loss (JAX and torch backends).
    async_safe = True

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        if batch > 0:
            self._record_if_due(self._epoch_start + batch - 1)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._batches_in_epoch = max(self._batches_in_epoch, batch + 1)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self._batches_in_epoch:  # Keras has waited for the epoch's batch callbacks
            self._record_if_due(self._epoch_start + self._batches_in_epoch - 1)

    def _record_if_due(self, step: int) -> None:
        if step % self.every == 0:
            self.record(step)

    def _run(self, probe: keras.Model) -> dict[str, Any]:
        _ = self.model  # under JAX, reading this property syncs the trained weights back
        if not self.training:
            return probe.predict_on_batch(self.sample)
        outputs, _ = probe.stateless_call(
            [v.value for v in probe.trainable_variables],
            [v.value for v in probe.non_trainable_variables],
            ops.convert_to_tensor(self.sample),
            training=True,
        )
        return outputs

    def measure(self) -> dict[str, np.ndarray]:
        """The chosen layers' activations on the sample, now; for inspection and tests."""
        return {path: ops.convert_to_numpy(v) for path, v in self._run(self.probe).items()}

    def record(self, step: int) -> None:
        """Append the statistics of the sample's activations, computed on the device."""
        summaries = self._run(self.summary_probe)
        for path, summary in summaries.items():
            summary = np.asarray(ops.convert_to_numpy(summary), dtype=np.float64)
            mean, std, near_zero = (float(v) for v in summary[:3])
            counts = np.rint(summary[3:]).astype(np.int64)
            record = self.stats[path]
            record.steps.append(int(step))
            record.mean.append(mean)
            record.std.append(std)
            record.near_zero.append(near_zero)
            record.hist.append(counts)


# --- reporting -------------------------------------------------------------------------------


def stats_rows(stats: dict[str, LayerStats]) -> list[dict[str, Any]]:
    """One dict per layer and recorded step: {step, layer, mean, std, near_zero}."""
    rows = []
    for layer, record in stats.items():
        for step, mean, std, near in zip(
            record.steps, record.mean, record.std, record.near_zero, strict=True
        ):
            rows.append({"step": step, "layer": layer, "mean": mean, "std": std,
                         "near_zero": near})
    rows.sort(key=lambda row: row["step"])
    return rows


def colour_dim(record: LayerStats) -> np.ndarray:
    """log(1 + counts) with one row per bin (lowest first) and one column per recorded step."""
    return np.log1p(np.stack(record.hist, axis=1).astype(np.float64))


def _grid(n: int) -> tuple[int, int]:
    cols = n if n <= 4 else min(8, math.ceil(math.sqrt(1.5 * n)))
    return math.ceil(n / cols), cols


def plot_stats(stats: dict[str, LayerStats], out_dir: Path) -> list[Path]:
    """Write ``activation_stats.png`` and ``colour_dim.png`` into ``out_dir``; return the paths.

    - activation_stats.png: three panels (mean, std, near-zero share) against the global step,
      one line per layer.
    - colour_dim.png: per layer, fastai's "colorful dimension": the histogram of each recorded
      step as a column (steps left to right, bins from ``hist_range[0]`` at the bottom), colour
      = log(1 + count). A healthy layer shows a smooth band; a bright strip at the bottom that
      takes over means activations collapsing to zero.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = [name for name, record in stats.items() if record.steps]
    if not layers:
        raise ValueError("no activation statistics were recorded")
    written = []

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    try:
        cmap = plt.get_cmap("viridis")
        for index, name in enumerate(layers):
            record = stats[name]
            colour = cmap(index / max(len(layers) - 1, 1))
            for ax, values in zip(axes, (record.mean, record.std, record.near_zero), strict=True):
                ax.plot(record.steps, values, color=colour, lw=1.2, label=name)
        titles = ("mean", "standard deviation", "share near zero")
        for ax, title in zip(axes, titles, strict=True):
            ax.set(title=title, xlabel="step")
            ax.grid(alpha=0.3)
        axes[2].set_ylim(-0.02, 1.02)
        if len(layers) <= 12:
            axes[2].legend(fontsize=7, loc="best")
        else:
            sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, len(layers) - 1))
            fig.colorbar(sm, ax=axes, label="layer index (input to output)", fraction=0.02)
        if len(layers) <= 12:
            fig.tight_layout()
        path = out_dir / "activation_stats.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    finally:
        plt.close(fig)

    rows, cols = _grid(len(layers))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    try:
        for ax in axes.ravel()[len(layers):]:
            ax.axis("off")
        for ax, name in zip(axes.ravel(), layers, strict=False):
            record = stats[name]
            low, high = record.hist_range
            steps = record.steps
            width = (steps[-1] - steps[0]) / max(len(steps) - 1, 1) if len(steps) > 1 else 1
            ax.imshow(
                colour_dim(record), origin="lower", aspect="auto", cmap="viridis",
                extent=(steps[0] - width / 2, steps[-1] + width / 2, low, high),
            )
            ax.set_title(name, fontsize=8)
            ax.set_xlabel("step", fontsize=8)
            ax.set_ylabel("activation", fontsize=8)
            ax.tick_params(labelsize=7)
        fig.suptitle("activation histograms, log(1 + count) (colorful dimension)", fontsize=10)
        fig.tight_layout()
        path = out_dir / "colour_dim.png"
        fig.savefig(path, dpi=100)
        written.append(path)
    finally:
        plt.close(fig)
    return written
