"""Small models and device state directories for the export and recognizer tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from facefl.checkpoint import save_checkpoint
from facefl.data import synthetic_identity_images
from facefl.models import build_backbone

DIM = 32


def small_backbone(seed: int = 0, dim: int = DIM) -> torch.nn.Module:
    """A random ``small`` backbone with non-trivial BatchNorm statistics (so eval mode matters)."""
    model = build_backbone("small", dim, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    return model.eval()


def write_checkpoint(path: Path, seed: int = 0, dim: int = DIM) -> Path:
    return save_checkpoint(path, small_backbone(seed, dim), "small", dim)


def write_device_state(state_dir: Path, seed: int = 0, dim: int = DIM) -> Path:
    """A device state dir as FedFR's device side writes it: backbone checkpoint + DFC tensors.

    The converter is a random (far from identity) Linear(d, d); ``dfc.safetensors`` also holds binary
    classifier tensors, which the exporter must ignore.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    write_checkpoint(state_dir / "personalized.safetensors", seed, dim)
    rng = np.random.default_rng(seed + 7)
    save_file(
        {
            "converter.weight": rng.normal(0, 0.5, (dim, dim)).astype(np.float32),
            "converter.bias": rng.normal(0, 0.1, dim).astype(np.float32),
            "binary.weight": rng.normal(0, 1, (5, dim)).astype(np.float32),
            "binary.bias": np.zeros(5, np.float32),
        },
        str(state_dir / "dfc.safetensors"),
    )
    return state_dir


def faces(identities: range, per_identity: int, size: int = 64, seed: int = 0) -> np.ndarray:
    """(N, S, S, 3) uint8 generated faces, identity-major."""
    return np.concatenate([synthetic_identity_images(k, per_identity, size, seed) for k in identities])


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("nd,nd->n", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
