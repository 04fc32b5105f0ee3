"""Compressed updates (facefl.compression): hand-computed scales, round-trip bounds, hostile inputs."""

from __future__ import annotations

import numpy as np
import pytest

from facefl import codec, compression
from facefl.codec import TensorSpec
from facefl.compression import CompressionError, ErrorFeedback


def test_int8_per_tensor_by_hand() -> None:
    x = np.array([[0.0, 1.0], [-2.54, 0.5]], np.float32)
    q, scales = compression.quantize_int8(x, per_channel=False)
    assert scales.dtype == np.float32 and scales.shape == (1,)
    assert scales[0] == np.float32(2.54 / 127)  # max|x| / 127 = 0.02
    np.testing.assert_array_equal(q, [[0, 50], [-127, 25]])
    assert q.dtype == np.int8
    np.testing.assert_allclose(compression.dequantize_int8(q, scales), x, atol=1e-6)


def test_int8_per_channel_by_hand_with_an_all_zero_channel() -> None:
    x = np.array([[1.27, -0.5], [0.0, 0.0], [1.0, 4.0]], np.float32)
    q, scales = compression.quantize_int8(x, per_channel=True)
    np.testing.assert_allclose(scales, [0.01, 0.0, 4.0 / 127], rtol=1e-6)
    np.testing.assert_array_equal(q, [[127, -50], [0, 0], [32, 127]])  # 1.0 / (4/127) = 31.75 -> 32
    decoded = compression.dequantize_int8(q, scales)
    np.testing.assert_array_equal(decoded[1], [0.0, 0.0])  # a zero scale decodes to zeros
    assert abs(decoded[2, 0] - 1.0) <= scales[2] / 2


@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_round_trip_error_is_at_most_half_a_step(per_channel: bool) -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((16, 3, 3, 3)) * rng.uniform(0.001, 2.0, (16, 1, 1, 1))).astype(np.float32)
    q, scales = compression.quantize_int8(x, per_channel)
    err = np.abs(compression.dequantize_int8(q, scales).astype(np.float64) - x)
    step = (scales if per_channel else np.repeat(scales, 16)).astype(np.float64).reshape(16, 1, 1, 1)
    assert (err <= step / 2 * (1 + 1e-5) + 1e-12).all()


def test_per_channel_is_closer_than_per_tensor_for_unequal_channels() -> None:
    x = np.stack([np.linspace(-1e-3, 1e-3, 50), np.linspace(-1.0, 1.0, 50)]).astype(np.float32)
    per_tensor = compression.dequantize_int8(*compression.quantize_int8(x, False))
    per_channel = compression.dequantize_int8(*compression.quantize_int8(x, True))
    assert (
        compression.relative_error(x[0], per_channel[0])
        < 0.01
        < compression.relative_error(x[0], per_tensor[0])
    )


def test_encode_update_layout_and_bytes() -> None:
    delta = {"conv.weight": np.ones((8, 4, 3, 3), np.float32), "conv.bias": np.ones(8, np.float32)}
    f32 = compression.encode_update(delta, "float32")
    assert {k: v.dtype for k, v in f32.items()} == {"conv.weight": np.float32, "conv.bias": np.float32}
    assert compression.encode_payload(delta) == codec.encode(delta)  # float32: the old wire bytes
    f16 = compression.encode_update(delta, "float16")
    assert f16["conv.weight"].dtype == np.float16
    i8 = compression.encode_update(delta, "int8_channel")
    assert i8["conv.weight"].dtype == np.int8 and i8["conv.weight#scale"].shape == (8,)
    assert i8["conv.bias"].dtype == np.float32  # one-dimensional tensors stay float32
    assert compression.encode_update(delta, "int8")["conv.weight#scale"].shape == (1,)
    sizes = {e: compression.payload_bytes(delta, e) for e in compression.ENCODINGS}
    assert sizes["int8"] < sizes["int8_channel"] < sizes["float16"] < sizes["float32"]
    for encoding in compression.ENCODINGS:
        decoded = compression.decode_payload(compression.encode_payload(delta, encoding))
        np.testing.assert_allclose(decoded["conv.weight"], 1.0, rtol=1e-3)
        assert decoded["conv.bias"].dtype == np.float32


@pytest.mark.parametrize(
    ("delta", "encoding", "match"),
    [
        ({"w": np.array([[1.0, np.nan]], np.float32)}, "int8", "NaN or Inf"),
        ({"w": np.array([[1.0, np.inf]], np.float32)}, "int8_channel", "NaN or Inf"),
        ({"w": np.array([[1e5, 0.0]], np.float32)}, "float16", "float16's range"),
        ({"w#scale": np.zeros((2, 2), np.float32)}, "float32", "reserved"),
        ({"w": np.zeros((2, 2), np.float32)}, "int4", "unknown update encoding"),
    ],
)
def test_encode_refuses(delta: dict[str, np.ndarray], encoding: str, match: str) -> None:
    with pytest.raises(CompressionError, match=match):
        compression.encode_update(delta, encoding)


def test_float_encodings_pass_nan_through_for_the_server_to_refuse() -> None:
    delta = {"w": np.array([[np.nan, np.inf]], np.float32)}
    assert compression.encode_payload(delta) == codec.encode(delta)
    assert np.isnan(compression.encode_update(delta, "float16")["w"][0, 0])
    with pytest.raises(CompressionError, match="NaN or Inf"):
        compression.decode_update(compression.encode_update(delta, "float16"))


def _wire(scales: np.ndarray, q: np.ndarray | None = None) -> dict[str, np.ndarray]:
    q = np.array([[1, -2], [3, 127]], np.int8) if q is None else q
    return {"w": q, "w#scale": scales}


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        (_wire(np.array([np.nan], np.float32)), "NaN or Inf"),
        (_wire(np.array([np.inf, 1.0], np.float32)), "NaN or Inf"),
        (_wire(np.array([-0.1], np.float32)), "must lie in"),
        (_wire(np.array([compression.MAX_SCALE * 2], np.float32)), "must lie in"),
        (_wire(np.array([0.1, 0.1, 0.1], np.float32)), "scale shape"),
        (_wire(np.array([0.1], np.float64)), "must be float32"),
        (_wire(np.array([0.1], np.float32), np.array([[1, 2]], np.int16)), "dtype int16"),
        ({"w": np.array([[1, 2]], np.int8)}, "without"),
        ({"v": np.zeros(2, np.float32), "w#scale": np.ones(1, np.float32)}, "belongs to no tensor"),
        ({"w": np.array([np.nan], np.float16)}, "NaN or Inf"),
    ],
)
def test_decode_refuses_hostile_updates(wire: dict[str, np.ndarray], match: str) -> None:
    with pytest.raises(CompressionError, match=match):
        compression.decode_update(wire)


def test_a_zero_scale_and_the_largest_scale_decode_to_finite_values() -> None:
    q = np.array([[-128, 127]], np.int8)
    assert (compression.dequantize_int8(q, np.zeros(1, np.float32)) == 0).all()
    top = compression.dequantize_int8(q, np.array([compression.MAX_SCALE], np.float32))
    assert np.isfinite(top).all()


def test_wire_layout_checks_names_shapes_and_scales() -> None:
    expected = {"w": TensorSpec((3, 2), "F32"), "b": TensorSpec((3,), "F32")}
    ok = {"w": TensorSpec((3, 2), "I8"), "w#scale": TensorSpec((3,), "F32"), "b": TensorSpec((3,), "F16")}
    assert compression.wire_layout(ok, expected) == {"w": "w#scale", "b": None}
    bad = [
        ({**ok, "w#scale": TensorSpec((2,), "F32")}, "shape \\[1\\] or"),
        ({**ok, "w#scale": TensorSpec((3,), "F16")}, "F32"),
        ({"w": TensorSpec((3, 2), "I8"), "b": TensorSpec((3,), "F32")}, "need"),
        ({**ok, "b": TensorSpec((4,), "F32")}, "shape"),
        ({**ok, "x": TensorSpec((1,), "F32")}, "unexpected \\['x'\\]"),
        ({"w": TensorSpec((3, 2), "F32")}, "missing \\['b'\\]"),
        ({**ok, "b#scale": TensorSpec((1,), "F32")}, "unexpected"),
    ]
    for got, match in bad:
        with pytest.raises(CompressionError, match=match):
            compression.wire_layout(got, expected)


def test_error_feedback_telescopes_what_was_dropped() -> None:
    """After k rounds the sum of what was sent plus the residual is exactly the sum of the deltas."""
    by_hand = ErrorFeedback()
    corrected = by_hand.correct({"w": np.array([[1.0, 0.004]], np.float32)}, "int8")
    np.testing.assert_array_equal(corrected["w"], np.array([[1.0, 0.004]], np.float32))
    # scale 1/127: 0.004 * 127 = 0.508 -> q = 1 -> 0.007874; residual 0.004 - 0.007874
    np.testing.assert_allclose(by_hand.residual["w"], [[0.0, 0.004 - 1 / 127]], atol=1e-7)

    rng = np.random.default_rng(1)
    feedback = ErrorFeedback()
    sent = np.zeros((4, 5))
    total = np.zeros((4, 5))
    for _ in range(6):
        delta = {"w": (rng.standard_normal((4, 5)) * 0.01).astype(np.float32)}
        total += delta["w"]
        wire = compression.encode_update(feedback.correct(delta, "int8"), "int8")
        sent += compression.decode_update(wire)["w"]
        assert np.abs(feedback.residual["w"]).max() <= wire["w#scale"][0] / 2 * (1 + 1e-5)
    np.testing.assert_allclose(sent + feedback.residual["w"], total, atol=1e-6)


def test_error_feedback_drops_a_residual_that_does_not_fit(tmp_path: object) -> None:
    feedback = ErrorFeedback({"w": np.ones((2, 2), np.float32), "gone": np.ones(3, np.float32)})
    out = feedback.correct({"w": np.zeros((3, 3), np.float32)}, "int8")
    np.testing.assert_array_equal(out["w"], 0.0)  # another shape: not added
    assert set(feedback.residual) == {"w"}
    feedback.correct({"w": np.zeros((3, 3), np.float32)}, "float32")
    assert feedback.residual == {}  # lossless: nothing to remember


def test_error_feedback_persists(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "feedback.safetensors"
    feedback = ErrorFeedback()
    feedback.correct({"w": np.array([[1.0, 0.004]], np.float32)}, "int8")
    feedback.save(path)
    np.testing.assert_array_equal(ErrorFeedback.load(path).residual["w"], feedback.residual["w"])
    path.write_bytes(b"not safetensors")
    assert ErrorFeedback.load(path).residual == {}
    assert ErrorFeedback.load(Path(str(tmp_path)) / "missing").residual == {}
