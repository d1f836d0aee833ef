"""RandomShift: the XLA-compilable translation the training model augments with."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from tasks.modeling import RandomShift, build_training_model


def shifted_reference(image: np.ndarray, dy: float, dx: float, fill: str) -> np.ndarray:
    """Output pixel (i, j) = input at (i - dy, j - dx), bilinear, by explicit loops."""
    h, w, _ = image.shape
    out = np.zeros_like(image)

    def pick(i: int, j: int) -> np.ndarray:
        if fill == "nearest":
            return image[min(max(i, 0), h - 1), min(max(j, 0), w - 1)]
        return image[i, j] if 0 <= i < h and 0 <= j < w else np.zeros(image.shape[-1])

    for i in range(h):
        for j in range(w):
            si, sj = i - dy, j - dx
            i0, j0 = int(np.floor(si)), int(np.floor(sj))
            fi, fj = si - i0, sj - j0
            out[i, j] = ((1 - fi) * (1 - fj) * pick(i0, j0) + (1 - fi) * fj * pick(i0, j0 + 1)
                         + fi * (1 - fj) * pick(i0 + 1, j0) + fi * fj * pick(i0 + 1, j0 + 1))
    return out


@pytest.mark.parametrize("fill", ["nearest", "zero"])
@pytest.mark.parametrize("dy,dx", [(0.0, 0.0), (2.0, -3.0), (1.4, -0.3), (-3.2, 2.9)])
def test_shift_matches_explicit_bilinear(fill, dy, dx):
    rng = np.random.default_rng(1)
    images = rng.normal(size=(2, 7, 9, 3)).astype("float32")
    layer = RandomShift(4, 4, fill=fill)
    rows = layer._weights(keras.ops.convert_to_tensor([dy, dy], "float32"), 7)
    cols = layer._weights(keras.ops.convert_to_tensor([dx, dx], "float32"), 9)
    got = keras.ops.einsum("bkw,biwc->bikc", cols, keras.ops.einsum("bij,bjwc->biwc", rows, images))
    for index in range(2):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(got)[index],
                                   shifted_reference(images[index], dy, dx, fill), atol=1e-5)


@pytest.mark.parametrize("fill", ["nearest", "zero"])
@pytest.mark.parametrize("dy,dx", [(0.0, 0.0), (2.0, -3.0), (-4.0, 1.0), (3.0, 4.0)])
def test_whole_pixel_weights_shift_exactly(fill, dy, dx):
    # the whole-pixel matrices are built without the bilinear fractions: the same pixels, bit
    # for bit, as the bilinear formula gives for whole shifts
    rng = np.random.default_rng(2)
    images = rng.normal(size=(2, 7, 9, 3)).astype("float32")
    layer = RandomShift(4, 4, fill=fill, interpolation="whole_pixels")
    rows = layer._weights(keras.ops.convert_to_tensor([dy, -dy], "float32"), 7)
    cols = layer._weights(keras.ops.convert_to_tensor([dx, -dx], "float32"), 9)
    got = keras.ops.convert_to_numpy(keras.ops.einsum(
        "bkw,biwc->bikc", cols, keras.ops.einsum("bij,bjwc->biwc", rows, images)))
    for index, sign in enumerate((1.0, -1.0)):
        np.testing.assert_array_equal(
            got[index], shifted_reference(images[index], sign * dy, sign * dx, fill))


def test_whole_pixel_shifts_are_uniform_integers_and_inference_is_identity():
    layer = RandomShift(2, 2, fill="zero", interpolation="whole_pixels", seed=3)
    images = np.zeros((4000, 5, 5, 1), "float32")
    images[:, 2, 2, 0] = 1.0  # one lit pixel; where it lands is the drawn shift
    out = keras.ops.convert_to_numpy(layer(images, training=True))
    assert np.allclose(out.sum(axis=(1, 2, 3)), 1.0)  # moved whole, never blurred or lost
    where = out.reshape(len(out), -1).argmax(1)
    counts = np.bincount(where, minlength=25).reshape(5, 5)
    assert counts.min() > 4000 / 25 * 0.7  # every offset in [-2, 2] x [-2, 2] is drawn
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(images, training=False)),
                                  images)


def test_training_model_with_augmentation_compiles_with_xla():
    from keras.src.trainers.trainer import model_supports_jit

    net = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(),
                            keras.layers.Dense(2, activation="softmax")])
    model = build_training_model(net, np.zeros((8, 8, 3), "float32"), np.ones((8, 8, 3), "float32"),
                                 shift=0.1, flip=True, crop_pad=2, seed=0)
    assert model_supports_jit(model)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", jit_compile=True)
    x = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
    model.fit(x, np.arange(8) % 2, epochs=1, verbose=0)
    assert model.jit_compile
