import json
import struct

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
