"""tasks/torch_kernels.py: under Keras' torch backend, the copy-free convolution and the fused
batch norm compute what Keras' own kernels compute: outputs, gradients, moving statistics and a
few training steps of a real net, with every activation kept channels-last, eagerly and under
``jit_compile``. Runs in subprocesses (Keras picks its backend at import); needs torch
(``pip install -e .[benchmark]``)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tasks import torch_kernels
from tests.conftest import ROOT, stage_environment

LAYERS = r"""
import json, sys
import numpy as np
import keras, torch
from tasks import torch_kernels

def make():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((9, 10, 3))
    # biases that are not zero, so that the moving means show where each one went
    bias = {"bias_initializer": "random_normal"}
    x = keras.layers.Conv2D(8, 3, padding="same", **bias)(inputs)     # symmetric padding
    x = keras.layers.BatchNormalization(momentum=0.9)(x)
    x = keras.layers.Conv2D(6, 3, strides=2, padding="same", **bias)(x)  # asymmetric padding
    x = keras.layers.BatchNormalization(center=False, epsilon=1e-3)(x)
    x = keras.layers.Conv2D(5, 1, strides=2, padding="valid", dilation_rate=1, **bias)(x)
    x = keras.layers.BatchNormalization(scale=False)(x)
    x = keras.layers.Conv2D(4, 2, padding="valid", use_bias=False)(x)
    x = keras.layers.Conv2D(3, 1)(x)  # a bias with a gradient: no batch norm after it
    return keras.Model(inputs, keras.layers.Flatten()(x))

# a batch whose memory is not NHWC (height and width swapped), as a flip or crop can leave it
x = torch.from_numpy(np.random.default_rng(0).standard_normal((4, 10, 9, 3)).astype("float32"))
x = x.transpose(1, 2)

def layouts():  # whether each layer's training output is NHWC in memory (channels-last)
    model = make()
    found, h = [], x
    for layer in model.layers[1:-1]:
        h = layer(h, training=True)
        found.append(bool(h.is_contiguous()))
    return found

def nodes(tensor):  # the autograd graph's node names, by count
    seen, found, todo = set(), {}, [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        found[type(node).__name__] = found.get(type(node).__name__, 0) + 1
        todo.extend(next_node for next_node, _ in node.next_functions)
    return found

def run():
    model = make()
    out = model(x, training=True)
    graph = nodes(out)
    (out ** 2).sum().backward()
    inference = model(x, training=False)
    return {"out": out.detach().tolist(), "inference": inference.detach().tolist(),
            "convolutions": {name: count for name, count in graph.items() if "Conv" in name},
            "bias_nodes": {name: graph.get(name, 0) for name in (
                "AddBackward0", "MulBackward0", "ZeroGradientsBackward")},
            "grads": [w.value.grad.tolist() for w in model.trainable_weights],
            "zero_bias_grads": [bool((w.value.grad == 0).all())
                                for w in model.trainable_weights if w.name == "bias"],
            "stats": [w.numpy().tolist() for w in model.non_trainable_weights]}

keras_own = run()
installed = torch_kernels.install()
print("RESULTS " + json.dumps({"installed": installed, "keras": keras_own, "fused": run(),
                               "layouts": layouts()}))
"""

TRAINING = r"""
import json, sys
import numpy as np
import keras
import nets
from tasks.config import SpeedParams
from tasks.modeling import EpochShuffledArrays, build_training_model
from tasks.speed import apply, compile_options

mode = sys.argv[1]  # fused | plain | fused+jit
precision = sys.argv[2] if len(sys.argv) > 2 else "float32"  # not "auto": the same on any CPU
resolved = apply(SpeedParams(jit_compile=mode.endswith("jit"), fused_kernels=mode != "plain",
                             precision=precision))
keras.utils.set_random_seed(0)
net = nets.create_model("resnet20_v1")
model = build_training_model(net, np.full((32, 32, 3), 120.0, "float32"),
                             np.full((32, 32, 3), 60.0, "float32"), flip=True, crop_pad=4,
                             seed=0)  # the ResNet papers' augmentation, as params.yaml sets it
model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
              **compile_options(resolved))
rng = np.random.default_rng(0)
x = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
y = rng.integers(0, 10, 16)
# two epochs of two batches through fit, as the train stage runs them
history = model.fit(EpochShuffledArrays(x, y, 8, 0), epochs=2, verbose=0, shuffle=False)
losses = history.history["loss"]
print("RESULTS " + json.dumps({"resolved": resolved, "losses": losses,
                               "probabilities": model.predict(x, verbose=0).tolist()}))
"""


# the start of a script that counts which layers go through Layer.__call__
COUNTING_CALLS = r"""
import collections, json
import numpy as np
import keras, torch
from keras.src.layers.layer import Layer
from tasks import torch_kernels

calls = collections.Counter()  # which layers went through Layer.__call__
keras_call = Layer.__call__
def counting_call(self, *args, **kwargs):
    calls[type(self).__name__] += 1
    return keras_call(self, *args, **kwargs)
Layer.__call__ = counting_call
"""

DIRECT = COUNTING_CALLS + r"""

def make():
    keras.utils.set_random_seed(3)
    block_in = keras.Input((6, 6, 4))
    a = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(block_in)
    a = keras.layers.BatchNormalization(momentum=0.5, gamma_initializer="random_normal",
                                        beta_initializer="random_normal")(a)
    a = keras.layers.Activation("relu")(a)
    block = keras.Model(block_in, keras.layers.Add()([block_in, a]), name="block")  # nested
    inputs = keras.Input((6, 6, 3))
    # L2 penalties with two factors, and an L1 one that Keras computes
    x = keras.layers.Conv2D(4, 1, kernel_regularizer=keras.regularizers.L2(0.01),
                            bias_regularizer=keras.regularizers.L1(0.02))(inputs)
    x = block(x)
    shared = keras.layers.BatchNormalization(momentum=0.7, beta_initializer="random_normal")
    x = shared(keras.layers.Activation("relu")(shared(x)))  # one layer, two moving updates
    x = keras.layers.ZeroPadding2D(((1, 0), (0, 1)))(x)  # 7 x 7
    # TensorFlow's asymmetric "same" at stride 2, and a ReLU inside the convolution
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu",
                            kernel_regularizer=keras.regularizers.L2(0.03))(x)
    x = keras.layers.ReLU(max_value=0.5)(x)  # a clipped ReLU: its own call, in Keras' layout
    x = keras.layers.MaxPooling2D(2, strides=1)(x)
    x = keras.layers.BatchNormalization(scale=False, beta_initializer="random_normal")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.AveragePooling2D(2, strides=1)(x)
    # an activity regulariser adds a loss in Layer.__call__: this layer must keep it
    y = keras.layers.Conv2D(2, 1, activity_regularizer=keras.regularizers.L2(0.1))(x)
    x = keras.layers.Concatenate()([x, y])  # a list argument
    x = keras.layers.Dropout(0.5)(x)        # needs the training flag
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(5, dtype="mixed_bfloat16")(x)  # another policy: Keras' call
    # a bfloat16 input that Layer.__call__ casts to float32: Keras' call too
    outputs = keras.layers.Dense(3, activation="softmax")(x)
    return keras.Model(inputs, outputs)

def chain():  # plain layers only, as in the nets: three convolutions
    keras.utils.set_random_seed(4)
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Activation("relu")(x)
    y = keras.layers.Conv2D(4, 3, padding="same")(x)
    y = keras.layers.BatchNormalization()(y)
    x = keras.layers.Activation("relu")(keras.layers.Add()([x, y]))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same")(x)
    x = keras.layers.AveragePooling2D(4)(x)
    return keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(x)))

def pixels():  # the train stage's input: raw pixels, scaled, normalised, shifted and flipped
    from tasks.modeling import build_training_model
    keras.utils.set_random_seed(5)
    inputs = keras.Input((8, 8, 3))
    net = keras.Model(inputs, keras.layers.Conv2D(2, 3)(inputs))
    return build_training_model(net, np.full((8, 8, 3), 0.4, "float32"),
                                np.full((8, 8, 3), 0.3, "float32"), flip=True, crop_pad=2,
                                seed=6)

def alive_at_pooling():
    # how many batch-norm outputs of a chain() training call are still referenced when its
    # pooling runs: none should be, as each one's last reader (a ReLU, an Add) ran before
    import weakref
    outputs, alive = [], []
    keras_batch_norm, keras_pool = torch.native_batch_norm, torch.nn.functional.avg_pool2d
    def batch_norm(*args, **kwargs):
        result = keras_batch_norm(*args, **kwargs)
        outputs.append(weakref.ref(result[0]))
        return result
    def pool(*args, **kwargs):
        alive.append(sum(ref() is not None for ref in outputs))
        return keras_pool(*args, **kwargs)
    torch.native_batch_norm, torch.nn.functional.avg_pool2d = batch_norm, pool
    try:
        chain()(x.repeat(1, 2, 2, 1)[:, :8, :8], training=True)
    finally:
        torch.native_batch_norm, torch.nn.functional.avg_pool2d = keras_batch_norm, keras_pool
    return {"batch_norms": len(outputs), "alive": alive}

def reads():  # tensors a layer must not overwrite
    keras.utils.set_random_seed(7)
    inputs = keras.Input((6, 6, 3))
    b = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3, padding="same")(inputs))
    r = keras.layers.ReLU()(b)  # b is read twice
    r = keras.layers.ReLU()(keras.layers.ReLU()(keras.layers.Add()([b, r])))  # a ReLU's output
    c = keras.layers.BatchNormalization()(r)  # a model output, read by one ReLU too
    # a convolution with its ReLU inside, read by one addition
    d = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(keras.layers.ReLU()(c))
    return keras.Model(inputs, [keras.layers.BatchNormalization()(keras.layers.Add()([d, r])), c])

class Overwrites(torch.overrides.TorchFunctionMode):  # the ReLUs and sums, in place or not
    def __init__(self):
        super().__init__()
        self.found = collections.Counter()
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        # of activations only: not a Dense bias, nor a batch norm's per-channel vectors
        if name in ("relu", "relu_", "add", "add_") and getattr(args[0], "ndim", 0) == 4:
            self.found[name] += 1
        return func(*args, **(kwargs or {}))

def overwrites(model, batch):
    with Overwrites() as mode:
        out = model(batch, training=True)
    return out, dict(mode.found)

def permutes(out):  # PermuteBackward nodes in the autograd graph of a training call
    found, seen, stack = 0, set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            found += type(node).__name__ == "PermuteBackward0"
            stack.extend(next_node for next_node, _ in node.next_functions)
    return found

x = torch.from_numpy(np.random.default_rng(0).standard_normal((4, 6, 6, 3)).astype("float32"))

raw = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8))

def run():
    chain_permutes = permutes(chain()(x.repeat(1, 2, 2, 1)[:, :8, :8], training=True))
    augmenting = pixels()
    calls.clear()
    augmented = augmenting(raw, training=True)
    pixel_calls = dict(calls)
    model = make()
    calls.clear()
    out = model(x, training=True)
    train_calls = dict(calls)
    losses = [float(loss) for loss in model.losses]
    ((out ** 2).sum() + sum(model.losses)).backward()
    calls.clear()
    inference = model(x, training=False)
    inference_calls = dict(calls)
    reading = reads()
    read_out, read_ops = overwrites(reading, x)
    # weighted sums: the sum of squares of a batch norm's output hardly depends on its input
    sum(((out * torch.linspace(-1.0, 2.0, out.numel()).view(out.shape)).sum()
         for out in read_out)).backward()
    chain_ops = overwrites(chain(), x.repeat(1, 2, 2, 1)[:, :8, :8])[1]
    calls.clear()
    unflagged = model(x)  # no training flag: Keras' own walk
    return {"out": out.detach().tolist(), "inference": inference.detach().tolist(),
            "unflagged": unflagged.detach().tolist(), "losses": losses,
            "grads": [w.value.grad.tolist() for w in model.trainable_weights],
            "zero_bias_grads": [bool((w.value.grad == 0).all())
                                for w in model.trainable_weights if w.name == "bias"],
            "stats": [w.numpy().tolist() for w in model.non_trainable_weights],
            "train_calls": train_calls, "inference_calls": inference_calls,
            "chain_permutes": chain_permutes, "augmented": augmented.detach().tolist(),
            "pixel_calls": pixel_calls, "read_ops": read_ops, "chain_ops": chain_ops,
            "read_out": [out.detach().tolist() for out in read_out],
            "read_grads": [w.value.grad.tolist() for w in reading.trainable_weights],
            "unflagged_calls": dict(calls)}

keras_own = run()
installed = torch_kernels.install()
print("RESULTS " + json.dumps({"installed": installed, "keras": keras_own, "direct": run(),
                               "alive_at_pooling": alive_at_pooling()}))
"""


ADAM = r"""
import json
import numpy as np
import keras, torch
from tasks import torch_kernels

SHAPES = [(3, 3, 4, 8), (8,), (6, 5), (7,)]

def train(make_optimizer, steps=30, transposed=False):
    rng = np.random.default_rng(0)
    weights = [keras.Variable(rng.standard_normal(s).astype("float32")) for s in SHAPES]
    if transposed:  # a weight whose memory is not contiguous: the fused kernel reads raw memory
        weights[2]._value.data = weights[2]._value.data.t().contiguous().t()
    optimizer = make_optimizer()
    for step in range(steps):
        grads = [torch.from_numpy(np.random.default_rng(step * 10 + i).standard_normal(s)
                                  .astype("float32")) for i, s in enumerate(SHAPES)]
        grads[1] = grads[1].reshape(2, 4).t().reshape(8)  # a non-contiguous gradient
        grads[2] = grads[2].t().contiguous().t()
        optimizer.apply(grads, weights)
    return {"weights": [w.numpy().tolist() for w in weights],
            "slots": [v.numpy().tolist() for v in optimizer.variables]}

decay = keras.optimizers.schedules.ExponentialDecay(1e-2, decay_steps=5, decay_rate=0.5)
CASES = {
    "adam": lambda: keras.optimizers.Adam(1e-2),
    "adam_schedule_eps": lambda: keras.optimizers.Adam(decay, beta_1=0.8, epsilon=1e-3),
    "adamw_clipped": lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.1, clipnorm=1.0),
    "amsgrad": lambda: keras.optimizers.Adam(1e-2, amsgrad=True),
}
keras_own = {name: train(make) for name, make in CASES.items()}
keras_own["transposed"] = train(CASES["adam"], transposed=True)
calls = []
kernel = torch._fused_adam_
def counting(*args, **kwargs):
    calls.append(len(args[0]))
    return kernel(*args, **kwargs)
torch._fused_adam_ = counting
installed = torch_kernels.install()
fused, used = {}, {}
for name, make in [*CASES.items(), ("transposed", CASES["adam"])]:
    calls.clear()
    fused[name] = train(make, transposed=name == "transposed")
    used[name] = list(calls)
print("RESULTS " + json.dumps({"installed": installed, "keras": keras_own, "fused": fused,
                               "used": used}))
"""


TRAIN_STEP = r"""
import json
import numpy as np, keras, torch
from keras.src.backend.torch.trainer import TorchTrainer
from keras.src.layers.layer import Layer
from tasks import torch_kernels

keras_step = TorchTrainer.train_step
assert torch_kernels.install()
walks = []
listing = Layer.trainable_weights.fget

def counted(self):
    walks.append(self.name)
    return listing(self)

Layer.trainable_weights = property(counted)

def train(step):
    # L2 penalties on two kernels, a frozen layer and a metric: every part of Keras' step
    keras.utils.set_random_seed(3)
    l2 = keras.regularizers.L2(1e-2)
    inputs = keras.Input((4, 4, 2))
    x = keras.layers.Conv2D(3, 3, padding="same", kernel_regularizer=l2)(inputs)
    x = keras.layers.BatchNormalization()(x)
    frozen = keras.layers.Dense(3)
    frozen.trainable = False
    x = frozen(keras.layers.Flatten()(x))
    outputs = keras.layers.Dense(2, activation="softmax", kernel_regularizer=l2)(x)
    model = keras.Model(inputs, outputs, name="net")
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    type(model).train_step = step
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 4, 4, 2)).astype("float32")
    y = rng.integers(0, 2, 12)
    walks.clear()
    history = model.fit(x, y, batch_size=4, epochs=2, verbose=0, shuffle=False)
    return {"weights": [w.tolist() for w in model.get_weights()],
            "history": history.history, "model_walks": walks.count("net")}

try:
    fused = train(torch_kernels_step := TorchTrainer.train_step)
    keras_own = train(keras_step)
finally:
    TorchTrainer.train_step = torch_kernels_step
print("RESULTS " + json.dumps({"fused": fused, "keras": keras_own,
                               "replaced": torch_kernels_step is not keras_step}))
"""


LOSS_WALKS = r"""
import gc, json
import numpy as np, keras, torch
from keras.src.layers.layer import Layer
from tasks import torch_kernels

names = ("add_loss", "_clear_losses", "losses")
keras_own = {name: Layer.__dict__[name] for name in names}
assert torch_kernels.install()
fused = {name: Layer.__dict__[name] for name in names}
gathered, cleared, depth = [], [], [0]
keras_gather = Layer._get_own_losses

def gather(self):  # a layer visited by Keras' walk that gathers added losses
    gathered.append(self.name)
    return keras_gather(self)

Layer._get_own_losses = gather
rng = np.random.default_rng(0)
x = rng.standard_normal((12, 4, 4, 2)).astype("float32")
y = rng.integers(0, 2, 12)

def make(active):
    keras.utils.set_random_seed(5)
    l2 = keras.regularizers.L2(1e-2)
    inputs = keras.Input((4, 4, 2))
    h = keras.layers.Conv2D(3, 3, padding="same", kernel_regularizer=l2)(inputs)
    h = keras.layers.BatchNormalization()(h)
    # an activity regulariser adds a loss on every call (through add_loss)
    h = keras.layers.Dense(3, activity_regularizer=keras.regularizers.L1(1e-2) if active
                           else None)(keras.layers.Flatten()(h))
    outputs = keras.layers.Dense(2, activation="softmax", kernel_regularizer=l2)(h)
    model = keras.Model(inputs, outputs, name="net")
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy")
    return model

def run(mode, active):
    for name in names:
        setattr(Layer, name, (fused if mode == "fused" else keras_own)[name])
    clear = Layer._clear_losses

    def counted(self):  # a layer's losses cleared from a clearing of its parent's
        nested = depth[0] > 0
        cleared.append(nested)
        depth[0] += 1
        try:
            return clear(self)
        finally:
            depth[0] -= 1

    Layer._clear_losses = counted
    gathered.clear(), cleared.clear()
    model = make(active)
    history = model.fit(x, y, batch_size=4, epochs=2, verbose=0, shuffle=False).history
    out = {"history": history, "weights": [w.tolist() for w in model.get_weights()],
           "gathered": len(gathered), "cleared": len(cleared),
           "cleared_nested": sum(cleared)}
    model(x[:4], training=True)
    model(x[:4], training=True)  # the second call's losses replace the first's
    out["losses"] = [float(loss) for loss in model.losses]
    values = [v.value for v in model.trainable_variables]
    others = [v.value for v in model.non_trainable_variables]
    _, _, added = model.stateless_call(values, others, x[:4], training=True, return_losses=True)
    out["stateless"] = [float(loss) for loss in added]
    del model
    gc.collect()
    return out

results = {mode: {kind: run(mode, kind == "active") for kind in ("plain", "active")}
           for mode in ("fused", "keras")}
results["fused"]["plain_again"] = run("fused", False)  # once the active model is gone
print("RESULTS " + json.dumps(results))
"""


SEEDS = r"""
import json
import keras, torch
from keras.src.random.seed_generator import SeedGenerator
from tasks import torch_kernels

calls = []
keras_next = SeedGenerator.next

def counted(self, ordered=True):
    calls.append(self.name)
    return keras_next(self, ordered)

SeedGenerator.next = counted

def draws():
    calls.clear()
    seeds = [SeedGenerator(7, name="a"), SeedGenerator(2**31 - 1, name="b")]
    out = []
    for seed in seeds:
        for _ in range(3):  # the flip's, then the two shifts' draws of a training step
            out.append(keras.random.uniform((4, 1, 1, 1), seed=seed).tolist())
            out.append(keras.random.randint((3,), 0, 9, seed=seed).tolist())
            out.append(keras.random.normal((2,), seed=seed).tolist())
    # in a stateless scope the new state is collected, not written
    with keras.StatelessScope() as scope:
        out.append(keras.random.randint((3,), 0, 9, seed=seeds[0]).tolist())
        collected = scope.get_current_value(seeds[0].state).tolist()
    return {"draws": out, "states": [seed.state.value.tolist() for seed in seeds],
            "collected": collected, "keras_calls": len(calls)}

keras_own = draws()
torch_kernels.install()
print("RESULTS " + json.dumps({"keras": keras_own, "fused": draws()}))
"""


NESTED = r"""
import json, sys
import numpy as np, keras, torch
from keras.src.layers.layer import Layer
from tasks import torch_kernels

calls = []
keras_call = Layer.__call__

def counted(self, *args, **kwargs):
    calls.append(self.name)
    return keras_call(self, *args, **kwargs)

Layer.__call__ = counted

def run(policy):
    # a net (convolution, batch norm, softmax head) inside a model that scales its input, as
    # the train stage wraps the nets
    keras.utils.set_random_seed(5)
    keras.mixed_precision.set_global_policy(policy)
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(x))
    net = keras.Model(inputs, keras.layers.Dense(3, activation="softmax", dtype="float32")(x),
                      name="net")
    outer_inputs = keras.Input((6, 6, 3))
    scaled = keras.layers.Rescaling(0.5, dtype="float32")(outer_inputs)
    model = keras.Model(outer_inputs, net(scaled), name="outer")
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((4, 6, 6, 3)).astype("float32"))
    calls.clear()
    out = model(x, training=True)
    # a weighted sum: the softmax's plain sum is 4 whatever the weights, its gradients noise
    (out * torch.arange(12.0).reshape(4, 3)).sum().backward()
    return {"out": out.float().tolist(), "net_calls": calls.count("net"),
            "grads": [w.value.grad.float().tolist() for w in model.trainable_weights],
            "stats": [w.numpy().astype("float32").tolist() for w in model.non_trainable_weights]}

policies = ("float32", "mixed_bfloat16")
keras_own = {policy: run(policy) for policy in policies}
torch_kernels.install()
print("RESULTS " + json.dumps({"keras": keras_own,
                               "fused": {policy: run(policy) for policy in policies}}))
"""


LOSS = r"""
import json
import numpy as np
import keras, torch
from keras.src.losses.loss import Loss
from tasks import torch_kernels

calls = []  # Keras' Loss.__call__: the wrappers the fast path leaves out
keras_loss_call = Loss.__call__
def counting(self, *args, **kwargs):
    calls.append(type(self).__name__)
    return keras_loss_call(self, *args, **kwargs)
Loss.__call__ = counting

def make(loss):
    keras.utils.set_random_seed(1)
    inputs = keras.Input((5,))
    x = keras.layers.Dense(7, activation="relu",
                           kernel_regularizer=keras.regularizers.L2(0.01))(inputs)
    outputs = keras.layers.Dense(4, activation="softmax",
                                 kernel_regularizer=keras.regularizers.L2(0.02))(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss=loss)
    return model

rng = np.random.default_rng(0)
x = torch.from_numpy(rng.standard_normal((6, 5)).astype("float32"))
LABELS = {"int64": torch.tensor([0, 1, 2, 3, 1, 0]),
          "float_column": torch.tensor([[0.0], [1.0], [2.0], [3.0], [1.0], [0.0]])}
CASES = {  # name: (loss, labels, sample weight)
    **{name: ("sparse_categorical_crossentropy", name, None) for name in LABELS},
    "sample_weight": ("sparse_categorical_crossentropy", "int64",
                      torch.tensor([1.0, 0.5, 2.0, 1.0, 0.0, 1.0])),
    "from_logits": (keras.losses.SparseCategoricalCrossentropy(from_logits=True), "int64",
                    None),
    "mse": ("mse", "float_column", None),
}

def run():
    out = {}
    for name, (loss, labels, weight) in CASES.items():
        model = make(loss)
        calls.clear()
        y_pred = model(x, training=True)
        total = model._compute_loss(x=x, y=LABELS[labels], y_pred=y_pred,
                                    sample_weight=weight, training=True)
        total.backward()
        out[name] = {"loss": total.item(), "dtype": str(total.dtype),
                     "grads": [w.value.grad.tolist() for w in model.trainable_weights],
            "zero_bias_grads": [bool((w.value.grad == 0).all())
                                for w in model.trainable_weights if w.name == "bias"],
                     "keras_loss_calls": len(calls)}
    return out

keras_own = run()
installed = torch_kernels.install()
print("RESULTS " + json.dumps({"installed": installed, "keras": keras_own, "fused": run()}))
"""


PADDING = r"""
import json
import numpy as np
import keras, torch
from tasks import torch_kernels

keras.utils.set_random_seed(2)
inputs = keras.Input((8, 10, 3))
x = keras.layers.Conv2D(5, 3, strides=2, padding="same")(inputs)  # asymmetric: 0 above, 1 below
model = keras.Model(inputs, keras.layers.Flatten()(x),
                    name="padded")
# L2 penalties on the kernel and bias with two factors: their gradients join the output's
model.layers[1].kernel.regularizer = keras.regularizers.L2(0.05)
model.layers[1].bias.regularizer = keras.regularizers.L2(0.2)
batches = [torch.from_numpy(np.random.default_rng(seed).standard_normal((4, 8, 10, 3))
                            .astype("float32")).requires_grad_() for seed in range(3)]
weights = lambda: [w.value for w in model.trainable_weights]  # noqa: E731
loss = lambda out: (out * torch.linspace(-1.0, 2.0, out.numel()).view(out.shape)).sum()  # noqa: E731

def grads(*tensors):
    found = [t.grad.tolist() for t in tensors]
    for t in tensors:
        t.grad = None
    return found

def run():
    steps = []
    for batch in batches:  # one forward and backward after another, as in training
        out = model(batch, training=True)
        (loss(out) + sum(model.losses)).backward()
        steps.append({"out": out.detach().tolist(), "losses": [float(l) for l in model.losses],
                      "grads": grads(batch, *weights())})
    # two forward passes before their backward passes, the first graph kept for a second
    first, second = model(batches[0], training=True), model(batches[1], training=True)
    loss(first).backward(retain_graph=True)
    loss(second).backward()
    loss(first).backward()
    together = grads(batches[0], batches[1], *weights())
    return {"steps": steps, "together": together}

padded = []  # the memory of each padded input the convolution reads
conv2d = torch.nn.functional.conv2d
def recording(x, *args, **kwargs):
    if x.shape[2] == 9:
        padded.append(x.data_ptr())
    return conv2d(x, *args, **kwargs)
torch.nn.functional.conv2d = recording

keras_own = run()
installed = torch_kernels.install()
mine = run()
print("RESULTS " + json.dumps({"installed": installed, "keras": keras_own, "fused": mine,
                               "padded": padded}))
"""


def _under_torch(script: str, *args: str) -> dict:
    pytest.importorskip("torch", reason="install the benchmark extra (torch) to test the torch backend")
    env = stage_environment()
    env["KERAS_BACKEND"] = "torch"
    result = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULTS "))
    return json.loads(line.removeprefix("RESULTS "))


def _assert_same_gradients_and_statistics(mine: dict, theirs: dict, rtol: float) -> None:
    """Every gradient and non-trainable weight of ``mine`` is ``theirs``. A bias followed by a
    batch norm has a gradient of zero up to rounding: gradients are compared with an absolute
    tolerance against the largest one, not against that bias's own rounding noise."""
    scale = max(np.abs(grad).max() for grad in theirs["grads"])
    for got, want in zip(mine["grads"], theirs["grads"], strict=True):
        np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-6 * scale)
    for got, want in zip(mine["stats"], theirs["stats"], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def plain() -> dict:
    """The training script with Keras' own kernels: what the other modes are compared with."""
    return _under_torch(TRAINING, "plain")


def test_fused_layers_compute_what_keras_computes() -> None:
    results = _under_torch(LAYERS)
    assert results["installed"] is True
    keras_own, fused = results["keras"], results["fused"]
    np.testing.assert_allclose(fused["out"], keras_own["out"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fused["inference"], keras_own["inference"], rtol=1e-4, atol=1e-5)
    assert len(fused["grads"]) == len(keras_own["grads"]) == 13  # 5 kernels, 4 biases, 4 BN
    # moving means and variances after one training call: Keras' formula, biased variance
    assert len(fused["stats"]) == len(keras_own["stats"]) == 6
    _assert_same_gradients_and_statistics(fused, keras_own, rtol=1e-4)
    # a convolution read by a batch norm alone leaves its bias to it: torch's own convolution,
    # and a bias gradient of exactly zero, where Keras sums rounding noise. The last biased
    # one, with no batch norm after it, takes its bias gradient as a sum (BiasedConv), and
    # the moving means above show that the other biases reached their batch norms
    assert fused["convolutions"] == {"BiasedConvBackward": 1, "ConvolutionBackward0": 4}
    assert fused["zero_bias_grads"] == [True, True, True, False]
    # those three zero gradients come from one node of the graph, not from an addition of
    # zero times the bias at each batch norm (Keras adds each bias in an addition of its own)
    assert fused["bias_nodes"] == {"AddBackward0": 0, "MulBackward0": 0,
                                   "ZeroGradientsBackward": 1}
    assert keras_own["bias_nodes"]["AddBackward0"] >= 4
    assert keras_own["zero_bias_grads"][3] is False
    assert keras_own["convolutions"] == {"ConvolutionBackward0": 5}
    # every conv and batch norm output stays in channels-last memory, whatever the input's
    # strides: torch's NCHW kernels are the slow ones on CPU
    assert results["layouts"] == [True] * 8


def test_plain_layers_are_called_directly_and_compute_what_keras_computes() -> None:
    results = _under_torch(DIRECT)
    assert results["installed"] is True
    keras_own, direct = results["keras"], results["direct"]
    every_layer = {"Functional": 2, "Conv2D": 4,
                   "BatchNormalization": 4, "Activation": 2, "ReLU": 2, "ZeroPadding2D": 1,
                   "MaxPooling2D": 1, "AveragePooling2D": 1, "Add": 1, "Concatenate": 1,
                   "Dropout": 1, "GlobalAveragePooling2D": 1, "Dense": 2}
    assert keras_own["train_calls"] == every_layer
    # with a training flag, only the outer model and the layer that needs Keras' bookkeeping
    # go through Layer.__call__: the conv with an activity regulariser. The nested model runs
    # its plan; the mixed_bfloat16 Dense and the float32 one after it are called directly,
    # each input cast to the layer's dtype and each kernel to it, as Keras' call casts them
    expected = {"Functional": 1, "Conv2D": 1}
    assert direct["train_calls"] == expected
    assert direct["inference_calls"] == expected
    assert direct["unflagged_calls"] == every_layer
    # between plain layers tensors stay in torch's NCHW view: the permutations left are the
    # three kernels' HWIO -> OIHW and one back to NHWC for the Flatten (Keras' own walk
    # permutes every convolution's kernel, input and output)
    assert direct["chain_permutes"] == 4
    assert keras_own["chain_permutes"] >= 9
    # a tensor leaves the call once its last reader has run (Keras' walk keeps them all). Each
    # batch norm's output is overwritten by its one reader: the first by its ReLU, in place, and
    # the second by the residual sum and then the second ReLU. So the first one is the first
    # ReLU's output, which the second convolution keeps for its backward; the second one is
    # gone before the pooling (the strided convolution keeps its padded copy). Without the
    # drops both would still be referenced
    assert results["alive_at_pooling"] == {"batch_norms": 2, "alive": [1]}
    for key in ("out", "inference", "unflagged", "losses"):
        np.testing.assert_allclose(direct[key], keras_own[key], rtol=1e-5, atol=1e-6)
    # in Keras' order: the activity regulariser's loss, then the weights' L2, L1 and L2
    assert len(direct["losses"]) == 4
    # the train stage's input layers on raw uint8 pixels: called directly, the same batch
    assert keras_own["pixel_calls"] == {"Functional": 2, "Rescaling": 1, "Normalization": 1,
                                        "RandomShift": 1, "RandomFlip": 1, "Conv2D": 1}
    assert direct["pixel_calls"] == {"Functional": 1}
    # scaling, normalising, shifting and flipping by Keras' ops in Keras' order, with the
    # layers' own random draws: the same bits
    assert direct["augmented"] == keras_own["augmented"]
    # a tensor that one layer alone reads, made by a batch norm, a convolution or an addition,
    # is overwritten by that layer: in a residual block both ReLUs run in place and the sum
    # goes into the second batch norm's output. A tensor read twice, a ReLU's output (its
    # backward reads it), a convolution's output with the ReLU inside, and a model output are
    # not overwritten: three ReLUs and both sums make new tensors, and the outputs and
    # gradients are Keras' own
    assert direct["chain_ops"] == {"relu_": 2, "add_": 1}
    assert direct["read_ops"] == {"relu": 3, "relu_": 2, "add": 2}
    for mine, theirs in zip(direct["read_out"], keras_own["read_out"], strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
    # the conv's bias, followed by a batch norm, has a gradient of zero up to rounding
    scale = max(np.abs(theirs).max() for theirs in keras_own["read_grads"])
    for mine, theirs in zip(direct["read_grads"], keras_own["read_grads"], strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6 * scale)
    assert len(direct["grads"]) == len(keras_own["grads"]) == 16
    for mine, theirs in zip(direct["grads"], keras_own["grads"], strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(direct["stats"], keras_own["stats"], strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)


def test_a_net_trains_the_same_with_and_without_fused_kernels(plain) -> None:
    fused = _under_torch(TRAINING, "fused")
    assert fused["resolved"]["fused_kernels"] is True
    assert plain["resolved"]["fused_kernels"] is False
    assert fused["resolved"]["backend"] == "torch"
    # four Adam steps of ResNet20 v1 with augmentation: the same losses and predictions
    np.testing.assert_allclose(fused["losses"], plain["losses"], rtol=2e-3)
    assert fused["losses"][-1] < fused["losses"][0]
    np.testing.assert_allclose(fused["probabilities"], plain["probabilities"], atol=2e-3)


def test_install_leaves_other_backends_alone() -> None:
    import keras

    assert keras.backend.backend() != "torch"
    assert torch_kernels.install() is False


def test_fused_kernels_step_aside_under_torch_compile(plain) -> None:
    # speed.jit_compile under torch traces Keras' own code; the fused kernels used to make
    # Inductor fail on the batch's dynamic shape
    compiled = _under_torch(TRAINING, "fused+jit")
    assert compiled["resolved"]["jit_compile"] is True
    assert compiled["resolved"]["fused_kernels"] is True
    np.testing.assert_allclose(compiled["losses"], plain["losses"], rtol=2e-3)
    np.testing.assert_allclose(compiled["probabilities"], plain["probabilities"], atol=2e-3)


def test_fused_adam_updates_what_keras_adam_updates() -> None:
    results = _under_torch(ADAM)
    assert results["installed"] is True
    # the fused kernel ran on every step, for all four weights, where it applies; amsgrad
    # and a weight whose memory is not contiguous take Keras' own update
    assert results["used"]["adam"] == [4] * 30
    assert results["used"]["adam_schedule_eps"] == [4] * 30
    assert results["used"]["adamw_clipped"] == [4] * 30
    assert results["used"]["amsgrad"] == []
    assert results["used"]["transposed"] == []
    # 30 steps with a decaying rate, another beta_1 and epsilon, weight decay and clipping:
    # the weights, moments and step count Keras' formula gives, to float32 rounding
    for name, theirs in results["keras"].items():
        mine = results["fused"][name]
        for got, want in zip(mine["weights"] + mine["slots"], theirs["weights"] + theirs["slots"],
                             strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6, err_msg=name)


def test_sparse_crossentropy_loss_is_keras_own_bit_for_bit() -> None:
    results = _under_torch(LOSS)
    assert results["installed"] is True
    keras_own, fused = results["keras"], results["fused"]
    assert all(case["keras_loss_calls"] == 1 for case in keras_own.values())
    # compile(loss="sparse_categorical_crossentropy") on probabilities, with integer labels
    # or a float column of them, skips Keras' loss wrappers; a sample weight, a loss object
    # from logits and another loss go through them as before
    assert {name: case["keras_loss_calls"] for name, case in fused.items()} == {
        "int64": 0, "float_column": 0, "sample_weight": 1, "from_logits": 1, "mse": 1}
    for name, theirs in keras_own.items():
        mine = fused[name]
        # the same ops in the same order: the same bits, for the loss and every gradient
        assert mine["loss"] == theirs["loss"], name
        assert mine["dtype"] == theirs["dtype"] == "torch.float32"
        assert mine["grads"] == theirs["grads"], name


def test_the_training_step_lists_the_trainable_weights_once_and_trains_as_keras_step() -> None:
    results = _under_torch(TRAIN_STEP)
    assert results["replaced"] is True
    fused, keras_own = results["fused"], results["keras"]
    # six steps: Keras' step walks the model's layers for its trainable weights three times
    # a step (regularisers, the check for any, the gradients), ours once, plus fit's own
    # calls around the steps, which both make
    assert keras_own["model_walks"] - fused["model_walks"] == 2 * 6
    # the same losses, metrics and weights, bit for bit, the frozen layer's untouched
    assert fused["history"] == keras_own["history"]
    assert fused["weights"] == keras_own["weights"]


def test_added_losses_are_walked_for_only_while_a_layer_holds_one() -> None:
    results = _under_torch(LOSS_WALKS)
    fused, keras_own = results["fused"], results["keras"]
    # no layer adds a loss: Keras clears every sublayer at each call and gathers from every
    # layer at each step; ours visits no sublayer and gathers from none
    assert fused["plain"]["gathered"] == 0 < keras_own["plain"]["gathered"]
    assert fused["plain"]["cleared_nested"] == 0 < fused["plain"]["cleared"]
    assert keras_own["plain"]["cleared_nested"] > 0
    assert fused["plain_again"]["gathered"] == 0
    # an activity regulariser adds a loss on every call: Keras' walks run, and the losses,
    # the training history and the weights are Keras' bit for bit
    assert fused["active"]["gathered"] > 0
    for kind in ("plain", "active"):
        for key in ("history", "weights", "losses", "stateless"):
            assert fused[kind][key] == keras_own[kind][key], (kind, key)
    assert len(fused["active"]["losses"]) == len(fused["active"]["stateless"]) == 3


def test_seeded_draws_give_keras_numbers_and_advance_the_state_as_keras_does() -> None:
    results = _under_torch(SEEDS)
    keras_own, fused = results["keras"], results["fused"]
    # 18 draws from two generators (one whose counter sum passes 2**31), then one in a
    # stateless scope: Keras' own SeedGenerator.next ran for all 19 before, and only for the
    # one in the scope after
    assert keras_own["keras_calls"] == 19
    assert fused["keras_calls"] == 1
    assert fused["draws"] == keras_own["draws"]
    assert fused["states"] == keras_own["states"] == [[7, 9], [2**31 - 1, 9]]
    assert fused["collected"] == keras_own["collected"] == [7, 10]


def test_a_nested_net_runs_its_plan_without_layer_call_and_computes_what_keras_computes() -> None:
    results = _under_torch(NESTED)
    for policy, theirs in results["keras"].items():
        mine = results["fused"][policy]
        # Keras calls the net through Layer.__call__; the outer model's plan calls it directly
        assert theirs["net_calls"] == 1 and mine["net_calls"] == 0, policy
        rtol = 1e-5 if policy == "float32" else 2e-2
        np.testing.assert_allclose(mine["out"], theirs["out"], rtol=rtol, atol=rtol / 10)
        scale = max(np.abs(grad).max() for grad in theirs["grads"])
        for got, want in zip(mine["grads"], theirs["grads"], strict=True):
            np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)
        for got, want in zip(mine["stats"], theirs["stats"], strict=True):
            np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol / 10)


def test_strided_padding_reuses_its_buffer_and_computes_what_keras_computes() -> None:
    results = _under_torch(PADDING)
    assert results["installed"] is True
    keras_own, fused = results["keras"], results["fused"]
    for mine, theirs in zip(fused["steps"], keras_own["steps"], strict=True):
        np.testing.assert_allclose(mine["out"], theirs["out"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(mine["losses"], theirs["losses"], rtol=1e-6)
        for got, want in zip(mine["grads"], theirs["grads"], strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # a graph kept across another forward pass still has its own padded input
    for got, want in zip(fused["together"], keras_own["together"], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Keras pads its own copy (NCHW, 9 x 11) on every call: five calls before the install.
    # After it, the three steps pad into one buffer; the two graphs alive at once need two
    padded = results["padded"]
    assert len(padded) == 10
    steps, first, second = padded[5:8], padded[8], padded[9]
    assert len(set(steps)) == 1
    assert first in steps and second != first



BFLOAT16 = r"""
import json
import numpy as np, keras, torch
from tasks import torch_kernels

def run():
    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same")(x)
    model = keras.Model(inputs, keras.layers.Flatten()(x))
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype("float32"))
    # the strides each kernel's gradient reaches the kernel in (a hook sees it before torch
    # stores it; one in other strides than the kernel's is copied once more there)
    incoming = {}
    for w in model.trainable_weights:
        if len(w.shape) == 4:
            w.value.register_hook(lambda g, path=w.path: incoming.__setitem__(path, g.stride()))
    out = model(x, training=True)
    out.float().square().sum().backward()
    node = out.grad_fn
    while node is not None and "Conv" not in type(node).__name__:
        node = node.next_functions[0][0]
    nodes, stack, seen = [], [out.grad_fn], set()
    while stack:
        step = stack.pop()
        if step is None or step in seen:
            continue
        seen.add(step)
        nodes.append(type(step).__name__)
        stack.extend(f for f, _ in step.next_functions)
    return {"out": out.float().tolist(), "last_conv": type(node).__name__,
            "casts": sorted(n for n in nodes if "Cast" in n or "ToCopy" in n or "Permute" in n),
            "grads": [w.value.grad.float().tolist() for w in model.trainable_weights],
            "kernel_layouts": [incoming[w.path] == w.value.stride()
                               for w in model.trainable_weights if len(w.shape) == 4]}

keras_own = run()
torch_kernels.install()
print("RESULTS " + json.dumps({"keras": keras_own, "fused": run()}))
"""


def test_bfloat16_convolutions_keep_torchs_bias_gradient_and_match_keras_bit_for_bit() -> None:
    # under mixed_bfloat16 the bias gradient is oneDNN's, fused into torch's convolution
    # backward (faster than BiasedConv's sum in bfloat16), and it rounds as Keras' separate
    # bias addition does: every gradient the same bits
    results = _under_torch(BFLOAT16)
    assert results["keras"]["last_conv"] == "ConvolutionBackward0"
    assert results["fused"]["last_conv"] == "ConvolutionBackward0"
    # Keras casts and permutes each kernel (two nodes a convolution); the direct calls cast
    # both kernels in one node. Both cast each bias; the one permutation left is the output's,
    # back to Keras' layout for the Flatten
    assert results["keras"]["casts"].count("PermuteBackward0") == 5
    assert results["fused"]["casts"] == ["CastKernelsBackward", "PermuteBackward0",
                                         "ToCopyBackward0", "ToCopyBackward0"]
    # the kernels' gradients leave the cast in the kernels' own layout
    assert results["fused"]["kernel_layouts"] == [True, True]
    assert results["fused"]["out"] == results["keras"]["out"]
    assert results["fused"]["grads"] == results["keras"]["grads"]


LEFT_OUT_BIAS = r"""
import json
import numpy as np, keras, torch
from tasks import torch_kernels

def make():
    # three convolutions, each read by a batch norm alone: one in training, one frozen (it
    # normalises by its moving statistics, which do not cancel the bias) and one with a torch
    # hook (Keras' own call); only the first may leave its bias out
    keras.utils.set_random_seed(8)
    bias = {"bias_initializer": "random_normal"}
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", **bias)(inputs)
    x = keras.layers.BatchNormalization(momentum=0.5)(x)
    x = keras.layers.Conv2D(4, 3, padding="same", **bias)(x)
    frozen = keras.layers.BatchNormalization(moving_mean_initializer="random_normal")
    frozen.trainable = False
    x = frozen(x)
    x = keras.layers.Conv2D(3, 1, **bias)(x)
    hooked = keras.layers.BatchNormalization(momentum=0.5)
    x = hooked(x)
    model = keras.Model(inputs, keras.layers.Flatten()(x))
    hooked.register_forward_hook(lambda module, args, output: None)
    return model

x = torch.from_numpy(np.random.default_rng(2).standard_normal((4, 6, 6, 3)).astype("float32"))

def run():
    model = make()
    out = model(x, training=True)
    (out * torch.linspace(-1.0, 2.0, out.numel()).view(out.shape)).sum().backward()
    return {"out": out.detach().tolist(),
            "grads": [w.value.grad.tolist() for w in model.trainable_weights],
            "zero_bias_grads": [bool((w.value.grad == 0).all())
                                for w in model.trainable_weights if w.name == "bias"],
            "stats": [w.numpy().tolist() for w in model.non_trainable_weights]}

keras_own = run()
torch_kernels.install()
print("RESULTS " + json.dumps({"keras": keras_own, "fused": run()}))
"""


def test_a_bias_left_out_for_a_batch_norm_is_added_back_where_it_does_not_cancel() -> None:
    results = _under_torch(LEFT_OUT_BIAS)
    keras_own, fused = results["keras"], results["fused"]
    np.testing.assert_allclose(fused["out"], keras_own["out"], rtol=1e-5, atol=1e-6)
    # the first bias' gradient is zero up to rounding in Keras and exactly zero here; the
    # frozen and the hooked batch norms' convolutions keep their bias and its gradient
    assert fused["zero_bias_grads"] == [True, False, False]
    # moving statistics, and the frozen layer's gamma and beta
    assert len(fused["stats"]) == len(keras_own["stats"]) == 8
    _assert_same_gradients_and_statistics(fused, keras_own, rtol=1e-5)


MIXED = COUNTING_CALLS + r"""

convolved = collections.Counter()  # the dtypes each convolution ran in
keras_conv2d = torch.nn.functional.conv2d
def conv2d(x, kernel, *args, **kwargs):
    convolved[f"{x.dtype} {kernel.dtype}"] += 1
    return keras_conv2d(x, kernel, *args, **kwargs)
torch.nn.functional.conv2d = conv2d

def make(policy):
    # ResNet v1's pieces under mixed_bfloat16, with the float32 softmax head of the nets
    keras.utils.set_random_seed(9)
    keras.mixed_precision.set_global_policy(policy)
    bias = {"bias_initializer": "random_normal"}
    block_in = keras.Input((8, 8, 4))
    a = keras.layers.Conv2D(4, 3, padding="same", **bias)(block_in)  # bias left to the BN
    a = keras.layers.BatchNormalization(momentum=0.5, beta_initializer="random_normal")(a)
    a = keras.layers.Activation("relu")(a)
    a = keras.layers.Conv2D(4, 3, padding="same", **bias)(a)
    a = keras.layers.BatchNormalization(momentum=0.5)(a)
    # a projection shortcut whose bias an addition reads: added back, in bfloat16
    b = keras.layers.Conv2D(4, 1, **bias)(block_in)
    block = keras.Model(block_in, keras.layers.Activation("relu")(keras.layers.Add()([a, b])),
                        name="block")  # nested
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Rescaling(0.5, dtype="float32")(inputs)  # float32, as the input layers
    x = keras.layers.Conv2D(4, 3, padding="same", **bias)(x)
    x = block(x)
    x = keras.layers.ZeroPadding2D(((1, 0), (0, 1)))(x)
    x = keras.layers.Conv2D(6, 3, strides=2, padding="same", activation="relu", **bias)(x)
    x = keras.layers.MaxPooling2D(2, strides=1)(x)
    x = keras.layers.BatchNormalization(beta_initializer="random_normal")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(5, activation="softmax", dtype="float32")(x)
    model = keras.Model(inputs, outputs)  # mixed, as the training model: its call autocasts
    keras.mixed_precision.set_global_policy("float32")
    return model

x = torch.from_numpy(np.random.default_rng(3).standard_normal((6, 8, 8, 3)).astype("float32"))
weights = torch.linspace(-1.0, 2.0, 30).view(6, 5)

def run(policy="mixed_bfloat16"):
    model = make(policy)
    calls.clear(), convolved.clear()
    out = model(x, training=True)
    train_calls, train_convolved = dict(calls), dict(convolved)
    (out * weights).sum().backward()
    calls.clear()
    inference = model(x, training=False)
    return {"out": out.detach().tolist(), "dtype": str(out.dtype),
            "inference": inference.detach().tolist(), "inference_calls": dict(calls),
            "train_calls": train_calls, "convolved": train_convolved,
            "grads": [w.value.grad.tolist() for w in model.trainable_weights],
            "grad_dtypes": sorted({str(w.value.grad.dtype) for w in model.trainable_weights}),
            "stats": [w.numpy().tolist() for w in model.non_trainable_weights]}

# the same weights and batch in float32 throughout: what either bfloat16 run approximates
exact = run("float32")
keras_own = run()
installed = torch_kernels.install()
print("RESULTS " + json.dumps({"installed": installed, "keras": keras_own, "direct": run(),
                               "float32": exact}))
"""


def test_mixed_bfloat16_layers_are_called_directly_in_bfloat16() -> None:
    results = _under_torch(MIXED)
    assert results["installed"] is True
    keras_own, direct = results["keras"], results["direct"]
    # Keras' own walk calls every layer; the direct calls only the outer model: the nested
    # one runs its plan without Layer.__call__, which would not cast its input
    assert sum(keras_own["train_calls"].values()) == 18
    assert direct["train_calls"] == {"Functional": 1}
    assert direct["inference_calls"] == {"Functional": 1}
    # every convolution but the first ran on bfloat16 input and a bfloat16 kernel, as in
    # Keras' walk; the first one's float32 input was cast before it, as Keras' call casts it
    assert keras_own["convolved"] == {"torch.bfloat16 torch.bfloat16": 5}
    assert direct["convolved"] == {"torch.bfloat16 torch.bfloat16": 5}
    assert direct["dtype"] == keras_own["dtype"] == "torch.float32"  # the float32 head
    assert direct["grad_dtypes"] == keras_own["grad_dtypes"] == ["torch.float32"]
    # as close to the float32 function as Keras' own bfloat16 walk is: bfloat16 keeps 8 bits
    # of mantissa, and both walks round in other places (a bias added or left to its batch
    # norm, a bias gradient summed), so each is compared with float32, not with the other
    exact = results["float32"]

    def error(got, want) -> float:
        return float(np.sqrt(np.mean(np.square(np.subtract(got, want)))))

    assert error(direct["out"], exact["out"]) <= 2.5 * error(keras_own["out"], exact["out"])
    assert error(direct["inference"], exact["inference"]) <= 2.5 * error(
        keras_own["inference"], exact["inference"]) + 1e-4
    assert len(direct["grads"]) == len(keras_own["grads"]) == 18  # 5 convolutions, 3 BN, Dense
    scale = max(np.abs(grad).max() for grad in exact["grads"])
    for index, (mine, theirs, want) in enumerate(zip(direct["grads"], keras_own["grads"],
                                                      exact["grads"], strict=True)):
        assert error(mine, want) <= 2.5 * error(theirs, want) + 1e-3 * scale, index
    assert len(direct["stats"]) == len(keras_own["stats"]) == 6
    for mine, theirs, want in zip(direct["stats"], keras_own["stats"], exact["stats"],
                                  strict=True):
        assert error(mine, want) <= 2.5 * error(theirs, want) + 1e-5


def test_a_net_trains_in_mixed_bfloat16_as_keras_own_kernels_train_it() -> None:
    fused = _under_torch(TRAINING, "fused", "mixed_bfloat16")
    plain = _under_torch(TRAINING, "plain", "mixed_bfloat16")
    assert fused["resolved"]["precision"] == plain["resolved"]["precision"] == "mixed_bfloat16"
    # four Adam steps of ResNet20 v1 with augmentation, to bfloat16 rounding
    np.testing.assert_allclose(fused["losses"], plain["losses"], rtol=2e-2)
    assert fused["losses"][-1] < fused["losses"][0]
    np.testing.assert_allclose(fused["probabilities"], plain["probabilities"], atol=3e-2)
