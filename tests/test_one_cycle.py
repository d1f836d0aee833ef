"""1cycle: the schedules as pure functions, and what a real fit actually applies."""

from __future__ import annotations

import math

import keras
import matplotlib.pyplot as plt
import numpy as np
import pytest

from tasks.schedules import (
    CyclicAdam,
    CyclicSGD,
    OneCycle,
    cos_anneal,
    one_cycle_lr,
    one_cycle_momentum,
    plot_schedule,
    schedule_rows,
    with_cyclic_momentum,
)

LR_MAX = 0.1
EPOCHS, STEPS = 3, 4


def test_cos_anneal_ends_and_middle():
    assert cos_anneal(1.0, 3.0, 0.0) == pytest.approx(1.0)
    assert cos_anneal(1.0, 3.0, 0.5) == pytest.approx(2.0)
    assert cos_anneal(1.0, 3.0, 1.0) == pytest.approx(3.0)


def test_one_cycle_lr_defaults_at_the_corners():
    # fastai's defaults: start at lr_max / 25, peak at 25 % of training, end at lr_max / 1e5
    assert one_cycle_lr(0.0, LR_MAX) == pytest.approx(LR_MAX / 25)
    assert one_cycle_lr(0.25, LR_MAX) == pytest.approx(LR_MAX)
    assert one_cycle_lr(1.0, LR_MAX) == pytest.approx(LR_MAX / 1e5)
    assert one_cycle_lr(0.3, LR_MAX, div=10, div_final=100, pct_start=0.3) == pytest.approx(LR_MAX)
    assert one_cycle_lr(1.0, LR_MAX, div=10, div_final=100, pct_start=0.3) == pytest.approx(1e-3)
    # cosine, not linear: halfway through the warm-up is the mean of its two ends
    assert one_cycle_lr(0.125, LR_MAX) == pytest.approx((LR_MAX / 25 + LR_MAX) / 2)


def test_one_cycle_momentum_defaults_at_the_corners():
    assert one_cycle_momentum(0.0) == pytest.approx(0.95)
    assert one_cycle_momentum(0.25) == pytest.approx(0.85)
    assert one_cycle_momentum(1.0) == pytest.approx(0.95)
    assert one_cycle_momentum(0.5, (0.9, 0.8, 0.7), pct_start=0.5) == pytest.approx(0.8)
    assert one_cycle_momentum(1.0, (0.9, 0.8, 0.7), pct_start=0.5) == pytest.approx(0.7)


def test_monotone_in_each_phase():
    warm = np.linspace(0.0, 0.25, 51)
    anneal = np.linspace(0.25, 1.0, 151)
    lr_warm = [one_cycle_lr(p, LR_MAX) for p in warm]
    lr_anneal = [one_cycle_lr(p, LR_MAX) for p in anneal]
    mom_warm = [one_cycle_momentum(p) for p in warm]
    mom_anneal = [one_cycle_momentum(p) for p in anneal]
    assert np.all(np.diff(lr_warm) > 0) and np.all(np.diff(lr_anneal) < 0)
    assert np.all(np.diff(mom_warm) < 0) and np.all(np.diff(mom_anneal) > 0)
    assert max(lr_warm + lr_anneal) == pytest.approx(LR_MAX)


def test_edge_phases_and_clipping():
    assert one_cycle_lr(0.0, LR_MAX, pct_start=0.0) == pytest.approx(LR_MAX)
    assert one_cycle_lr(1.0, LR_MAX, pct_start=1.0) == pytest.approx(LR_MAX)
    assert one_cycle_lr(1.5, LR_MAX) == pytest.approx(LR_MAX / 1e5)
    with pytest.raises(ValueError):
        one_cycle_lr(0.5, LR_MAX, pct_start=1.5)


def _gradient_one(y_true, y_pred):
    # d(loss)/d(bias) = 1 on every step, whatever the weights: updates are easy to replay
    return y_pred[:, 0]


def _line_model(optimizer, jit_compile: bool = True) -> keras.Model:
    # compiled as in training: under JAX, jit_compile=False would run the update eagerly
    inputs = keras.Input((1,))
    model = keras.Model(inputs, keras.layers.Dense(1, kernel_initializer="zeros")(inputs))
    model.compile(optimizer=optimizer, loss=_gradient_one, jit_compile=jit_compile)
    return model


class _ReadBack(keras.callbacks.Callback):
    """The optimizer's learning rate and momentum as each batch starts (after OneCycle set them)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_batch_begin(self, batch, logs=None):
        optimizer = self.model.optimizer
        self.seen.append((
            float(optimizer.learning_rate.numpy()),
            float(optimizer.cyclic_momentum.numpy()),
        ))


def _data(n: int):
    return np.ones((n, 1), "float32"), np.zeros((n, 1), "float32")


def test_a_real_sgd_fit_applies_the_schedule():
    keras.utils.set_random_seed(0)
    model = _line_model(with_cyclic_momentum(keras.optimizers.SGD(0.01, momentum=0.9)))
    assert isinstance(model.optimizer, CyclicSGD)
    one_cycle, read_back = OneCycle(LR_MAX), _ReadBack()
    x, y = _data(STEPS * 3)
    history = model.fit(x, y, batch_size=3, epochs=EPOCHS, verbose=0,
                        callbacks=[one_cycle, read_back])
    total = EPOCHS * STEPS
    expected = [(one_cycle_lr(s / total, LR_MAX), one_cycle_momentum(s / total))
                for s in range(total)]
    np.testing.assert_allclose(read_back.seen, expected, rtol=1e-6)
    assert [step for step, _, _ in one_cycle.history] == list(range(total))
    np.testing.assert_allclose([(lr, m) for _, lr, m in one_cycle.history], expected, rtol=1e-12)
    # the momentum really enters the update: replay SGD on the constant gradient 1
    velocity = bias = 0.0
    for _, lr, momentum in one_cycle.history:
        velocity = momentum * velocity - lr
        bias += velocity
    assert float(model.layers[1].bias.numpy()[0]) == pytest.approx(bias, rel=1e-5)
    assert history.history["learning_rate"][-1] == pytest.approx(expected[-1][0])
    assert history.history["momentum"][-1] == pytest.approx(expected[-1][1])


def test_a_real_adam_fit_cycles_beta_1():
    model = _line_model(with_cyclic_momentum(keras.optimizers.Adam(1e-3)))
    assert isinstance(model.optimizer, CyclicAdam)
    assert model.optimizer.beta_1 is model.optimizer.cyclic_momentum
    one_cycle, read_back = OneCycle(LR_MAX, moms=(0.9, 0.8, 0.9)), _ReadBack()
    model.fit(*_data(STEPS), batch_size=1, epochs=2, verbose=0, callbacks=[one_cycle, read_back])
    total = 2 * STEPS
    expected = [(one_cycle_lr(s / total, LR_MAX), one_cycle_momentum(s / total, (0.9, 0.8, 0.9)))
                for s in range(total)]
    np.testing.assert_allclose(read_back.seen, expected, rtol=1e-6)
    assert model.optimizer.get_config()["beta_1"] == 0.9  # a float: the model stays saveable


def test_stock_sgd_bakes_its_momentum_which_is_why_cyclic_sgd_exists():
    class SetMomentumToZero(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.model.optimizer.momentum = 0.0 if batch else 0.9

    model = _line_model(keras.optimizers.SGD(1.0, momentum=0.9))
    model.fit(*_data(2), batch_size=1, epochs=1, verbose=0, callbacks=[SetMomentumToZero()])
    # step 1: v = -1, b = -1; step 2 with momentum 0.9: v = -1.9, b = -2.9 (with 0: b = -2)
    assert float(model.layers[1].bias.numpy()[0]) == pytest.approx(-2.9)
    with pytest.raises(TypeError, match="with_cyclic_momentum"):
        _line_model(keras.optimizers.SGD(0.1, momentum=0.9)).fit(
            *_data(2), epochs=1, verbose=0, callbacks=[OneCycle(LR_MAX)])


def test_learning_rate_only_on_a_stock_optimizer():
    model = _line_model(keras.optimizers.SGD(0.1))
    one_cycle = OneCycle(LR_MAX, moms=None)
    model.fit(*_data(STEPS), batch_size=1, epochs=1, verbose=0, callbacks=[one_cycle])
    assert [m for _, _, m in one_cycle.history] == [None] * STEPS
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(
        one_cycle_lr(3 / 4, LR_MAX), rel=1e-6)
    assert "momentum" not in schedule_rows(one_cycle.history)[0]


def test_resume_continues_the_schedule():
    total = EPOCHS * STEPS
    model = _line_model(with_cyclic_momentum(keras.optimizers.SGD(0.1, momentum=0.9)))
    by_epoch = OneCycle(LR_MAX)
    model.fit(*_data(STEPS), batch_size=1, epochs=EPOCHS, initial_epoch=1, verbose=0,
              callbacks=[by_epoch])
    assert [s for s, _, _ in by_epoch.history] == list(range(STEPS, total))
    by_step = OneCycle(LR_MAX, total_steps=total, initial_step=6)
    model.fit(*_data(STEPS), batch_size=1, epochs=1, verbose=0, callbacks=[by_step])
    assert [s for s, _, _ in by_step.history] == [6, 7, 8, 9]
    assert by_step.history[0][1] == pytest.approx(one_cycle_lr(6 / total, LR_MAX))


def test_cyclic_optimizer_round_trips_through_save(tmp_path):
    inputs = keras.Input((1,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.compile(optimizer=with_cyclic_momentum(keras.optimizers.SGD(0.1, momentum=0.9,
                                                                      nesterov=True)),
                  loss="mse", jit_compile=False)
    model.fit(*_data(STEPS), batch_size=1, epochs=1, verbose=0, callbacks=[OneCycle(LR_MAX)])
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.optimizer, CyclicSGD) and loaded.optimizer.nesterov
    assert loaded.optimizer.get_config()["momentum"] == 0.9
    assert float(loaded.optimizer.cyclic_momentum.numpy()) == pytest.approx(
        float(model.optimizer.cyclic_momentum.numpy()))


def test_invalid_setups_fail_loudly():
    with pytest.raises(ValueError, match="momentum > 0"):
        with_cyclic_momentum(keras.optimizers.SGD(0.1))
    with pytest.raises(TypeError, match="RMSprop"):
        with_cyclic_momentum(keras.optimizers.RMSprop(0.1))
    with pytest.raises(ValueError):
        OneCycle(LR_MAX, moms=(0.9, 0.8))


def test_rows_and_plot(tmp_path):
    history = [(s, one_cycle_lr(s / 20, LR_MAX), one_cycle_momentum(s / 20)) for s in range(20)]
    rows = schedule_rows(history)
    assert rows[5] == {"step": 5, "learning_rate": history[5][1], "momentum": history[5][2]}
    path = plot_schedule(history, tmp_path / "plots" / "schedule.png")
    assert path.exists() and path.stat().st_size > 1000
    assert plt.get_fignums() == []
    assert not math.isnan(rows[-1]["learning_rate"])
