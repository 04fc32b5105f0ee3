"""Local training of a round's assignment on the device (PyTorch; CUDA when present, else CPU).

The device receives the global backbone, trains it on its own faces with a CosFace head over its local
identities, and returns ``delta = local - base`` for every tensor of the base model. The local head is the
device's private classifier: it is persisted in the device's state directory across rounds (initialised
the first time from the mean embedding of each local identity under the received model) and never leaves
the device.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

from facefl import codec
from facefl.algorithms.fedprox import proximal_term
from facefl.data import preprocessing_for
from facefl.models import CosFaceHead, build_backbone, load_numpy_state, state_to_numpy

from .dataset import LocalDataset

__all__ = ["AssignmentLike", "TrainConfig", "TrainResult", "Trainer"]

HEAD_FILE = "local_head.safetensors"


class AssignmentLike(Protocol):
    """What the trainer needs from an assignment (``device_sdk.Assignment`` satisfies it)."""

    @property
    def architecture(self) -> str: ...

    @property
    def embedding_dim(self) -> int | None: ...

    @property
    def algorithm(self) -> str: ...

    @property
    def hyperparams(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class TrainConfig:
    """Local-training hyper-parameters (the task's ``hyperparams``; unknown keys are ignored)."""

    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    mu: float = 0.0
    scale: float = 30.0
    margin: float = 0.4

    @classmethod
    def from_hyperparams(cls, hp: Mapping[str, Any]) -> TrainConfig:
        defaults = cls()
        try:
            cfg = cls(
                local_epochs=int(hp.get("local_epochs", defaults.local_epochs)),
                batch_size=int(hp.get("batch_size", defaults.batch_size)),
                lr=float(hp.get("lr", defaults.lr)),
                momentum=float(hp.get("momentum", defaults.momentum)),
                weight_decay=float(hp.get("weight_decay", defaults.weight_decay)),
                mu=float(hp.get("mu", defaults.mu) or 0.0),
                scale=float(hp.get("scale", defaults.scale)),
                margin=float(hp.get("margin", defaults.margin)),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bad hyper-parameters {dict(hp)!r}: {exc}") from exc
        if cfg.local_epochs < 1 or cfg.batch_size < 2:
            raise ValueError("local_epochs must be >= 1 and batch_size >= 2")
        if not (cfg.lr > 0 and cfg.momentum >= 0 and cfg.weight_decay >= 0 and cfg.mu >= 0):
            raise ValueError("lr must be > 0; momentum, weight_decay and mu must be >= 0")
        return cfg


@dataclass(frozen=True)
class TrainResult:
    """What a round of local training produced; only ``delta``, ``num_samples`` and ``metrics`` are sent."""

    delta: dict[str, np.ndarray]
    num_samples: int
    metrics: dict[str, float]
    seconds: float


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
    ) -> TrainResult:
        """Train the assignment's backbone on ``dataset`` and return the delta to upload.

        Args:
            assignment: architecture, embedding_dim, algorithm ("fedavg" | "fedprox") and hyperparams.
            base_weights: the round's global weights (from ``FederatedClient.download_model``).
            dataset: the device's training images (at least two).
            state_dir: where the local head persists across rounds (None: a fresh head, not saved).
            seed: seeds batch order and augmentation (reproducible runs); random when None.
        """
        with self._threads():
            return self._train(assignment, base_weights, dataset, state_dir, seed)

    def _train(
        self,
        assignment: AssignmentLike,
        base_weights: Mapping[str, np.ndarray],
        dataset: LocalDataset,
        state_dir: str | Path | None,
        seed: int | None,
    ) -> TrainResult:
        started = time.perf_counter()
        algorithm = assignment.algorithm.lower()
        if algorithm not in ("fedavg", "fedprox"):
            raise ValueError(f"the trainer implements fedavg and fedprox, not {assignment.algorithm!r}")
        cfg = TrainConfig.from_hyperparams(assignment.hyperparams)
        if len(dataset) < 2:
            raise ValueError("local training needs at least two images")
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(seed) if seed is not None else int(torch.seed() % (2**63)))

        model = self._backbone(assignment.architecture, assignment.embedding_dim, base_weights)
        x_all = self._preprocess(dataset.images, assignment.architecture)
        y_all = torch.from_numpy(dataset.labels).to(self.device)
        embedding_dim = self._embedding_dim(model)

        emb_before = self._embed_tensor(model, x_all)  # eval mode, under the received model
        head = self._load_or_init_head(
            state_dir, dataset, emb_before, embedding_dim, cfg, assignment.architecture
        )
        loss_before, _ = self._score(head, emb_before, y_all)

        # FedProx: mu/2 ||w - w_global||^2 against this round's global weights (a frozen copy)
        global_params: dict[str, torch.Tensor] = {}
        if algorithm == "fedprox" and cfg.mu > 0:
            global_params = {n: p.detach().clone() for n, p in model.named_parameters()}

        params = list(model.parameters()) + list(head.parameters())
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        n = len(dataset)
        num_batches = math.ceil(n / cfg.batch_size)
        steps = 0
        epoch_loss = 0.0
        first_epoch_loss: float | None = None
        prox_total = 0.0
        model.train()
        head.train()
        for _epoch in range(cfg.local_epochs):
            perm = torch.randperm(n, generator=gen)
            flips = torch.rand(n, generator=gen) < 0.5
            epoch_loss, seen = 0.0, 0
            # balanced batches: no batch of one sample (BatchNorm cannot train on it)
            for idx in torch.tensor_split(perm, num_batches):
                x = x_all[idx]
                flip = flips[idx]
                x = torch.where(flip[:, None, None, None], x.flip(3), x).to(self.device, non_blocking=True)
                y = y_all[idx.to(self.device)]
                logits = head(model(x), y)
                loss = F.cross_entropy(logits, y)
                total = loss
                if global_params:
                    prox = proximal_term(model.named_parameters(), global_params, cfg.mu)
                    total = loss + prox
                    prox_total += float(prox.detach())
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                steps += 1
                epoch_loss += float(loss.detach()) * len(idx)
                seen += len(idx)
            epoch_loss /= max(seen, 1)
            if first_epoch_loss is None:
                first_epoch_loss = epoch_loss

        loss_after, acc_after = self._score(head, self._embed_tensor(model, x_all), y_all)
        local = state_to_numpy(model)
        delta = codec.delta({k: local[k] for k in base_weights}, base_weights)
        if state_dir is not None:
            self._save_head(Path(state_dir), head, dataset.identities, assignment.architecture)
        # train_loss*: mean CosFace loss over an epoch's batches (train mode, augmented);
        # loss_before/after, train_accuracy: the whole local set in eval mode (BatchNorm running stats)
        metrics = {
            "train_loss": epoch_loss,
            "train_loss_first_epoch": first_epoch_loss if first_epoch_loss is not None else epoch_loss,
            "loss_before": loss_before,
            "loss_after": loss_after,
            "train_accuracy": acc_after,
            "steps": float(steps),
            "epochs": float(cfg.local_epochs),
            "delta_norm": codec.global_norm(delta),
        }
        if global_params:
            metrics["prox_term_mean"] = prox_total / max(steps, 1)
        return TrainResult(delta=delta, num_samples=n, metrics=metrics, seconds=time.perf_counter() - started)

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

    def _backbone(
        self, architecture: str, embedding_dim: int | None, weights: Mapping[str, np.ndarray]
    ) -> torch.nn.Module:
        model = build_backbone(architecture, embedding_dim, seed=0)
        load_numpy_state(model, weights)
        return model.to(self.device)

    @staticmethod
    def _embedding_dim(model: torch.nn.Module) -> int:
        dim = getattr(model, "embedding_dim", None)
        if dim is None:
            raise ValueError("backbone does not expose embedding_dim")
        return int(dim)

    @staticmethod
    def _preprocess(images: np.ndarray, architecture: str) -> torch.Tensor:
        """uint8 (N, S, S, 3) -> float32 (N, 3, S', S') with the one shared preprocessing (on CPU)."""
        return torch.from_numpy(preprocessing_for(architecture).batch(images))

    @torch.no_grad()
    def _embed_tensor(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        model.eval()
        out = [
            model(x[i : i + self.eval_batch_size].to(self.device))
            for i in range(0, len(x), self.eval_batch_size)
        ]
        if not out:
            return torch.zeros((0, self._embedding_dim(model)))
        return torch.cat(out)

    @staticmethod
    @torch.no_grad()
    def _score(head: CosFaceHead, emb: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """Mean CosFace loss and accuracy of eval-mode embeddings ``emb`` with labels ``y``."""
        head.eval()
        loss = F.cross_entropy(head(emb, y), y)
        acc = (head.cosine(emb).argmax(1) == y).float().mean()
        return float(loss), float(acc)

    def _load_or_init_head(
        self,
        state_dir: str | Path | None,
        dataset: LocalDataset,
        embeddings: torch.Tensor,
        embedding_dim: int,
        cfg: TrainConfig,
        architecture: str,
    ) -> CosFaceHead:
        """The stored head for known identities; class-mean embeddings for identities new to it."""
        head = CosFaceHead(embedding_dim, dataset.num_identities, scale=cfg.scale, margin=cfg.margin)
        stored = (
            self._read_head(Path(state_dir), architecture, embedding_dim) if state_dir is not None else {}
        )
        missing = [i for i, name in enumerate(dataset.identities) if name not in stored]
        rows = head.weight.detach().clone()
        if missing:
            emb = embeddings.detach().cpu()
            labels = torch.from_numpy(dataset.labels)
            for i in missing:
                mask = labels == i
                if bool(mask.any()):
                    rows[i] = F.normalize(emb[mask].mean(0), dim=0)
        for i, name in enumerate(dataset.identities):
            if name in stored:
                rows[i] = torch.from_numpy(stored[name])
        head.init_from_embeddings(rows)
        return head.to(self.device)

    @staticmethod
    def _read_head(state_dir: Path, architecture: str, embedding_dim: int) -> dict[str, np.ndarray]:
        """The stored class rows by identity name (empty if absent or for another model)."""
        path = state_dir / HEAD_FILE
        if not path.exists():
            return {}
        try:
            with safe_open(str(path), framework="numpy") as fh:
                meta = fh.metadata() or {}
                weight = fh.get_tensor("weight")
            names = json.loads(meta.get("identities", "[]"))
        except (OSError, ValueError, json.JSONDecodeError):
            return {}  # unreadable state: start a fresh head
        if meta.get("architecture") != architecture or weight.shape != (len(names), embedding_dim):
            return {}
        return {str(name): weight[i].astype(np.float32) for i, name in enumerate(names)}

    @staticmethod
    def _save_head(
        state_dir: Path, head: CosFaceHead, identities: tuple[str, ...], architecture: str
    ) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        data = codec.encode(
            {"weight": head.weight.detach().cpu().float()},
            metadata={"identities": json.dumps(list(identities)), "architecture": architecture},
        )
        path = state_dir / HEAD_FILE
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
