"""The registry: the only way a name becomes a model.

Variants register under a string key with the numbers that define them; callers use
:func:`create_model` and never import a builder directly. A builder is named as
``"module:function"`` and imported only when a model is built, so listing and validating
names (which every pipeline stage does through params.yaml) never pays for importing Keras.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import keras

Builder = str | Callable[..., Any]  # a builder returns a keras.Model


@dataclass(frozen=True)
class ModelEntry:
    """One registered variant: a builder and the arguments that define the variant."""

    name: str
    builder: Builder  # "module:function" or the function itself
    defaults: dict[str, Any] = field(default_factory=dict)
    # the input shape and class count the variant was published with
    input_shape: tuple[int, int, int] = (32, 32, 3)
    num_classes: int = 10
    slow: bool = False  # very deep variants, too slow for the default test run
    doc: str = ""


_REGISTRY: dict[str, ModelEntry] = {}


def register(
    name: str,
    builder: Builder,
    *,
    input_shape: tuple[int, int, int] = (32, 32, 3),
    num_classes: int = 10,
    slow: bool = False,
    doc: str = "",
    **defaults: Any,
) -> ModelEntry:
    """Register ``builder`` under ``name`` with the keyword arguments that define the variant."""
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    entry = ModelEntry(name, builder, dict(defaults), tuple(input_shape), num_classes, slow, doc)
    _REGISTRY[name] = entry
    return entry


def resolve_builder(builder: Builder) -> Callable[..., keras.Model]:
    """Import a ``"module:function"`` builder (or return a callable unchanged)."""
    if callable(builder):
        return builder
    module, _, function = builder.partition(":")
    return getattr(importlib.import_module(module), function)


def builder_options(name: str) -> set[str]:
    """The keyword options the builder of ``name`` takes (besides shape, classes and name)."""
    builder = resolve_builder(get_entry(name).builder)
    return set(inspect.signature(builder).parameters) - {"input_shape", "num_classes", "name"}


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_REGISTRY)


def get_entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; an unknown name lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(list_models())}"
        ) from None


def create_model(
    name: str,
    *,
    input_shape: tuple[int, int, int] | None = None,
    num_classes: int | None = None,
    **overrides: Any,
) -> keras.Model:
    """Build the registered model ``name``.

    Args:
        name: a registered model name (see :func:`list_models`).
        input_shape: (height, width, channels); the variant's published shape if omitted.
        num_classes: size of the softmax output; the variant's published count if omitted.
        **overrides: builder keyword arguments that replace the registered defaults.

    Returns:
        An uncompiled ``keras.Model``.

    Raises:
        ValueError: unknown name, or arguments the builder rejects.
    """
    entry = get_entry(name)
    kwargs = {**entry.defaults, **overrides}
    builder = resolve_builder(entry.builder)
    accepted = builder_options(name)
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ValueError(
            f"model {name!r} does not take option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(sorted(accepted))}"
        )
    return builder(
        input_shape=tuple(input_shape or entry.input_shape),
        num_classes=num_classes or entry.num_classes,
        name=name,
        **kwargs,
    )
