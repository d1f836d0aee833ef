"""What does one part of the training step cost? Switch it off on every other step and compare.

    KERAS_BACKEND=torch python benchmarks/step_parts.py --part l2 --batch 128 --steps 40

Our training model for ``--net`` (params.yaml's speed settings, as benchmarks/throughput.py
builds it) trains on synthetic CIFAR-sized batches through ``fit``. After a warm-up epoch it
trains two more, with the part switched off on every other step, so that drift in the host's
speed falls on both halves alike. It prints the median step time of each half and the
difference, which is what the part costs a step.

Parts:

- ``l2``: the weights' L2 penalties (the book's ResNets put one on every kernel). Switched
  off, the regularisers are detached from the variables for that step: the loss has no
  penalty terms and the gradients no penalty gradients.

The step with the part off trains a different model, so this is a timing, not a recipe.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: tasks/ and nets/ import
sys.path.insert(0, str(ROOT / "benchmarks"))

PARTS = ("l2",)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=PARTS, default="l2")
    parser.add_argument("--net", default="resnet20_v1")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="steps per epoch")
    args = parser.parse_args(argv)

    import keras
    from throughput import ours, synthetic

    from tasks.modeling import EpochShuffledArrays

    model, resolved = ours(args.net)
    penalised = [(variable, variable.regularizer) for variable in model.trainable_weights
                 if variable.regularizer is not None]
    if not penalised:
        raise SystemExit(f"error: {args.net} has no weight penalties to switch off; "
                         "pick a net with an L2 factor (the ResNets)")

    def switch(off: bool) -> None:
        for variable, regularizer in penalised:
            variable.regularizer = None if off else regularizer

    times: dict[bool, list[float]] = {False: [], True: []}
    state = {"off": False, "counted": False, "started": 0.0}

    class Alternate(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            state["counted"] = epoch > 0

        def on_train_batch_begin(self, batch, logs=None):
            state["started"] = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            if state["counted"]:
                times[state["off"]].append(time.perf_counter() - state["started"])
            state["off"] = not state["off"]
            switch(state["off"])

    x, y = synthetic(args.batch * args.steps)
    model.fit(EpochShuffledArrays(x, y, args.batch, 0), epochs=3, verbose=0,
              callbacks=[Alternate()])
    switch(False)
    on, off = (statistics.median(times[flag]) * 1000 for flag in (False, True))
    print(f"{args.net}, batch {args.batch}, {resolved['backend']} backend, "
          f"{resolved['precision']}: {len(penalised)} penalised weights")
    print(f"  median step with {args.part}: {on:.3f} ms, without: {off:.3f} ms "
          f"({len(times[False])} and {len(times[True])} steps); {args.part} costs "
          f"{on - off:.3f} ms a step, {100 * (on - off) / on:.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
