"""A stranger bank: unit embeddings of public faces that an exported model carries in its metadata.

A phone's Recognizer sets its open-set threshold on them (``device_sdk.threshold``): people on no phone
give the rate at which ``identify`` accepts a stranger, which the enrolled people's own impostor pairs
cannot measure. The faces come from a public set (an LFW-layout folder contributes its public split only),
are embedded by the exported model itself, and are nobody's enrolled faces, so shipping them with the model
shares nothing a device holds.

Stored as a string (ONNX ``metadata_props`` hold strings): JSON with the format, the shape and the
little-endian float32 values in base64. 2,000 faces x 128 dimensions add ~1.4 MB to the model file.
"""

from __future__ import annotations

import base64
import binascii
import json

import numpy as np

__all__ = ["MAX_STRANGERS", "STRANGER_BANK_KEY", "decode_stranger_bank", "encode_stranger_bank"]

#: The ONNX ``metadata_props`` key of the bank.
STRANGER_BANK_KEY = "facefl.stranger_bank"
#: Bounds on what a model file may make a phone allocate (rows, and dimensions per row).
MAX_STRANGERS = 100_000
MAX_DIM = 4096
_FORMAT = "float32-le"


def encode_stranger_bank(embeddings: np.ndarray) -> str:
    """The metadata string of (N, d) embeddings, stored unit-norm as float32."""
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[1] == 0:
        raise ValueError(f"a stranger bank is a non-empty (N, d) array, got shape {emb.shape}")
    if emb.shape[0] > MAX_STRANGERS or emb.shape[1] > MAX_DIM:
        raise ValueError(f"a stranger bank holds at most {MAX_STRANGERS} x {MAX_DIM}, got {emb.shape}")
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    if not np.all(np.isfinite(emb)) or np.any(norms == 0):
        raise ValueError("a stranger bank's embeddings must be finite and non-zero")
    unit = (emb / norms).astype("<f4")
    return json.dumps(
        {
            "format": _FORMAT,
            "shape": list(unit.shape),
            "data": base64.b64encode(unit.tobytes()).decode("ascii"),
        }
    )


def decode_stranger_bank(text: str) -> np.ndarray:
    """The (N, d) unit float32 embeddings of a metadata string; ValueError saying what is wrong."""
    try:
        record = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"the stranger bank is not JSON: {exc}") from exc
    if not isinstance(record, dict) or set(record) != {"format", "shape", "data"}:
        raise ValueError("the stranger bank must be a JSON object with exactly format, shape and data")
    if record["format"] != _FORMAT:
        raise ValueError(f"unknown stranger bank format {record['format']!r} (expected {_FORMAT!r})")
    shape = record["shape"]
    if (
        not isinstance(shape, list)
        or len(shape) != 2
        or not all(type(n) is int for n in shape)
        or not (0 < shape[0] <= MAX_STRANGERS and 0 < shape[1] <= MAX_DIM)
    ):
        raise ValueError(f"bad stranger bank shape {shape!r} (at most {MAX_STRANGERS} x {MAX_DIM})")
    data = record["data"]
    if not isinstance(data, str) or len(data) > 4 * (shape[0] * shape[1] * 4 + 2) // 3 + 4:
        raise ValueError("the stranger bank's data is not a base64 string of its shape's size")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"the stranger bank's data is not base64: {exc}") from exc
    if len(raw) != shape[0] * shape[1] * 4:
        raise ValueError(
            f"the stranger bank holds {len(raw)} bytes, not the {shape[0] * shape[1] * 4} of shape {shape}"
        )
    bank = np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)
    norms = np.linalg.norm(bank.astype(np.float64), axis=1)
    if not np.all(np.isfinite(bank)) or not np.all(np.abs(norms - 1.0) < 1e-3):
        raise ValueError("the stranger bank's embeddings must be finite unit vectors")
    return bank
