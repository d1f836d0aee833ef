"""The train stage's callbacks leave Keras' asynchronous callback dispatch on (JAX and torch).

A callback with its own per-batch end hook makes Keras wait for every batch's loss on the host
before the next batch is sent, unless it declares ``async_safe``. On a GPU that wait is a gap
between every two steps (benchmarks/train_stage.py measures it). These tests run under the JAX
backend in a subprocess (Keras picks its backend at import; TensorFlow's is never
asynchronous) and check that the dispatch stays asynchronous with the callbacks the train
stage uses, and that the callbacks still do their work there: a NaN loss still stops ``fit``
with NonFiniteLossError, and activation statistics are still taken after exactly the batches
they name, with the model state of that moment.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT, stage_environment

SCRIPT = r"""
import json
import numpy as np
import keras
from keras.src.callbacks.callback_list import CallbackList
from tasks.activations import ActivationStats
from tasks.modeling import LearningRateController, StopOnNonFinite, BestCheckpoint, EpochRates
from tasks.resume import EpochSeed
from tasks.schedules import OneCycle

out = {"backend": keras.backend.backend()}

def tiny():
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(4, 3, name="conv1")(inputs)
    x = keras.layers.Activation("relu", name="relu1")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", name="out")(x))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    return model

def dispatch(callbacks):
    return CallbackList(callbacks, model=tiny())._async_train

stage = [EpochSeed(0), LearningRateController(0.1, monitor=None), EpochRates(),
         BestCheckpoint("/tmp/unused.keras", "loss", "m"), StopOnNonFinite()]
out["stage"] = dispatch(stage)
out["stage+activations"] = dispatch(stage + [ActivationStats(np.zeros((2, 6, 6, 2)))])
out["one_cycle"] = dispatch([OneCycle(0.1, total_steps=10), StopOnNonFinite()])

class BatchHook(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        pass

out["with a plain batch hook"] = dispatch(stage + [BatchHook()])

# NaN input: the error still reaches fit
model = tiny()
try:
    model.fit(np.full((16, 6, 6, 2), np.nan, "float32"), np.zeros(16), batch_size=4, epochs=1,
              verbose=0, callbacks=[StopOnNonFinite()])
    out["nan"] = "no error"
except Exception as error:
    out["nan"] = type(error).__name__

# activation statistics: record after each batch, compare against the weights of that moment
rng = np.random.default_rng(0)
x = rng.normal(size=(24, 6, 6, 2)).astype("float32")
y = rng.integers(0, 3, 24)
sample = x[:4]
keras.utils.set_random_seed(0)
model = tiny()
snapshots = []

class Snapshot(keras.callbacks.Callback):
    # reads weights at batch begin (main thread, no effect on async dispatch): the weights
    # after batch b-1; the last batch's after fit returns
    def on_train_batch_begin(self, batch, logs=None):
        snapshots.append([np.array(w) for w in self.model.get_weights()])

stats = ActivationStats(sample, layer_names=["relu1"], every=2)
model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0, callbacks=[Snapshot(), stats])
snapshots.append([np.array(w) for w in model.get_weights()])
record = stats.stats["relu1"]
out["steps"] = record.steps
probe = keras.Model(model.input, model.get_layer("relu1").output)
expected = []
for step in record.steps:
    model.set_weights(snapshots[step + 1])  # the state after batch `step`
    expected.append(float(np.mean(np.asarray(probe(sample, training=False)))))
out["means"] = record.mean
out["expected"] = expected
print("RESULT " + json.dumps(out))
"""


def test_stage_callbacks_keep_dispatch_asynchronous_and_still_work():
    env = {**stage_environment(), "KERAS_BACKEND": "jax"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-2000:] + done.stderr[-3000:]
    out = json.loads(lines[-1][7:])
    assert out["backend"] == "jax"
    assert out["stage"] is True
    assert out["stage+activations"] is True
    assert out["one_cycle"] is True
    assert out["with a plain batch hook"] is False  # what the flag protects against
    assert out["nan"] == "NonFiniteLossError"
    assert out["steps"] == [0, 2, 4, 6, 8, 10]  # 6 batches an epoch, 2 epochs, every 2
    assert len(out["means"]) == len(out["expected"])
    for got, want in zip(out["means"], out["expected"], strict=True):
        assert abs(got - want) <= 1e-5 * max(1.0, abs(want)), (out["means"], out["expected"])
