"""Custom layers shared by the architectures (serializable, ``keras.ops`` only).

A ``Lambda`` layer would be shorter, but ``keras.saving.load_model`` refuses to
deserialize one in its default safe mode, so anything beyond the stock layers lives
here as a registered class with a ``get_config``.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="deepnets")
class SubsampleZeroPad(keras.layers.Layer):
    """Parameter-free shortcut (He et al. 2015, option A): stride-2 subsample, zero-pad channels.

    Takes every other pixel along height and width (``x[:, ::2, ::2, :]``) and appends
    zero channels up to ``filters``, so the identity path matches a residual branch that
    halved the feature map and widened it. Channels-last only.

    Args:
        filters: channel count of the output; must be at least the input channel count.
        **kwargs: standard ``keras.layers.Layer`` arguments (``name``, ``dtype``, ...).
    """

    def __init__(self, filters: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if int(filters) < 1:
            raise ValueError(f"SubsampleZeroPad filters must be positive, got {filters}")
        self.filters = int(filters)

    def build(self, input_shape: tuple[int | None, ...]) -> None:
        channels = input_shape[-1]
        if channels is not None and channels > self.filters:
            raise ValueError(
                f"SubsampleZeroPad cannot shrink {channels} channels to {self.filters}"
            )

    def call(self, inputs: Any) -> Any:
        # strided slicing keeps the pixel at (0, 0) of every 2x2 block, which is the
        # same pixel a stride-2 "same" convolution centres on for even input sizes
        subsampled = inputs[:, ::2, ::2, :]
        missing = self.filters - ops.shape(inputs)[-1]
        return ops.pad(subsampled, [[0, 0], [0, 0], [0, 0], [0, missing]])

    def compute_output_shape(self, input_shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
        def half(size: int | None) -> int | None:
            return None if size is None else (size + 1) // 2

        return (input_shape[0], half(input_shape[1]), half(input_shape[2]), self.filters)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "filters": self.filters}
