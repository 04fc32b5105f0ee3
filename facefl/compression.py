"""Compressed model updates: float16, and int8 with a scale per tensor or per output channel.

A task's ``policy.update_encoding`` tells devices how to encode their delta; the server accepts every
encoding below whatever the task asks (a device built before compression sends float32), decodes while
it streams the upload in, and validates the decoded values like any other update.

Wire format (safetensors, like every update):

- ``float32`` / ``float16``: each tensor as F32 / F16 under its own name;
- ``int8`` / ``int8_channel``: each tensor of two or more dimensions (the weights: nearly all the bytes)
  as I8 ``q`` under its own name plus an F32 scale ``s`` under ``name + SCALE_SUFFIX``, of shape ``(1,)``
  (int8: one per tensor) or ``(shape[0],)`` (int8_channel: one per output channel); the value is
  ``q * s`` (symmetric, ``|q| <= 127``, ``s = max|x| / 127`` over the tensor or the channel). Tensors of
  fewer dimensions (biases, normalization parameters, an algorithm's extras) stay float32.

Error feedback (an option of the task, run on the device): what quantization dropped from this round's
delta is added to the next round's (:class:`ErrorFeedback`), so that errors do not accumulate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from facefl import codec
from facefl.fileio import atomic_write_bytes

TensorDict = dict[str, np.ndarray]
UpdateEncoding = Literal["float32", "float16", "int8", "int8_channel"]
ENCODINGS: tuple[str, ...] = get_args(UpdateEncoding)
DEFAULT_ENCODING: UpdateEncoding = "float32"

#: dtypes an update may carry on the wire (a model: F32 and F16 only)
UPDATE_DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I8": np.dtype("i1"),
}

#: the name of a quantized tensor's scale is the tensor's name plus this ("#" is in no module's name)
SCALE_SUFFIX = "#scale"
INT8_LEVELS = 127
#: the largest scale accepted: any int8 (|q| <= 128) times it stays finite in float32
MAX_SCALE = float(np.finfo(np.float32).max) / 128
_FLOAT16_MAX = float(np.finfo(np.float16).max)


class CompressionError(codec.CodecError):
    """An update cannot be encoded, or an encoded one is not valid."""


def scale_name(name: str) -> str:
    return name + SCALE_SUFFIX


def is_quantized(encoding: str) -> bool:
    return encoding in ("int8", "int8_channel")


def check_encoding(encoding: str) -> UpdateEncoding:
    if encoding not in ENCODINGS:
        known = ", ".join(ENCODINGS)
        raise CompressionError(f"unknown update encoding {str(encoding)[:32]!r}; known: {known}")
    return encoding  # type: ignore[return-value]


def known_or_default(encoding: object) -> UpdateEncoding:
    """An encoding a server asked for, or float32 when this code does not know it (a newer server):
    float32 is accepted by every server."""
    return encoding if encoding in ENCODINGS else DEFAULT_ENCODING  # type: ignore[return-value]


# ------------------------------------------------------------------------------------ int8 math


def int8_scales(x: np.ndarray, per_channel: bool) -> np.ndarray:
    """float32 scales ``max|x| / 127``: shape (1,), or (x.shape[0],) per output channel (axis 0)."""
    x = np.asarray(x)
    if x.ndim == 0 or x.size == 0:
        raise CompressionError("int8 quantization needs a non-empty tensor of at least one dimension")
    if not np.isfinite(x).all():
        raise CompressionError("cannot quantize NaN or Inf")
    flat = x.reshape(x.shape[0], -1) if per_channel else x.reshape(1, -1)
    absmax = np.abs(flat).max(axis=1).astype(np.float64)
    return (absmax / INT8_LEVELS).astype(np.float32)


def quantize_int8(x: np.ndarray, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """(q int8 of x's shape, scales float32): ``q = round(x / s)`` in [-127, 127]; a zero scale (an
    all-zero tensor or channel) gives q = 0."""
    scales = int8_scales(x, per_channel)
    divisor = np.where(scales > 0, scales, np.float32(1.0)).astype(np.float64)
    shaped = divisor.reshape((-1,) + (1,) * (np.ndim(x) - 1))
    q = np.rint(np.asarray(x, np.float64) / shaped)
    return np.clip(q, -INT8_LEVELS, INT8_LEVELS).astype(np.int8), scales


def check_scales(scales: np.ndarray, shape: tuple[int, ...], name: str = "tensor") -> None:
    """A valid scale tensor for an int8 tensor of ``shape``: float32 of shape (1,) or (shape[0],),
    finite, >= 0 and <= MAX_SCALE (so that every decoded value is finite in float32)."""
    if scales.dtype != np.float32:
        raise CompressionError(f"{name}: scales must be float32, not {scales.dtype}")
    allowed = {(1,)} | ({(shape[0],)} if len(shape) >= 1 else set())
    if tuple(scales.shape) not in allowed:
        raise CompressionError(f"{name}: scale shape {list(scales.shape)} is neither [1] nor [shape[0]]")
    if not np.isfinite(scales).all():
        raise CompressionError(f"{name}: a scale is NaN or Inf")
    if (scales < 0).any() or (scales > MAX_SCALE).any():
        raise CompressionError(f"{name}: scales must lie in [0, {MAX_SCALE:.3g}]")


def dequantize_int8(q: np.ndarray, scales: np.ndarray, name: str = "tensor") -> np.ndarray:
    """float32 ``q * s`` (broadcast over output channels); validates q's dtype and the scales."""
    if q.dtype != np.int8:
        raise CompressionError(f"{name}: quantized values must be int8, not {q.dtype}")
    check_scales(scales, tuple(q.shape), name)
    shaped = scales.reshape((-1,) + (1,) * (q.ndim - 1)) if q.ndim else scales.reshape(())
    return q.astype(np.float32) * shaped


# ------------------------------------------------------------------------------- whole updates


def encode_update(delta: Mapping[str, Any], encoding: str) -> TensorDict:
    """The wire tensors of ``delta`` (NumPy arrays or torch tensors) under ``encoding``.

    Encoding never turns a finite value into a non-finite one: CompressionError for a value beyond
    float16's range under float16, and for NaN/Inf under int8 (no int8 holds them). Under float32 and
    float16 a NaN/Inf is sent as it is, and the server refuses the update (422), as it always did.
    """
    encoding = check_encoding(encoding)
    out: TensorDict = {}
    for name, value in delta.items():
        if name.endswith(SCALE_SUFFIX):
            raise CompressionError(f"tensor name {name!r} ends with the reserved {SCALE_SUFFIX!r}")
        x = np.asarray(codec._to_numpy(value), np.float32)
        if encoding == "float16":
            if x.size and float(np.nanmax(np.abs(np.where(np.isinf(x), 0, x)), initial=0.0)) > _FLOAT16_MAX:
                raise CompressionError(f"tensor {name!r} exceeds float16's range ({_FLOAT16_MAX:g})")
            out[name] = x.astype(np.float16)
        elif is_quantized(encoding) and x.ndim >= 2 and x.size:
            q, scales = quantize_int8(x, per_channel=encoding == "int8_channel")
            out[name], out[scale_name(name)] = q, scales
        else:
            out[name] = x
    return out


def encode_payload(delta: Mapping[str, Any], encoding: str = DEFAULT_ENCODING) -> bytes:
    """The upload body: safetensors bytes of :func:`encode_update` (float32: exactly what
    ``codec.encode(delta)`` always sent)."""
    if check_encoding(encoding) == "float32":
        return codec.encode(delta)
    return codec.encode(encode_update(delta, encoding))


def wire_layout(
    got: Mapping[str, codec.TensorSpec], expected: Mapping[str, codec.TensorSpec]
) -> dict[str, str | None]:
    """Check an encoded update's names, shapes and dtypes against the float tensors ``expected``;
    returns each expected name's scale name (None: sent as F32/F16)."""
    layout: dict[str, str | None] = {}
    for name, spec in expected.items():
        sent = got.get(name)
        if sent is None:
            continue  # reported with the other missing names below
        if sent.shape != spec.shape:
            shapes = f"{list(sent.shape)} != expected {list(spec.shape)}"
            raise CompressionError(f"tensor {name!r}: shape {shapes}")
        if sent.dtype == "I8":
            scale = got.get(scale_name(name))
            allowed = {(1,)} | ({(spec.shape[0],)} if spec.shape else set())
            if scale is None or scale.dtype != "F32" or scale.shape not in allowed:
                need = f"an F32 {scale_name(name)!r} of shape [1] or [shape[0]]"
                raise CompressionError(f"tensor {name!r}: int8 values need {need}")
            layout[name] = scale_name(name)
        elif sent.dtype in ("F32", "F16"):
            layout[name] = None
        else:
            raise CompressionError(f"tensor {name!r}: dtype {sent.dtype} not accepted")
    names = set(expected) | {s for s in layout.values() if s is not None}
    missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - names)
    if missing or extra:
        raise CompressionError(f"tensor names differ: missing {missing[:5]}, unexpected {extra[:5]}")
    return layout


def decode_update(wire: Mapping[str, np.ndarray]) -> TensorDict:
    """float32 tensors from wire tensors (any encoding above), validated: every value finite."""
    out: TensorDict = {}
    for name, value in wire.items():
        if name.endswith(SCALE_SUFFIX):
            if name[: -len(SCALE_SUFFIX)] not in wire:
                raise CompressionError(f"scale {name!r} belongs to no tensor")
            continue
        arr = np.asarray(value)
        if arr.dtype == np.int8:
            scales = wire.get(scale_name(name))
            if scales is None:
                raise CompressionError(f"tensor {name!r}: int8 values without {scale_name(name)!r}")
            out[name] = dequantize_int8(arr, np.asarray(scales), name)
        elif arr.dtype in (np.float32, np.float16):
            if not np.isfinite(arr).all():
                raise CompressionError(f"tensor {name!r} contains NaN or Inf")
            out[name] = arr.astype(np.float32)
        else:
            raise CompressionError(f"tensor {name!r}: dtype {arr.dtype} not accepted")
    return out


def decode_payload(data: bytes) -> TensorDict:
    """float32 tensors of an upload body (any encoding), validated like :func:`decode_update`."""
    return decode_update(codec.decode(data, dtypes=UPDATE_DTYPES))


def payload_bytes(delta: Mapping[str, Any], encoding: str) -> int:
    """Bytes of the upload body of ``delta`` under ``encoding`` (what a device sends per round)."""
    return len(encode_payload(delta, encoding))


# ------------------------------------------------------------------------------ error feedback


class ErrorFeedback:
    """The device's memory of what quantization dropped: :meth:`correct` adds the last residual to a
    new delta and keeps, as the next residual, ``corrected - decode(encode(corrected))``.

    Encoding is deterministic, so the device can compute the residual before the upload encodes the
    corrected delta the same way. A residual whose names or shapes do not match the delta (another
    task, another trainable set) is dropped, as is the whole memory under a lossless encoding.
    """

    def __init__(self, residual: Mapping[str, np.ndarray] | None = None) -> None:
        self.residual: TensorDict = {k: np.asarray(v, np.float32) for k, v in (residual or {}).items()}

    def correct(self, delta: Mapping[str, np.ndarray], encoding: str) -> TensorDict:
        encoding = check_encoding(encoding)
        corrected = {k: np.asarray(v, np.float32) for k, v in delta.items()}
        if encoding == "float32":
            self.residual = {}
            return corrected
        for name, value in corrected.items():
            previous = self.residual.get(name)
            if previous is not None and previous.shape == value.shape:
                corrected[name] = value + previous
        decoded = decode_update(encode_update(corrected, encoding))
        self.residual = {k: corrected[k] - decoded[k] for k in corrected}
        return corrected

    def save(self, path: str | Path) -> None:
        atomic_write_bytes(path, codec.encode(self.residual))

    @classmethod
    def load(cls, path: str | Path) -> ErrorFeedback:
        """The saved residual, or an empty one when there is none (or it cannot be read)."""
        try:
            return cls(codec.load_file(path))
        except (codec.CodecError, OSError):
            return cls()


def relative_error(x: np.ndarray, y: np.ndarray) -> float:
    """``||x - y|| / ||x||`` (0 for two zero tensors), in float64."""
    den = math.sqrt(float(np.sum(np.asarray(x, np.float64) ** 2)))
    num = math.sqrt(float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)))
    return 0.0 if den == 0 and num == 0 else num / den if den else math.inf
