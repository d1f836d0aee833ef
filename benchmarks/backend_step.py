"""Time building each net and one training step on 2 images, under the backend Keras was set to.

    KERAS_BACKEND=jax python benchmarks/backend_step.py jit mnist_cnn resnet20_v1
    KERAS_BACKEND=tensorflow python benchmarks/backend_step.py eager resnet56_v2

The first step includes tracing and compilation (XLA with "jit"), which is what a test that
trains one step pays; the ratio printed is the step time over the build time of the same net.
"""

from __future__ import annotations

import sys
import time

import keras
import numpy as np

import nets
from tasks.modeling import build_training_model


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("eager", "jit"):
        print(__doc__)
        return 2
    mode, names = argv[0], argv[1:]
    print(f"backend {keras.backend.backend()}, mode {mode}")
    for name in names:
        started = time.perf_counter()
        entry = nets.get_entry(name)
        shape = entry.input_shape
        model = build_training_model(nets.create_model(name), np.zeros(shape, "float32"),
                                     np.ones(shape, "float32"), shift=0.1, flip=True, seed=0)
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                      run_eagerly=mode == "eager")
        x = np.random.default_rng(0).integers(0, 256, (2, *shape), dtype=np.uint8)
        y = np.arange(2) % entry.num_classes
        built = time.perf_counter()
        model.train_on_batch(x, y)
        done = time.perf_counter()
        print(f"{name:<22} build {built - started:6.1f} s  first step {done - built:6.1f} s  "
              f"step/build {(done - built) / (built - started):5.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
