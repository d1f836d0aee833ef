"""The book's step schedule and plateau reduction: as functions, composed, and through a real fit."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from tasks.modeling import (
    BestCheckpoint,
    LearningRateController,
    NonFiniteLossError,
    StopOnNonFinite,
    step_lr,
)

BOOK = {"base": 1e-3, "milestones": [80, 120, 160, 180], "gammas": [0.1, 0.1, 0.1, 0.5]}


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [(0, 1e-3), (79, 1e-3), (80, 1e-4), (119, 1e-4), (120, 1e-5), (160, 1e-6), (180, 0.5e-6),
     (199, 0.5e-6)],
)
def test_book_step_schedule(epoch, expected):
    assert step_lr(epoch, **BOOK) == pytest.approx(expected, rel=1e-12)


def test_plateau_reduction_never_goes_below_min_lr_but_steps_may():
    controller = LearningRateController(1e-3, [1], [1e-4], min_lr=1e-5)
    controller.plateau_scale = 1e-3  # as if reduced many times
    assert controller.lr_for(0) == pytest.approx(1e-5)  # floored by min_lr
    assert controller.lr_for(1) == pytest.approx(1e-7)  # the step alone is below min_lr


class _Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.rates = []

    def on_epoch_begin(self, epoch, logs=None):
        self.rates.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))


def _frozen_model() -> keras.Model:
    # frozen weights keep val_loss exactly constant, so the plateau logic fires on schedule
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(3, activation="softmax", trainable=False)(inputs)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def test_step_and_plateau_compose_in_a_real_fit():
    keras.utils.set_random_seed(0)
    x, y = np.random.rand(16, 4).astype("float32"), np.arange(16) % 3
    controller = LearningRateController(1.0, [3, 6], [0.1, 0.1], monitor="val_loss",
                                        factor=0.5, patience=2, min_lr=0.0)
    recorder = _Recorder()
    _frozen_model().fit(x, y, validation_data=(x, y), epochs=8, batch_size=16, verbose=0,
                        callbacks=[controller, recorder])
    # plateau after epochs 2, 4 and 6; each reduction survives the next step milestone
    # (the book's LearningRateScheduler would reset epoch 3 to 0.1 and epoch 6 to 0.01)
    expected = [1.0, 1.0, 1.0, 0.05, 0.05, 0.025, 0.0025, 0.00125]
    np.testing.assert_allclose(recorder.rates, expected, rtol=1e-6)
    assert controller.get_state()["plateau_scale"] == pytest.approx(0.125)


def test_controller_state_round_trip():
    a = LearningRateController(1.0, [3], [0.1], patience=2)
    a.plateau_scale, a.wait, a.best = 0.25, 1, 0.7
    b = LearningRateController(1.0, [3], [0.1], patience=2)
    b.set_state(a.get_state())
    assert [b.lr_for(e) for e in range(5)] == [a.lr_for(e) for e in range(5)]


def test_wrong_monitor_key_fails_loudly(tmp_path):
    x, y = np.random.rand(8, 4).astype("float32"), np.arange(8) % 3
    checkpoint = BestCheckpoint(tmp_path / "m.keras", monitor="val_acc",
                                setting="train.checkpoint_monitor")
    with pytest.raises(ValueError) as error:
        _frozen_model().fit(x, y, validation_data=(x, y), epochs=1, verbose=0,
                            callbacks=[checkpoint])
    message = str(error.value)
    assert "train.checkpoint_monitor = 'val_acc'" in message and "val_accuracy" in message
    assert not (tmp_path / "m.keras").exists()


def test_best_checkpoint_keeps_the_best_epoch(tmp_path):
    checkpoint = BestCheckpoint(tmp_path / "m.keras", monitor="val_accuracy")
    checkpoint.set_model(_frozen_model())
    for epoch, accuracy in enumerate([0.2, 0.5, 0.4, 0.5]):
        checkpoint.on_epoch_end(epoch, {"val_accuracy": accuracy})
    assert (checkpoint.best, checkpoint.best_epoch) == (0.5, 1)
    assert (tmp_path / "m.keras").exists()


def test_non_finite_loss_raises():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer="sgd", loss="mse")
    x = np.full((4, 4), np.nan, "float32")
    with pytest.raises(NonFiniteLossError, match="learning_rate"):
        model.fit(x, np.zeros((4, 1)), epochs=1, verbose=0, callbacks=[StopOnNonFinite()])
    assert math.isnan(float(np.asarray(model.predict(x, verbose=0))[0, 0]))


def test_warmup_then_step_schedule():
    controller = LearningRateController(0.1, [2], [0.1], warmup_epochs=1, warmup_lr=0.01)
    assert [controller.lr_for(e) for e in range(4)] == pytest.approx([0.01, 0.1, 0.01, 0.01])
