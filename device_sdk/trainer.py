"""Local training of a round's assignment on the device (PyTorch; CUDA when present, else CPU).

The device receives the global backbone, trains it on its own faces and returns ``delta = local - base``
for every tensor of the base model it trains. What "trains" means is the assignment's algorithm's local
update (``facefl.algorithms``, looked up in the registry), built on the shared loop of
:mod:`facefl.algorithms.local`: FedAvg's CosFace head over the local identities (the device's private
classifier, persisted in its state directory and never sent), FedProx's proximal term, FedFR's public
hard negatives and DFC, FedFace's class embedding. With a task's ``trainable`` parameter groups
(``assignment.trainable_prefixes``) everything else is frozen and the delta holds the trainable tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from facefl.algorithms import registry
from facefl.algorithms.base import AssignmentLike, Hyperparams, RoundInputs, TrainResult
from facefl.algorithms.local import LocalJob, embed_tensor, read_head
from facefl.algorithms.local import freeze_outside as _freeze_outside
from facefl.algorithms.local import train_mode as _train_mode
from facefl.data import preprocessing_for
from facefl.device_state import DFC_FILE, HEAD_FILE, PERSONALIZED_FILE, DeviceState
from facefl.models import backbone_from_weights

from .dataset import LocalDataset

__all__ = [
    "DFC_FILE",
    "HEAD_FILE",
    "PERSONALIZED_FILE",
    "AssignmentLike",
    "RoundInputs",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "load_personalized_model",
]

#: Kept for compatibility: the local-training fields every algorithm shares. Each algorithm's own model
#: is its ``hyperparams`` in ``facefl.algorithms`` (``registry.get(name).hyperparams``).
TrainConfig = Hyperparams

# re-exported for callers and tests of the previous single-module trainer
_ = (_freeze_outside, _train_mode)


class Trainer:
    """Trains assignments on a device.

    Args:
        device: a torch device; default CUDA when ``torch.cuda.is_available()``, else CPU.
        eval_batch_size: batch size for forward passes without gradients (embedding, metrics).
        num_threads: CPU threads for torch while training/embedding (restored afterwards); None leaves
            torch's process-wide setting alone. On small or busy CPUs, 1 is often several times faster
            for these small batches than the default (one thread per core, which spins under contention).
    """

    def __init__(
        self,
        device: str | torch.device | None = None,
        *,
        eval_batch_size: int = 256,
        num_threads: int | None = None,
    ) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if num_threads is not None and num_threads < 1:
            raise ValueError("num_threads must be >= 1")
        self.device = torch.device(device)
        self.eval_batch_size = int(eval_batch_size)
        self.num_threads = num_threads

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        """Run with ``num_threads`` intra-op CPU threads, restoring torch's setting afterwards."""
        if self.num_threads is None:
            yield
            return
        previous = torch.get_num_threads()
        torch.set_num_threads(self.num_threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous)

    # --------------------------------------------------------------------------------------- train

    def train(
        self,
        assignment: AssignmentLike,
        base_weights: Mapping[str, np.ndarray],
        dataset: LocalDataset,
        state_dir: str | Path | None = None,
        *,
        seed: int | None = None,
        inputs: RoundInputs | None = None,
    ) -> TrainResult:
        """Train the assignment's backbone on ``dataset`` and return the delta to upload.

        Args:
            assignment: architecture, embedding_dim, algorithm (a ``facefl.algorithms`` registry name:
                fedavg, fedprox, fedfr, fedface, ...) and hyperparams.
            base_weights: the round's global weights (from ``FederatedClient.download_model``).
            dataset: the device's training images (at least two; FedFace: one identity).
            state_dir: where the device's private state persists across rounds: the local head, and for
                FedFR the DFC module and the personalized backbone (None: fresh, not saved).
            seed: seeds batch order and augmentation (reproducible runs); random when None.
            inputs: what the algorithm downloads before training (``fetch_round_inputs``): FedFR's
                public pack and bank, FedFace's class embedding.
        """
        algorithm = registry.get(assignment.algorithm)
        job = LocalJob(
            assignment=assignment,
            base_weights=base_weights,
            dataset=dataset,
            state_dir=Path(state_dir) if state_dir is not None else None,
            hyperparams_model=algorithm.hyperparams,
            seed=seed,
            inputs=inputs,
            device=self.device,
            eval_batch_size=self.eval_batch_size,
        )
        with self._threads():
            return algorithm.local_update(job)

    # --------------------------------------------------------------------------------------- embed

    def embed(
        self,
        weights: Mapping[str, np.ndarray],
        images: np.ndarray,
        *,
        architecture: str,
        embedding_dim: int | None = None,
    ) -> np.ndarray:
        """L2-normalised embeddings (N, d) float32 of uint8 images (N, S, S, 3) under ``weights``."""
        with self._threads():
            model = self._backbone(architecture, embedding_dim, weights)
            x = self._preprocess(np.asarray(images), architecture)
            return self._embed_tensor(model, x).cpu().numpy().astype(np.float32, copy=False)

    # ----------------------------------------------------------------------------------- internals

    # the stored local head's rows by identity name (state_dir, architecture, embedding_dim)
    _read_head = staticmethod(read_head)

    def _backbone(
        self, architecture: str, embedding_dim: int | None, weights: Mapping[str, np.ndarray]
    ) -> torch.nn.Module:
        model = backbone_from_weights(architecture, embedding_dim, weights)
        return model.to(self.device)

    @staticmethod
    def _preprocess(images: np.ndarray, architecture: str) -> torch.Tensor:
        """uint8 (N, S, S, 3) -> float32 (N, 3, S', S') with the one shared preprocessing (on CPU)."""
        return torch.from_numpy(preprocessing_for(architecture).batch(images))

    def _embed_tensor(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return embed_tensor(model, x, self.device, self.eval_batch_size)


def load_personalized_model(state_dir: str | Path) -> torch.nn.Module:
    """The personalized model a FedFR device keeps in ``state_dir`` (its backbone after the last local
    training, then the DFC converter, L2-normalized), in eval mode; the same module ``facefl export
    --personalized`` writes to ONNX. Raises :class:`facefl.device_state.DeviceStateError` (a ValueError)
    when the state lacks it."""
    return DeviceState(state_dir).personalized_model().module
