"""facefl.update_stream: one-pass validation of an update fed in arbitrary chunks."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest

from facefl import codec, compression
from facefl.codec import CodecError, TensorSpec
from facefl.update_stream import UpdateScanner

EXPECTED = {
    "conv.weight": TensorSpec((6, 3, 3, 3), "F32"),
    "conv.bias": TensorSpec((6,), "F32"),
    "fc.weight": TensorSpec((5, 7), "F32"),
    "extra": TensorSpec((4,), "F32"),
}


def _delta(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(s.shape) * 0.1).astype(np.float32) for n, s in EXPECTED.items()}


def _scan(payload: bytes, chunks: list[int], keep: frozenset[str] = frozenset({"extra"})) -> object:
    scanner = UpdateScanner(EXPECTED, keep)
    pos = 0
    i = 0
    while pos < len(payload):
        step = chunks[i % len(chunks)]
        scanner.feed(payload[pos : pos + step])
        pos += step
        i += 1
    return scanner.finish()


def _decoded_norm(payload: bytes, keep: set[str]) -> float:
    decoded = compression.decode_payload(payload)
    return math.sqrt(
        sum(float(np.sum(v.astype(np.float64) ** 2)) for k, v in decoded.items() if k not in keep)
    )


@pytest.mark.parametrize("encoding", compression.ENCODINGS)
@pytest.mark.parametrize("chunks", [[1], [3, 5, 7], [4096], [1 << 20]])
def test_norm_and_kept_tensors_match_the_decoded_update(encoding: str, chunks: list[int]) -> None:
    payload = compression.encode_payload(_delta(), encoding)
    result = _scan(payload, chunks)
    # the scanner's q * s is exact (float64); decode_payload rounds each product to float32
    assert math.isclose(result.norm, _decoded_norm(payload, {"extra"}), rel_tol=1e-6)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(result.kept["extra"], compression.decode_payload(payload)["extra"])  # type: ignore[attr-defined]
    assert result.size == len(payload)  # type: ignore[attr-defined]


def _raw_safetensors(entries: list[tuple[str, str, list[int], bytes]]) -> bytes:
    """A safetensors payload with the data in the order given (the library sorts by dtype)."""
    header: dict[str, object] = {}
    offset = 0
    for name, dtype, shape, data in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"".join(e[3] for e in entries)


def test_scales_may_follow_their_values() -> None:
    """sum_c s_c^2 * sum q^2: the norm does not need the scales first (a hand-built order)."""
    q = np.array([[3, -4], [0, 12]], np.int8)
    s = np.array([0.5, 0.25], np.float32)
    payload = _raw_safetensors([("w", "I8", [2, 2], q.tobytes()), ("w#scale", "F32", [2], s.tobytes())])
    result = UpdateScanner({"w": TensorSpec((2, 2), "F32")})
    result.feed(payload)
    # by hand: (0.5 * 3)^2 + (0.5 * 4)^2 + (0.25 * 12)^2 = 2.25 + 4 + 9
    assert result.finish().norm == pytest.approx(math.sqrt(15.25), rel=1e-12)


def test_norm_by_hand_for_float16() -> None:
    payload = codec.encode({"w": np.array([[3.0, 4.0]], np.float16)})
    scanner = UpdateScanner({"w": TensorSpec((1, 2), "F32")})
    scanner.feed(payload)
    assert scanner.finish().norm == 5.0


def test_finite_values_whose_float32_squares_overflow_get_the_exact_norm() -> None:
    """3e20^2 is past float32's range: the one-pass float32 sum overflows, and the float64 pass answers."""
    payload = codec.encode({"w": np.array([[3e20, 4e20]], np.float32)})
    scanner = UpdateScanner({"w": TensorSpec((1, 2), "F32")})
    scanner.feed(payload)
    assert scanner.finish().norm == pytest.approx(5e20, rel=1e-6)


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_a_non_finite_value_among_many_is_refused_with_its_tensor(bad: float) -> None:
    delta = {"a": np.ones(10_000, np.float32), "b": np.full(50_000, 0.5, np.float32)}
    delta["b"][31_337] = bad
    payload = codec.encode(delta)
    scanner = UpdateScanner({"a": TensorSpec((10_000,), "F32"), "b": TensorSpec((50_000,), "F32")})
    with pytest.raises(CodecError, match=r"'b' contains NaN or Inf"):
        scanner.feed(payload)


def _refused(payload: bytes, match: str, chunk: int = 7) -> None:
    scanner = UpdateScanner(EXPECTED, frozenset({"extra"}))
    with pytest.raises(CodecError, match=match):
        for pos in range(0, len(payload), chunk):
            scanner.feed(payload[pos : pos + chunk])
        scanner.finish()


def test_nan_in_the_data_is_refused_while_streaming() -> None:
    delta = _delta()
    delta["fc.weight"][2, 3] = np.nan
    payload = codec.encode(delta)
    scanner = UpdateScanner(EXPECTED, frozenset({"extra"}))
    nan_at = payload.index(np.float32(np.nan).tobytes())
    with pytest.raises(CodecError, match=r"'fc\.weight' contains NaN or Inf"):
        scanner.feed(payload[: nan_at + 4])  # refused before the rest arrives, naming the tensor


def test_a_wrong_header_is_refused_before_any_data() -> None:
    delta = _delta()
    delta["fc.weight"] = np.zeros((5, 8), np.float32)
    payload = codec.encode(delta)
    header_end = 8 + struct.unpack("<Q", payload[:8])[0]
    scanner = UpdateScanner(EXPECTED)
    with pytest.raises(CodecError, match="shape"):
        scanner.feed(payload[:header_end])


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda p: p[:-1], "shorter"),
        (lambda p: p + b"\0", "longer"),
        (lambda p: p[:20], "inside its safetensors header"),
        (lambda p: struct.pack("<Q", 1 << 40) + p[8:], "larger than"),
        (lambda p: p[:8] + b"[" + p[9:], "not JSON"),
    ],
)
def test_malformed_payloads_are_refused(mutate: object, match: str) -> None:
    _refused(mutate(codec.encode(_delta())), match)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("scales", "match"),
    [
        (np.array([np.nan] * 6, np.float32), "NaN or Inf"),
        (np.array([-1.0] * 6, np.float32), "must lie in"),
        (np.array([np.float32(3e38)] * 6, np.float32), "must lie in"),
    ],
)
def test_hostile_scales_are_refused(scales: np.ndarray, match: str) -> None:
    wire = compression.encode_update(_delta(), "int8_channel")
    wire["conv.weight#scale"] = scales
    _refused(codec.encode(wire), match)


def test_an_int8_tensor_without_its_scale_is_refused() -> None:
    wire = compression.encode_update(_delta(), "int8")
    del wire["fc.weight#scale"]
    _refused(codec.encode(wire), "need")
