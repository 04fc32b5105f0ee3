"""Model checkpoints and resumable training state: safetensors files with JSON metadata, never pickle.

A **model checkpoint** is one safetensors file holding the backbone's floating-point tensors under the
names of :func:`facefl.models.state_to_numpy` -- exactly what the server stores as a model version -- and
string metadata:

    format          "facefl-backbone/1"
    architecture    a key of facefl.models.ARCHITECTURES ("small", "mobilefacenet", "tiny", "dlib-resnet")
    embedding_dim   e.g. "128"
    image_size      e.g. "64" (must be the architecture's input size)
    preprocessing   JSON of facefl.data.Preprocessing.to_dict() (the one preprocessing definition; the
                    architecture's, e.g. dlib's per-channel means for "dlib-resnet")
    metrics         JSON object, free-form (e.g. the LFW verification report of the run)
    extra           JSON object, free-form (e.g. the training recipe)

A **training state** (``<out>.state.safetensors`` beside the checkpoint) holds whatever a trainer needs to
resume -- classifier head, optimizer buffers, the full module state -- as named tensors, plus JSON values
(epoch, step, schedule, seeds, config) in its metadata under format "facefl-train-state/1".

Writes are atomic (temporary file in the same directory + rename), so an interrupted run never leaves a
truncated file where a good one was.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from torch import nn

from facefl.data.preprocess import Preprocessing
from facefl.fileio import atomic_write
from facefl.models import build_backbone, get_architecture, load_numpy_state, state_to_numpy

CHECKPOINT_FORMAT = "facefl-backbone/1"
TRAINING_STATE_FORMAT = "facefl-train-state/1"
_STATE_SUFFIX = ".state.safetensors"


class CheckpointError(ValueError):
    """A checkpoint or training-state file is missing, not safetensors, or not a facefl file."""


@dataclass(frozen=True)
class Checkpoint:
    """A loaded model checkpoint: float32 tensors (state_to_numpy names) and decoded metadata."""

    tensors: dict[str, np.ndarray]
    architecture: str
    embedding_dim: int
    image_size: int
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.metadata["preprocessing"])

    @property
    def metrics(self) -> dict[str, Any]:
        value = self.metadata.get("metrics") or {}
        return dict(value) if isinstance(value, dict) else {}


def _to_float_tensors(model_or_tensors: nn.Module | Mapping[str, Any]) -> dict[str, np.ndarray]:
    if isinstance(model_or_tensors, nn.Module):
        return state_to_numpy(model_or_tensors)
    out: dict[str, np.ndarray] = {}
    for name, value in model_or_tensors.items():
        if hasattr(value, "detach"):  # torch tensor
            value = value.detach().cpu().numpy()
        arr = np.asarray(value)
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"tensor {name!r} has dtype {arr.dtype}; a checkpoint holds float tensors only")
        out[name] = np.ascontiguousarray(arr, dtype=np.float32)
    return out


def _atomic_save(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str], path: Path) -> None:
    atomic_write(path, lambda tmp: save_file(dict(tensors), tmp, metadata=dict(metadata)))


def save_checkpoint(
    path: str | Path,
    model_or_tensors: nn.Module | Mapping[str, Any],
    architecture: str,
    embedding_dim: int | None = None,
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a model checkpoint; returns its path.

    ``model_or_tensors`` is a backbone module or its :func:`state_to_numpy` dict. ``embedding_dim``
    defaults to the module's ``embedding_dim`` attribute. The tensors are checked against a freshly built
    backbone of that architecture and dimension (names and shapes), so an unloadable file is never written.
    """
    arch = get_architecture(architecture)
    if embedding_dim is None:
        embedding_dim = getattr(model_or_tensors, "embedding_dim", None)
        if embedding_dim is None:
            raise ValueError("embedding_dim is required when saving a tensor dict")
    embedding_dim = int(embedding_dim)
    tensors = _to_float_tensors(model_or_tensors)
    try:
        load_numpy_state(build_backbone(arch.name, embedding_dim), tensors)
    except ValueError as exc:
        raise ValueError(
            f"tensors do not fit a {arch.name!r} backbone with d={embedding_dim}: {exc}"
        ) from exc
    preprocessing = arch.preprocessing
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "architecture": arch.name,
        "embedding_dim": str(embedding_dim),
        "image_size": str(arch.image_size),
        "preprocessing": json.dumps(preprocessing.to_dict(), sort_keys=True),
        "metrics": json.dumps(dict(metrics or {}), sort_keys=True, allow_nan=True),
        "extra": json.dumps(dict(extra or {}), sort_keys=True),
    }
    path = Path(path)
    _atomic_save(tensors, metadata, path)
    return path


def _read_safetensors(path: Path, what: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    if not path.exists():
        raise CheckpointError(f"{what} {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{what} {path} is not a file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{what} {path} is not a readable safetensors file: {exc}") from exc
    return tensors, metadata


def _json_field(path: Path, metadata: Mapping[str, str], key: str, default: Any) -> Any:
    if key not in metadata:
        return default
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: metadata {key!r} is not valid JSON: {exc}") from exc


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and validate a model checkpoint (format, architecture, dimension, image size)."""
    path = Path(path)
    tensors, raw = _read_safetensors(path, "checkpoint")
    fmt = raw.get("format")
    if fmt is None:
        raise CheckpointError(
            f"{path} is a safetensors file without a 'format' entry in its metadata: not a facefl "
            f"checkpoint (expected format {CHECKPOINT_FORMAT!r})"
        )
    if fmt != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {fmt!r} (expected {CHECKPOINT_FORMAT!r})")
    if "architecture" not in raw:
        raise CheckpointError(f"{path}: metadata has no 'architecture'")
    try:
        arch = get_architecture(raw["architecture"])
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    try:
        embedding_dim = int(raw["embedding_dim"])
        image_size = int(raw.get("image_size", arch.image_size))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad or missing embedding_dim / image_size metadata ({exc})") from None
    if image_size != arch.image_size:
        raise CheckpointError(
            f"{path}: image_size {image_size} does not match architecture {arch.name!r} ({arch.image_size})"
        )
    # files without it predate per-architecture preprocessing: the architecture's own is what they used
    preprocessing = _json_field(path, raw, "preprocessing", arch.preprocessing.to_dict())
    try:
        if Preprocessing.from_dict(preprocessing).image_size != image_size:
            raise CheckpointError(f"{path}: preprocessing image_size differs from image_size {image_size}")
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: bad preprocessing metadata: {exc}") from None
    metadata: dict[str, Any] = {
        k: v for k, v in raw.items() if k not in {"preprocessing", "metrics", "extra"}
    }
    metadata["preprocessing"] = preprocessing
    metadata["metrics"] = _json_field(path, raw, "metrics", {})
    metadata["extra"] = _json_field(path, raw, "extra", {})
    return Checkpoint(
        tensors={k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()},
        architecture=arch.name,
        embedding_dim=embedding_dim,
        image_size=image_size,
        metadata=metadata,
    )


def build_from_checkpoint(path: str | Path | Checkpoint) -> nn.Module:
    """The backbone of a checkpoint, weights loaded, in eval mode (on CPU)."""
    ckpt = path if isinstance(path, Checkpoint) else load_checkpoint(path)
    model = build_backbone(ckpt.architecture, ckpt.embedding_dim)
    try:
        load_numpy_state(model, ckpt.tensors)
    except ValueError as exc:
        where = path if not isinstance(path, Checkpoint) else "checkpoint"
        raise CheckpointError(f"{where}: {exc}") from None
    return model.eval()


# ---------------------------------------------------------------- training state (resume)


def training_state_path(checkpoint_path: str | Path) -> Path:
    """``model.safetensors`` -> ``model.state.safetensors`` (any other name gets the suffix appended)."""
    p = Path(checkpoint_path)
    if p.suffix == ".safetensors":
        return p.with_name(p.name[: -len(".safetensors")] + _STATE_SUFFIX)
    return p.with_name(p.name + _STATE_SUFFIX)


@dataclass(frozen=True)
class TrainingState:
    """Named tensors (any dtype safetensors stores) and JSON-decoded metadata values."""

    tensors: dict[str, np.ndarray]
    metadata: dict[str, Any]


def save_training_state(path: str | Path, tensors: Mapping[str, Any], metadata: Mapping[str, Any]) -> Path:
    """Write a training state: tensors as-is (torch or NumPy), each metadata value JSON-encoded."""
    arrays: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        arrays[name] = np.require(value, requirements="C")  # unlike ascontiguousarray, keeps 0-d shapes
    meta = {"format": TRAINING_STATE_FORMAT}
    for key, value in metadata.items():
        if key == "format":
            raise ValueError("'format' is a reserved training-state metadata key")
        meta[key] = json.dumps(value, sort_keys=True)
    path = Path(path)
    _atomic_save(arrays, meta, path)
    return path


def load_training_state(path: str | Path) -> TrainingState:
    path = Path(path)
    tensors, raw = _read_safetensors(path, "training state")
    fmt = raw.pop("format", None)
    if fmt != TRAINING_STATE_FORMAT:
        raise CheckpointError(
            f"{path}: not a facefl training state (format {fmt!r}, expected {TRAINING_STATE_FORMAT!r})"
        )
    meta = {key: _json_field(path, raw, key, None) for key in raw}
    return TrainingState(tensors=dict(tensors), metadata=meta)
