"""The device's private state folder and its one owner, :class:`DeviceState`.

A device keeps what must survive between rounds and never leaves it in one directory:

- ``local_head.safetensors``: its CosFace head over its own identities (every algorithm), tensor
  ``weight`` (n, d) with ``identities`` and ``architecture`` in the metadata;
- ``dfc.safetensors``: FedFR's DFC module, ``converter.weight`` (d, d), ``converter.bias`` (d,) and one
  binary classifier per identity (``weight``, ``bias``), with the same metadata;
- ``personalized.safetensors``: FedFR's backbone after the device's last local training (a facefl
  checkpoint): next round's contrastive negative, and the trunk of the personalized model.

The training side (:mod:`facefl.algorithms`, through the SDK's ``Trainer``) writes the folder and reads it
leniently: a missing, unreadable or other-model file means "start fresh". The export side
(``facefl export --personalized``, ``device_sdk.load_personalized_model``) reads it strictly: a missing or
malformed file is a :class:`DeviceStateError` that says what is wrong.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from facefl import codec
from facefl.checkpoint import (
    Checkpoint,
    CheckpointError,
    build_from_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from facefl.data import Preprocessing
from facefl.fileio import atomic_write_bytes, sha256_file
from facefl.models.embedding_graph import EmbeddingGraph

__all__ = [
    "DFC_FILE",
    "FEEDBACK_FILE",
    "HEAD_FILE",
    "PERSONALIZED_FILE",
    "DeviceState",
    "DeviceStateError",
    "PersonalizedModel",
    "StoredRows",
]

HEAD_FILE = "local_head.safetensors"
DFC_FILE = "dfc.safetensors"
PERSONALIZED_FILE = "personalized.safetensors"
# what update encoding dropped so far (error feedback, facefl.compression.ErrorFeedback)
FEEDBACK_FILE = "update_residual.safetensors"


class DeviceStateError(ValueError):
    """The state folder lacks a file the caller needs, or holds one that cannot be read as such."""


@dataclass(frozen=True)
class StoredRows:
    """A stored per-identity module (the local head, the DFC module): its tensors and row names."""

    tensors: dict[str, np.ndarray]
    identities: tuple[str, ...]


@dataclass(frozen=True)
class PersonalizedModel:
    """A FedFR device's personalized model: backbone then DFC converter, L2-normalised (eval mode)."""

    module: EmbeddingGraph
    preprocessing: Preprocessing
    architecture: str
    embedding_dim: int
    sha256: str  # of the backbone and DFC files together: names an export of exactly this state


class DeviceState:
    """The state folder at ``root`` (created on the first write)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def head_path(self) -> Path:
        return self.root / HEAD_FILE

    @property
    def dfc_path(self) -> Path:
        return self.root / DFC_FILE

    @property
    def personalized_path(self) -> Path:
        return self.root / PERSONALIZED_FILE

    @property
    def feedback_path(self) -> Path:
        return self.root / FEEDBACK_FILE

    # ----------------------------------------------------------------------------- the local head

    def load_head(self, architecture: str, embedding_dim: int) -> dict[str, np.ndarray]:
        """The stored head's rows by identity name (empty if absent, unreadable or of another model)."""
        stored = self._read_rows(self.head_path, architecture)
        if stored is None or stored.tensors.get("weight", np.empty(0)).shape != (
            len(stored.identities),
            embedding_dim,
        ):
            return {}
        weight = stored.tensors["weight"]
        return {name: weight[i].astype(np.float32) for i, name in enumerate(stored.identities)}

    def save_head(self, weight: Any, identities: Sequence[str], architecture: str) -> None:
        """Persist the head's rows (one per identity, in ``identities`` order), atomically."""
        self._write_rows(self.head_path, {"weight": weight}, identities, architecture)

    # ------------------------------------------------------------------------------ FedFR's DFC module

    def load_dfc(self, architecture: str, embedding_dim: int) -> StoredRows | None:
        """The stored DFC module (None if absent, unreadable, or of another model)."""
        stored = self._read_rows(self.dfc_path, architecture)
        if stored is None:
            return None
        t = stored.tensors
        n, d = len(stored.identities), embedding_dim
        shapes = {"converter.weight": (d, d), "converter.bias": (d,), "weight": (n, d), "bias": (n,)}
        if any(name not in t or t[name].shape != shape for name, shape in shapes.items()):
            return None
        return stored

    def save_dfc(self, tensors: Mapping[str, Any], identities: Sequence[str], architecture: str) -> None:
        """Persist the DFC module's tensors (converter and per-identity classifiers), atomically."""
        self._write_rows(self.dfc_path, tensors, identities, architecture)

    def dfc_converter(self, embedding_dim: int) -> nn.Linear:
        """The converter ``Linear(d, d)`` of the DFC file (its other tensors are ignored), strictly read."""
        path = self.dfc_path
        if not path.is_file():
            raise DeviceStateError(f"DFC file {path} does not exist")
        try:
            with safe_open(str(path), framework="numpy") as f:
                names = set(f.keys())
                missing = {"converter.weight", "converter.bias"} - names
                if missing:
                    absent, found = ", ".join(sorted(missing)), ", ".join(sorted(names))
                    raise DeviceStateError(f"{path} has no {absent} (tensors found: {found})")
                weight = f.get_tensor("converter.weight")
                bias = f.get_tensor("converter.bias")
        except (SafetensorError, OSError) as exc:
            raise DeviceStateError(f"{path} is not a readable safetensors file: {exc}") from exc
        d = int(embedding_dim)
        if weight.shape != (d, d) or bias.shape != (d,):
            raise DeviceStateError(
                f"{path}: converter has weight {tuple(weight.shape)} and bias {tuple(bias.shape)}; the "
                f"backbone's embedding dimension is {d}, so ({d}, {d}) and ({d},) are required"
            )
        converter = nn.Linear(d, d)
        with torch.no_grad():
            converter.weight.copy_(torch.from_numpy(weight.astype("float32")))
            converter.bias.copy_(torch.from_numpy(bias.astype("float32")))
        return converter.eval()

    # ---------------------------------------------------------------- FedFR's personalized backbone

    def load_previous_backbone(self, architecture: str, embedding_dim: int) -> Checkpoint | None:
        """The backbone of the device's last local training (None: first round, unreadable, other model)."""
        if not self.personalized_path.exists():
            return None
        try:
            ckpt = load_checkpoint(self.personalized_path)
        except (CheckpointError, ValueError, OSError):
            return None
        if ckpt.architecture != architecture or ckpt.embedding_dim != embedding_dim:
            return None
        return ckpt

    def save_personalized(
        self, tensors: Mapping[str, np.ndarray], architecture: str, embedding_dim: int
    ) -> None:
        """Persist the backbone after local training as a facefl checkpoint (atomically)."""
        self.root.mkdir(parents=True, exist_ok=True)
        save_checkpoint(self.personalized_path, tensors, architecture, embedding_dim)

    def personalized_model(self) -> PersonalizedModel:
        """The personalized model (backbone + DFC converter), strictly read: DeviceStateError says what is
        missing or malformed."""
        if not self.root.is_dir():
            raise DeviceStateError(f"device state directory {self.root} does not exist")
        if not self.personalized_path.is_file():
            raise DeviceStateError(
                f"{self.root} has no {PERSONALIZED_FILE} (the device's personalized backbone)"
            )
        try:
            ckpt = load_checkpoint(self.personalized_path)
            backbone = build_from_checkpoint(ckpt)
        except CheckpointError as exc:
            raise DeviceStateError(str(exc)) from exc
        converter = self.dfc_converter(ckpt.embedding_dim)
        digest = hashlib.sha256()
        for part in (self.personalized_path, self.dfc_path):
            digest.update(sha256_file(part).encode())
        return PersonalizedModel(
            module=EmbeddingGraph(backbone, converter).eval(),
            preprocessing=ckpt.preprocessing,
            architecture=ckpt.architecture,
            embedding_dim=ckpt.embedding_dim,
            sha256=digest.hexdigest(),
        )

    # ------------------------------------------------------------------------------------ internals

    @staticmethod
    def _read_rows(path: Path, architecture: str) -> StoredRows | None:
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="numpy") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open API)
            names = json.loads(meta.get("identities", "[]"))
        except (OSError, ValueError, SafetensorError, json.JSONDecodeError):
            return None  # unreadable state: the caller starts fresh
        if meta.get("architecture") != architecture or not isinstance(names, list):
            return None
        return StoredRows(tensors=tensors, identities=tuple(str(n) for n in names))

    def _write_rows(
        self, path: Path, tensors: Mapping[str, Any], identities: Sequence[str], architecture: str
    ) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        as_float = {
            name: (t.detach().cpu().float() if isinstance(t, torch.Tensor) else np.asarray(t, np.float32))
            for name, t in tensors.items()
        }
        data = codec.encode(
            as_float, metadata={"identities": json.dumps(list(identities)), "architecture": architecture}
        )
        atomic_write_bytes(path, data)
