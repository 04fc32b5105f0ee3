"""Named tensors <-> bytes.

Tensors travel as safetensors bytes (a JSON header + raw little-endian buffers), never pickle: a
safetensors payload cannot execute code when it is decoded, and its header can be validated before the
buffers are touched. The core works on NumPy arrays so that the server can aggregate without torch.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as _st_load
from safetensors.numpy import load_file as _st_load_file
from safetensors.numpy import save as _st_save

TensorDict = dict[str, np.ndarray]

# dtypes we accept on the wire (docs/protocol.md: float32 or float16); the server converts to float32
# for aggregation. float64 is refused: it doubles the bytes for no precision a delta needs.
_WIRE_DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("float32"),
    "F16": np.dtype("float16"),
}


#: Upper bound on a safetensors JSON header (a model's header is tens of KB): larger ones are refused
#: before they are parsed.
MAX_HEADER_BYTES = 4 << 20
MAX_NDIM = 16
_CHUNK_BYTES = 1 << 20


class CodecError(ValueError):
    """The bytes are not a valid named-tensor payload."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one tensor: what a payload must match."""

    shape: tuple[int, ...]
    dtype: str  # safetensors dtype code, e.g. "F32"


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    # torch tensors (without importing torch here): detach -> cpu -> numpy
    if hasattr(value, "detach"):
        return value.detach().cpu().contiguous().numpy()
    return np.asarray(value)


def encode(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize named tensors (NumPy arrays or torch tensors) to safetensors bytes."""
    arrays = {name: np.ascontiguousarray(_to_numpy(t)) for name, t in tensors.items()}
    return _st_save(arrays, metadata=dict(metadata) if metadata else None)


def decode(
    data: bytes,
    *,
    max_header_bytes: int = MAX_HEADER_BYTES,
    dtypes: Mapping[str, np.dtype[Any]] = _WIRE_DTYPES,
) -> TensorDict:
    """Parse safetensors bytes into NumPy arrays; raises CodecError on malformed input."""
    # validates the structure before safetensors allocates anything
    read_header(data, max_header_bytes=max_header_bytes, dtypes=dtypes)
    try:
        return dict(_st_load(data))
    except (SafetensorError, ValueError, TypeError) as exc:
        raise CodecError(f"malformed safetensors payload: {exc}") from exc


def load_file(path: str | Path) -> TensorDict:
    """Load a safetensors file (memory-mapped by the library, then copied per tensor)."""
    try:
        return dict(_st_load_file(str(path)))
    except (SafetensorError, ValueError, OSError) as exc:
        raise CodecError(f"malformed safetensors file {path}: {exc}") from exc


def _refuse_constant(name: str) -> Any:
    raise CodecError(f"safetensors header holds {name}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise CodecError("safetensors header repeats a key")
    return out


def _parse_header(
    raw: bytes, body_len: int
) -> tuple[dict[str, TensorSpec], dict[str, str], dict[str, tuple[int, int]]]:
    """Strictly typed checks of every header field; offsets must tile ``body_len`` bytes exactly."""
    specs, meta, spans, _ = parse_header(raw, body_len)
    return specs, meta, spans


def parse_header(
    raw: bytes, body_len: int | None, dtypes: Mapping[str, np.dtype[Any]] = _WIRE_DTYPES
) -> tuple[dict[str, TensorSpec], dict[str, str], dict[str, tuple[int, int]], int]:
    """Strictly typed checks of every header field, dtypes among ``dtypes``; the offsets must tile the
    data section exactly. ``body_len=None``: the length is not known yet (a body still streaming), the
    tiling defines it; returns (specs, metadata, offsets, data section length)."""
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)
    except RecursionError as exc:  # a deeply nested header
        raise CodecError("safetensors header is nested too deeply") from exc
    except ValueError as exc:  # not UTF-8, not JSON, or an integer too long to convert
        raise CodecError(f"safetensors header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise CodecError("safetensors header is not a JSON object")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CodecError("safetensors __metadata__ must map strings to strings")
    specs: dict[str, TensorSpec] = {}
    spans: dict[str, tuple[int, int]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise CodecError(f"tensor {name!r}: header entry lacks dtype/shape/data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in dtypes:
            accepted = " or ".join(dtypes)
            raise CodecError(f"tensor {name!r}: dtype {str(dtype)[:16]!r} not accepted (use {accepted})")
        if not (
            isinstance(shape, list)
            and len(shape) <= MAX_NDIM
            and all(type(d) is int and d >= 0 for d in shape)  # type(): bool is an int too
        ):
            raise CodecError(f"tensor {name!r}: bad shape {str(shape)[:64]}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise CodecError(f"tensor {name!r}: bad data_offsets {str(offsets)[:64]}")
        start, end = offsets
        # Python integers: a shape such as [2**70] cannot overflow, it just does not match the offsets
        expected = math.prod(shape) * dtypes[dtype].itemsize
        if start < 0 or (body_len is not None and end > body_len) or end - start != expected:
            raise CodecError(f"tensor {name!r}: data_offsets do not match its shape and dtype")
        spans[name] = (start, end)
        specs[name] = TensorSpec(shape=tuple(shape), dtype=dtype)
    cursor = 0
    for start, end in sorted(spans.values()):
        if start != cursor:
            raise CodecError("tensor buffers overlap or leave gaps")
        cursor = end
    if body_len is not None and cursor != body_len:
        raise CodecError("payload length does not match the tensors in its header")
    return specs, dict(meta), spans, cursor


def _header_length(prefix: bytes, total: int, max_header_bytes: int) -> int:
    if len(prefix) < 8:
        raise CodecError("payload shorter than the 8-byte safetensors header length")
    (header_len,) = struct.unpack("<Q", prefix[:8])
    if header_len > max_header_bytes:
        raise CodecError(f"safetensors header is larger than {max_header_bytes} bytes")
    if 8 + header_len > total:
        raise CodecError("safetensors header length exceeds the payload")
    return int(header_len)


def read_header(
    data: bytes | memoryview,
    *,
    max_header_bytes: int = MAX_HEADER_BYTES,
    dtypes: Mapping[str, np.dtype[Any]] = _WIRE_DTYPES,
) -> dict[str, TensorSpec]:
    """Read and check the safetensors header only: names, dtypes, shapes and offsets.

    This is cheap (no tensor data is copied) and strict: every field must have its exact JSON type,
    the header is bounded in size, and offsets must tile the buffer exactly, so a truncated or padded
    payload is refused before any buffer is interpreted. Malformed input raises CodecError, never
    anything else.
    """
    header_len = _header_length(bytes(data[:8]), len(data), max_header_bytes)
    specs, _, _, _ = parse_header(bytes(data[8 : 8 + header_len]), len(data) - 8 - header_len, dtypes)
    return specs


def read_metadata(data: bytes | memoryview, *, max_header_bytes: int = MAX_HEADER_BYTES) -> dict[str, str]:
    """The string metadata of a safetensors payload (empty when it has none); checks the header too."""
    header_len = _header_length(bytes(data[:8]), len(data), max_header_bytes)
    _, meta, _ = _parse_header(bytes(data[8 : 8 + header_len]), len(data) - 8 - header_len)
    return meta


@dataclass(frozen=True)
class FileHeader:
    specs: dict[str, TensorSpec]
    metadata: dict[str, str]
    data_start: int  # file offset of the first tensor byte
    offsets: dict[str, tuple[int, int]]  # per tensor, relative to data_start


def read_file_header(
    path: str | Path,
    *,
    max_header_bytes: int = MAX_HEADER_BYTES,
    dtypes: Mapping[str, np.dtype[Any]] = _WIRE_DTYPES,
) -> FileHeader:
    """:func:`read_header` for a file, reading the header only (memory independent of the file size)."""
    with Path(path).open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        header_len = _header_length(f.read(8), size, max_header_bytes)
        raw = f.read(header_len)
    specs, meta, offsets, _ = parse_header(raw, size - 8 - header_len, dtypes)
    return FileHeader(specs, meta, 8 + header_len, offsets)


def scan_file(
    path: str | Path, header: FileHeader, keep: frozenset[str] = frozenset()
) -> tuple[float, TensorDict]:
    """Check every tensor of a safetensors file for NaN/Inf, reading it in 1 MiB chunks.

    Returns the global L2 norm (float64 accumulation) of the tensors not in ``keep`` and the arrays of
    those in ``keep`` (meant for small tensors). Memory stays at one chunk whatever the file size.
    """
    buf = bytearray(_CHUNK_BYTES)
    view = memoryview(buf)
    total = 0.0
    kept: TensorDict = {}
    with Path(path).open("rb") as f:
        for name, (start, end) in sorted(header.offsets.items(), key=lambda kv: kv[1]):
            spec = header.specs[name]
            dtype = _WIRE_DTYPES[spec.dtype].newbyteorder("<")
            step = _CHUNK_BYTES - _CHUNK_BYTES % dtype.itemsize
            f.seek(header.data_start + start)
            parts: list[np.ndarray] = []
            remaining = end - start
            while remaining > 0:
                want = min(step, remaining)
                got = f.readinto(view[:want])
                if got != want:
                    raise CodecError(f"tensor {name!r}: file ends early")
                chunk = np.frombuffer(buf, dtype=dtype, count=want // dtype.itemsize)
                if not np.isfinite(chunk).all():
                    raise CodecError(f"tensor {name!r} contains NaN or Inf")
                if name in keep:
                    parts.append(chunk.copy())
                else:
                    c64 = chunk.astype(np.float64)
                    total += float(np.einsum("i,i->", c64, c64))
                remaining -= want
            if name in keep:
                flat = np.concatenate(parts) if parts else np.zeros(0, dtype)
                kept[name] = flat.reshape(spec.shape)
    return total**0.5, kept


def specs_of(tensors: Mapping[str, np.ndarray]) -> dict[str, TensorSpec]:
    """The TensorSpec of each array (float32 -> "F32", ...)."""
    codes = {v: k for k, v in _WIRE_DTYPES.items()}
    out: dict[str, TensorSpec] = {}
    for name, arr in tensors.items():
        if arr.dtype not in codes:
            raise CodecError(f"tensor {name!r}: dtype {arr.dtype} has no wire code")
        out[name] = TensorSpec(shape=tuple(arr.shape), dtype=codes[arr.dtype])
    return out


def check_compatible(got: Mapping[str, TensorSpec], expected: Mapping[str, TensorSpec]) -> None:
    """Raise CodecError unless `got` has exactly the expected names and shapes (any float dtype)."""
    missing = sorted(expected.keys() - got.keys())
    extra = sorted(got.keys() - expected.keys())
    if missing or extra:
        raise CodecError(f"tensor names differ: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, spec in expected.items():
        if got[name].shape != spec.shape:
            raise CodecError(f"tensor {name!r}: shape {list(got[name].shape)} != expected {list(spec.shape)}")


def check_finite(tensors: Mapping[str, np.ndarray]) -> None:
    """Raise CodecError if any tensor holds NaN or Inf."""
    for name, arr in tensors.items():
        if not np.isfinite(arr).all():
            raise CodecError(f"tensor {name!r} contains NaN or Inf")


def global_norm(tensors: Mapping[str, np.ndarray]) -> float:
    """L2 norm of all tensors taken together (float64 accumulation)."""
    total = 0.0
    for arr in tensors.values():
        # einsum rather than a @ a: BLAS dot spins up its thread pool, which is slow on a busy server
        total += float(np.einsum("i,i->", arr.ravel(), arr.ravel(), dtype=np.float64))
    return total**0.5


def delta(new: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> TensorDict:
    """new - base for each name of `new` (float32)."""
    return {k: (np.asarray(new[k], np.float32) - np.asarray(base[k], np.float32)) for k in new}


def apply_delta(
    base: Mapping[str, np.ndarray], update: Mapping[str, np.ndarray], scale: float = 1.0
) -> TensorDict:
    """base + scale * update; names absent from `update` are copied from `base`."""
    out: TensorDict = {}
    for k, v in base.items():
        v32 = np.asarray(v, np.float32)
        out[k] = v32 + np.float32(scale) * np.asarray(update[k], np.float32) if k in update else v32.copy()
    return out
