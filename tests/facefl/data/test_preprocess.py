"""The shared preprocessing definition."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from facefl.data import Preprocessing, preprocessing_for


def _ramp(h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_formula_layout_and_dtype() -> None:
    image = _ramp(8, 8)
    out = Preprocessing(image_size=8)(image)
    assert out.shape == (3, 8, 8) and out.dtype == np.float32 and out.flags.c_contiguous
    expected = (image.astype(np.float32) / 255.0 - 0.5) / 0.5
    np.testing.assert_allclose(out, expected.transpose(2, 0, 1), rtol=0, atol=1e-6)
    assert out.min() >= -1.0 and out.max() <= 1.0


def test_custom_mean_std_and_bgr() -> None:
    image = np.zeros((4, 4, 3), np.uint8)
    image[..., 0] = 255  # pure red
    rgb = Preprocessing(4, mean=0.25, std=0.5)(image)
    np.testing.assert_allclose(rgb[:, 0, 0], [1.5, -0.5, -0.5], atol=1e-6)
    bgr = Preprocessing(4, mean=0.25, std=0.5, colour="BGR")(image)
    np.testing.assert_allclose(bgr[:, 0, 0], [-0.5, -0.5, 1.5], atol=1e-6)


def test_pil_and_array_agree_and_modes_convert() -> None:
    image = _ramp(16, 16)
    prep = Preprocessing(16)
    np.testing.assert_array_equal(prep(Image.fromarray(image)), prep(image))
    gray = Image.fromarray(image[..., 0])  # mode "L"
    out = prep(gray)
    assert out.shape == (3, 16, 16)
    np.testing.assert_array_equal(out[0], out[1])


def test_resize_any_size() -> None:
    prep = Preprocessing(32)
    out = prep(_ramp(50, 70))
    assert out.shape == (3, 32, 32)
    flat = np.full((100, 80, 3), (10, 120, 250), np.uint8)  # a flat colour stays that colour
    np.testing.assert_allclose(prep(flat), prep(np.full((32, 32, 3), (10, 120, 250), np.uint8)), atol=1e-6)
    # array and PIL inputs resize identically
    big = _ramp(64, 64)
    np.testing.assert_array_equal(prep(big), prep(Image.fromarray(big)))


def test_batch_matches_single_images_bit_for_bit() -> None:
    prep = Preprocessing(16)
    images: list[Image.Image | np.ndarray] = [_ramp(16, 16), _ramp(20, 24), Image.fromarray(_ramp(16, 16))]
    batch = prep.batch(images)
    assert batch.shape == (3, 3, 16, 16) and batch.dtype == np.float32
    for i, image in enumerate(images):
        np.testing.assert_array_equal(batch[i], prep(image))
    stacked = np.stack([_ramp(16, 16)] * 2)
    np.testing.assert_array_equal(prep.batch(stacked)[1], prep(stacked[1]))
    np.testing.assert_array_equal(prep.batch(np.stack([_ramp(30, 30)] * 2))[0], prep(_ramp(30, 30)))
    assert prep.batch([]).shape == (0, 3, 16, 16)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((8, 8), np.uint8), "HxWx3"),
        (np.zeros((8, 8, 4), np.uint8), "HxWx3"),
        (np.zeros((8, 8, 3), np.float32), "uint8"),
        (np.zeros((0, 8, 3), np.uint8), "no pixels"),
        ([[1, 2, 3]], "PIL image"),
    ],
)
def test_bad_inputs(image: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Preprocessing(8)(image)  # type: ignore[arg-type]  # deliberately wrong input


def test_bad_batch_and_settings() -> None:
    with pytest.raises(ValueError, match="N, H, W, 3"):
        Preprocessing(8).batch(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        Preprocessing(8).batch(np.zeros((2, 8, 8, 3), np.float64))
    with pytest.raises(ValueError, match="image_size"):
        Preprocessing(0)
    with pytest.raises(ValueError, match="image_size"):
        Preprocessing(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="std"):
        Preprocessing(8, std=0.0)
    with pytest.raises(ValueError, match="colour"):
        Preprocessing(8, colour="HSV")


def test_metadata_round_trip() -> None:
    prep = Preprocessing(112, mean=0.5, std=0.25, colour="BGR")
    meta = prep.to_dict()
    assert meta["image_size"] == 112 and meta["colour"] == "BGR" and meta["resize"] == "bilinear"
    assert Preprocessing.from_dict(meta) == prep
    assert Preprocessing(np.int64(64)).image_size == 64  # type: ignore[arg-type]
    assert type(Preprocessing(np.int64(64)).image_size) is int  # type: ignore[arg-type]


def test_preprocessing_for_architecture() -> None:
    assert preprocessing_for("small") == Preprocessing(64)
    assert preprocessing_for("mobilefacenet") == Preprocessing(112)
    with pytest.raises(ValueError, match="unknown architecture"):
        preprocessing_for("nope")


def test_per_channel_mean_and_std() -> None:
    image = np.zeros((2, 2, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 255, 51, 0
    prep = Preprocessing(2, mean=(0.5, 0.1, 0.25), std=(0.5, 0.25, 1.0))
    np.testing.assert_allclose(prep(image)[:, 0, 0], [1.0, 0.4, -0.25], atol=1e-6)
    # the values are given in RGB order and follow their channel into BGR output
    bgr = Preprocessing(2, mean=(0.5, 0.1, 0.25), std=(0.5, 0.25, 1.0), colour="BGR")
    np.testing.assert_allclose(bgr(image)[:, 0, 0], [-0.25, 0.4, 1.0], atol=1e-6)
    mean, std = bgr.channel_stats()
    np.testing.assert_allclose(mean, [0.25, 0.1, 0.5])
    np.testing.assert_allclose(std, [1.0, 0.25, 0.5])
    # one number for all channels computes exactly what it always did
    flat = _ramp(4, 4)
    same = Preprocessing(4, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    np.testing.assert_array_equal(same(flat), Preprocessing(4)(flat))
    with pytest.raises(ValueError, match="three numbers"):
        Preprocessing(4, mean=(0.5, 0.5))  # type: ignore[arg-type]  # deliberately wrong
    with pytest.raises(ValueError, match="std must be positive"):
        Preprocessing(4, std=(0.5, 0.0, 0.5))


def test_per_channel_metadata_round_trip_and_old_metadata() -> None:
    import json

    prep = Preprocessing(150, mean=(0.48, 0.46, 0.41), std=256 / 255)
    meta = json.loads(json.dumps(prep.to_dict()))  # as stored in checkpoints and ONNX metadata
    assert meta["mean"] == [0.48, 0.46, 0.41] and meta["std"] == 256 / 255
    assert Preprocessing.from_dict(meta) == prep
    # metadata written before per-channel values: plain numbers
    old = {"image_size": 64, "mean": 0.5, "std": 0.5, "colour": "RGB", "resize": "bilinear", "layout": "NCHW"}
    assert Preprocessing.from_dict(old) == Preprocessing(64)
    assert Preprocessing.from_dict({"image_size": 64}) == Preprocessing(64)
    assert Preprocessing(64).to_dict()["mean"] == 0.5  # and still written so for one-number values


def test_each_architecture_has_its_preprocessing() -> None:
    dlib = preprocessing_for("dlib-resnet")
    assert dlib.image_size == 150 and isinstance(dlib.mean, tuple)
    np.testing.assert_allclose(np.asarray(dlib.mean) * 255, [122.782, 117.001, 104.298])
    assert dlib.std == pytest.approx(256 / 255)
