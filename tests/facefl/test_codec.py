import json
import struct
from typing import Any

import numpy as np
import pytest

from facefl import codec


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "bn.bias": rng.standard_normal(4).astype(np.float32),
        "half": rng.standard_normal((2, 5)).astype(np.float16),
    }


def test_round_trip_preserves_names_shapes_dtypes_and_values() -> None:
    t = _tensors()
    out = codec.decode(codec.encode(t))
    assert out.keys() == t.keys()
    for k in t:
        assert out[k].dtype == t[k].dtype
        np.testing.assert_array_equal(out[k], t[k])


def test_encode_accepts_torch_tensors() -> None:
    torch = pytest.importorskip("torch")
    out = codec.decode(codec.encode({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}))
    np.testing.assert_array_equal(out["w"], np.arange(6, dtype=np.float32).reshape(2, 3))


def test_payload_is_not_pickle() -> None:
    data = codec.encode(_tensors())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    assert header["conv.weight"]["dtype"] == "F32"
    assert b"\x80\x04" not in data[:2]  # pickle protocol marker


@pytest.mark.parametrize(
    "payload",
    [b"", b"1234", b"\xff" * 8 + b"{}", struct.pack("<Q", 2) + b"[]", struct.pack("<Q", 4) + b"nope"],
)
def test_malformed_payloads_raise_codec_error(payload: bytes) -> None:
    with pytest.raises(codec.CodecError):
        codec.decode(payload)


def test_truncated_and_padded_payloads_are_refused() -> None:
    data = codec.encode(_tensors())
    with pytest.raises(codec.CodecError):
        codec.read_header(data[:-4])
    with pytest.raises(codec.CodecError):
        codec.read_header(data + b"\0\0\0\0")


def test_integer_dtypes_are_refused() -> None:
    data = codec.encode({"x": np.arange(3, dtype=np.int32)})
    with pytest.raises(codec.CodecError, match="dtype"):
        codec.read_header(data)


def test_check_compatible_names_and_shapes() -> None:
    spec = codec.specs_of(_tensors())
    codec.check_compatible(spec, spec)
    bad = dict(spec)
    bad["bn.bias"] = codec.TensorSpec((5,), "F32")
    with pytest.raises(codec.CodecError, match="shape"):
        codec.check_compatible(bad, spec)
    missing = {k: v for k, v in spec.items() if k != "half"}
    with pytest.raises(codec.CodecError, match="missing"):
        codec.check_compatible(missing, spec)


def test_finite_norm_delta_apply() -> None:
    a = {"w": np.array([3.0, 4.0], np.float32)}
    assert codec.global_norm(a) == pytest.approx(5.0)
    with pytest.raises(codec.CodecError):
        codec.check_finite({"w": np.array([1.0, np.nan], np.float32)})
    base = {"w": np.array([1.0, 1.0], np.float32), "b": np.array([2.0], np.float32)}
    d = codec.delta({"w": np.array([2.0, 0.0], np.float32)}, base)
    np.testing.assert_allclose(d["w"], [1.0, -1.0])
    out = codec.apply_delta(base, d, scale=0.5)
    np.testing.assert_allclose(out["w"], [1.5, 0.5])
    np.testing.assert_allclose(out["b"], [2.0])


def _raw(header: object | str, body: bytes = b"") -> bytes:
    text = header if isinstance(header, str) else json.dumps(header)
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw + body


@pytest.mark.parametrize(
    "payload",
    [
        # shapes whose element count overflows int64 (an OverflowError, i.e. a 500, before the fix)
        _raw({"w": {"dtype": "F32", "shape": [2**70], "data_offsets": [0, 4]}}, b"\0" * 4),
        _raw({"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}, b"\0" * 4),
        # a header nested 5,000 levels deep (a RecursionError before the fix)
        _raw("[" * 5000 + "]" * 5000),
        _raw('{"w": ' + "[" * 5000 + "]" * 5000 + "}"),
        _raw({"__metadata__": {"a": {"b": [[[1]]]}}}),
        _raw({"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4),
        _raw({"w": {"dtype": "F32", "shape": [1], "data_offsets": [False, 4]}}, b"\0" * 4),
        _raw({"w": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, b"\0" * 4),
        _raw({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
        _raw({"w": {"dtype": "F32", "shape": [1] * 40, "data_offsets": [0, 4]}}, b"\0" * 4),
        _raw('{"w": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 4]}}', b"\0" * 4),
        _raw('{"w": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}', b"\0" * 4),
        _raw('{"w": 1, "w": 2}'),
        struct.pack("<Q", codec.MAX_HEADER_BYTES + 1) + b"{" + b" " * codec.MAX_HEADER_BYTES + b"}",
    ],
)
def test_crafted_headers_raise_codec_error_only(payload: bytes) -> None:
    with pytest.raises(codec.CodecError):
        codec.read_header(payload)
    with pytest.raises(codec.CodecError):
        codec.decode(payload)
    with pytest.raises(codec.CodecError):
        codec.read_metadata(payload)


def test_float64_is_refused_on_the_wire() -> None:
    data = codec.encode({"x": np.zeros(3, np.float64)})
    with pytest.raises(codec.CodecError, match="F32 or F16"):
        codec.read_header(data)


def test_scan_file_checks_and_norms_in_chunks(tmp_path: Any) -> None:
    rng = np.random.default_rng(1)
    # larger than one chunk, so that the chunk boundaries are exercised
    t = {
        "big": rng.standard_normal(700_000).astype(np.float32),
        "half": rng.standard_normal((3, 5)).astype(np.float16),
        "keep": np.array([0.6, 0.8], np.float32),
    }
    path = tmp_path / "x.safetensors"
    path.write_bytes(codec.encode(t, metadata={"k": "v"}))
    header = codec.read_file_header(path)
    assert header.metadata == {"k": "v"} and header.specs == codec.specs_of(t)
    norm, kept = codec.scan_file(path, header, keep=frozenset({"keep"}))
    expected = codec.global_norm({k: v for k, v in t.items() if k != "keep"})
    assert norm == pytest.approx(expected, rel=1e-9)
    np.testing.assert_array_equal(kept["keep"], t["keep"])
    t["big"][650_000] = np.inf  # in the second chunk
    path.write_bytes(codec.encode(t))
    with pytest.raises(codec.CodecError, match="NaN or Inf"):
        codec.scan_file(path, codec.read_file_header(path))
