"""Architectures (Keras 3 functional API, backend-agnostic) behind one registry.

Importing this package registers every variant; build one with ``create_model(name)``.
"""

from nets import catalog  # noqa: F401  (registers every variant; imports no Keras)
from nets.registry import (
    ModelEntry,
    builder_options,
    create_model,
    get_entry,
    list_models,
    register,
)

__all__ = [
    "ModelEntry", "builder_options", "create_model", "get_entry", "list_models", "register",
]
