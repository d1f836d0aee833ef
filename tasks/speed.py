"""The speed settings of training (params.yaml ``speed``), resolved for the machine at hand.

None of them changes what is trained: the net, the recipe and the data stay as params.yaml
says. They change how the arithmetic runs:

- ``precision``: ``float32``, or Keras' mixed policies (``mixed_bfloat16``, ``mixed_float16``)
  that keep the weights in float32 and compute in 16 bits. ``auto`` picks ``mixed_bfloat16``
  where the hardware has fast bfloat16 arithmetic (a GPU of compute capability 8.0 or newer; a
  CPU with AMX or AVX512-BF16) and float32 elsewhere, since emulated bfloat16 is slower.
- ``jit_compile``: XLA compilation of the train step. ``auto`` compiles under TensorFlow and
  JAX, on a CPU too (Keras alone would not for TensorFlow on a CPU; there it measured 1.7 times
  faster for ResNet20 v1, docs/benchmarks.md), and not under the torch backend, where it would
  mean torch.compile and minutes of compiling. Compiling costs seconds to minutes per process,
  once; short test runs turn it off.
- ``steps_per_execution``: training steps run per call into the compiled function; more means
  less Python between steps, but callbacks and the progress bar see the batches in groups.
- ``threads``: intra-op threads on a CPU, for TensorFlow and torch (null: all cores).
- ``fused_kernels``: under the torch backend, convolutions without layout copies, batch norm
  as one fused kernel, and a functional model's plain layers called directly in torch's layout
  (tasks/torch_kernels.py); the same arithmetic, faster.
- ``backend``: Keras' backend for the train stage (:func:`select_backend`, before Keras is
  imported). ``auto`` leaves the choice to ``KERAS_BACKEND`` (tensorflow if unset). As a param
  it is a dependency of the train stages, so switching it retrains.

The settings used are recorded in models/<name>/params.json (``speed``), so a figure can be
traced to the precision it was trained in.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from functools import cache
from pathlib import Path
from typing import Any

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# the package each backend needs, and how to get it
BACKEND_PACKAGES = {
    "tensorflow": ("tensorflow", "it is in requirements.lock: make install"),
    "jax": ("jax", "pip install -e .[test] (jax[cpu]) or a CUDA build of JAX"),
    "torch": ("torch", "pip install -e .[benchmark] (PyTorch's CPU build: docs/benchmarks.md)"),
}


def select_backend(backend: str) -> str | None:
    """Make ``backend`` (params.yaml ``speed.backend``) Keras' backend in this process.

    Call before Keras is imported. ``auto`` changes nothing and returns None. Raises ValueError,
    naming the key and the fix, when the backend's package is missing or Keras already runs
    on another backend in this process.
    """
    if backend == "auto":
        return None
    package, how = BACKEND_PACKAGES[backend]
    if importlib.util.find_spec(package) is None:
        raise ValueError(f"speed.backend = {backend!r} needs {package}, which is not installed: "
                         f"{how}; or set speed.backend: auto in params.yaml")
    keras = sys.modules.get("keras")
    if keras is not None and keras.backend.backend() != backend:
        raise ValueError(
            f"speed.backend = {backend!r}, but Keras already runs on "
            f"{keras.backend.backend()!r} in this process (it picks its backend once, at "
            f"import): run training in a new process (python -m tasks.train), or set "
            f"speed.backend: auto")
    os.environ["KERAS_BACKEND"] = backend
    return backend


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags Linux reports (empty where /proc/cpuinfo is not readable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def accelerator() -> str | None:
    """``"gpu"`` if the Keras backend in use has a GPU, else None (CPU)."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return "gpu" if jax.default_backend() == "gpu" else None
    if backend == "tensorflow":
        import tensorflow as tf

        return "gpu" if tf.config.list_physical_devices("GPU") else None
    if backend == "torch":
        import torch

        return "gpu" if torch.cuda.is_available() else None
    return None


def gpu_has_bf16() -> bool:
    """Whether the first GPU computes bfloat16 natively (compute capability 8.0 or newer)."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        capability = getattr(jax.devices()[0], "compute_capability", "0")
        return float(capability) >= 8.0
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        details = tf.config.experimental.get_device_details(tf.config.list_physical_devices("GPU")[0])
        return details.get("compute_capability", (0, 0)) >= (8, 0)
    return False


def resolve_precision(precision: str) -> str:
    """The dtype policy ``precision`` stands for on this machine."""
    if precision != "auto":
        return precision
    if accelerator() == "gpu":
        return "mixed_bfloat16" if gpu_has_bf16() else "float32"
    return "mixed_bfloat16" if cpu_flags() & set(CPU_BF16_FLAGS) else "float32"


def resolve_jit_compile(jit_compile: str | bool) -> bool:
    """What ``jit_compile`` stands for under the Keras backend in use."""
    import keras

    if jit_compile != "auto":
        return bool(jit_compile)
    return keras.backend.backend() in ("tensorflow", "jax")


def apply(speed: Any) -> dict[str, Any]:
    """Set the process-wide parts of ``speed`` (dtype policy, threads) before a model is built.

    Returns the resolved settings, also what :func:`compile_options` takes.
    """
    select_backend(speed.backend)  # a no-op when Keras already runs on it; else the error
    import keras

    backend = keras.backend.backend()
    if speed.threads is not None and backend == "tensorflow":
        import tensorflow as tf

        # must happen before TensorFlow runs its first op; a second call is refused by TF
        try:
            tf.config.threading.set_intra_op_parallelism_threads(speed.threads)
        except RuntimeError:
            pass
    fused = False
    if backend == "torch":
        import torch

        if speed.threads is not None:
            torch.set_num_threads(speed.threads)
        if speed.fused_kernels:
            from tasks import torch_kernels

            fused = torch_kernels.install()
    policy = resolve_precision(speed.precision)
    keras.config.set_dtype_policy(policy)
    return {
        "precision": policy,
        "jit_compile": resolve_jit_compile(speed.jit_compile),
        "steps_per_execution": speed.steps_per_execution,
        "threads": speed.threads or os.cpu_count(),
        "fused_kernels": fused,
        "backend": backend,
        "device": accelerator() or "cpu",
    }


def compile_options(resolved: dict[str, Any]) -> dict[str, Any]:
    """The ``Model.compile`` keywords of resolved speed settings."""
    return {"jit_compile": resolved["jit_compile"],
            "steps_per_execution": resolved["steps_per_execution"]}
