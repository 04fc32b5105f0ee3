"""Named tensors <-> bytes.

Tensors travel as safetensors bytes (a JSON header + raw little-endian buffers), never pickle: a
safetensors payload cannot execute code when it is decoded, and its header can be validated before the
buffers are touched. The core works on NumPy arrays so that the server can aggregate without torch.
"""

from __future__ import annotations

import json
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

# dtypes we accept on the wire; the server converts to float32 for aggregation.
_WIRE_DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("float32"),
    "F16": np.dtype("float16"),
    "F64": np.dtype("float64"),
}


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


def decode(data: bytes) -> TensorDict:
    """Parse safetensors bytes into NumPy arrays; raises CodecError on malformed input."""
    read_header(data)  # validates structure before safetensors allocates anything
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


def read_header(data: bytes | memoryview) -> dict[str, TensorSpec]:
    """Read and check the safetensors header only: names, dtypes, shapes and offsets.

    This is cheap (no tensor data is copied) and strict: offsets must tile the buffer exactly, so a
    truncated or padded payload is refused before any buffer is interpreted.
    """
    if len(data) < 8:
        raise CodecError("payload shorter than the 8-byte safetensors header length")
    (header_len,) = struct.unpack("<Q", bytes(data[:8]))
    if header_len > 100_000_000 or 8 + header_len > len(data):
        raise CodecError("safetensors header length exceeds the payload")
    try:
        header = json.loads(bytes(data[8 : 8 + header_len]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CodecError(f"safetensors header is not JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise CodecError("safetensors header is not a JSON object")
    body_len = len(data) - 8 - header_len
    specs: dict[str, TensorSpec] = {}
    spans: list[tuple[int, int]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise CodecError(f"tensor {name!r}: header entry lacks dtype/shape/data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _WIRE_DTYPES:
            raise CodecError(f"tensor {name!r}: dtype {dtype} not accepted (use F32, F16 or F64)")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise CodecError(f"tensor {name!r}: bad shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise CodecError(f"tensor {name!r}: bad data_offsets {offsets!r}")
        start, end = offsets
        expected = int(np.prod(shape, dtype=np.int64)) * _WIRE_DTYPES[dtype].itemsize
        if end - start != expected or start < 0 or end > body_len:
            raise CodecError(f"tensor {name!r}: data_offsets do not match its shape and dtype")
        spans.append((start, end))
        specs[name] = TensorSpec(shape=tuple(shape), dtype=dtype)
    spans.sort()
    cursor = 0
    for start, end in spans:
        if start != cursor:
            raise CodecError("tensor buffers overlap or leave gaps")
        cursor = end
    if cursor != body_len:
        raise CodecError("payload length does not match the tensors in its header")
    return specs


def read_metadata(data: bytes | memoryview) -> dict[str, str]:
    """The string metadata of a safetensors payload (empty when it has none)."""
    (header_len,) = struct.unpack("<Q", bytes(data[:8]))
    meta = json.loads(bytes(data[8 : 8 + header_len])).get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CodecError("safetensors __metadata__ must map strings to strings")
    return dict(meta)


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
