"""Local training of a round's assignment on the device (PyTorch; CUDA when present, else CPU).

The device receives the global backbone, trains it on its own faces with a CosFace head over its local
identities, and returns ``delta = local - base`` for every tensor of the base model. With a task's
``trainable`` parameter groups (``assignment.trainable_prefixes``) everything else is frozen (no
gradient, and frozen BatchNorm layers keep their running statistics) and the delta holds the trainable
tensors only. The local head is the device's private classifier: it is persisted in the device's state
directory across rounds (initialised the first time from the mean embedding of each local identity under
the received model) and never leaves the device.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

from export.onnx import DFC_FILE, PERSONALIZED_FILE
from facefl import codec
from facefl.algorithms.fedface import CLASS_EMBEDDING_KEY, class_embedding, positive_loss
from facefl.algorithms.fedfr import (
    DFC,
    PUBLIC_HEAD_KEY,
    contrastive_loss,
    cosface_logits,
    select_hard_negatives,
)
from facefl.algorithms.fedprox import proximal_term
from facefl.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from facefl.data import preprocessing_for
from facefl.data.public import PublicSet
from facefl.fileio import atomic_write_bytes
from facefl.models import CosFaceHead, backbone_from_weights, state_to_numpy, trainable_names

from .dataset import LocalDataset

__all__ = [
    "AssignmentLike",
    "RoundInputs",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "load_personalized_model",
]

HEAD_FILE = "local_head.safetensors"
# FedFR's personal state (file names shared with export.onnx): the backbone after the last local
# training (a facefl checkpoint; the contrastive term's negative next round, and the personalized
# model's trunk) and the DFC module


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
    hard_negative_threshold: float = 0.4
    max_hard_negatives: int = 512
    dfc_weight: float = 10.0
    contrastive_weight: float = 5.0
    contrastive_temperature: float = 0.5
    fedface_margin: float = 0.9

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
                hard_negative_threshold=float(
                    hp.get("hard_negative_threshold", defaults.hard_negative_threshold)
                ),
                max_hard_negatives=int(hp.get("max_hard_negatives", defaults.max_hard_negatives)),
                dfc_weight=float(hp.get("dfc_weight", defaults.dfc_weight)),
                contrastive_weight=float(hp.get("contrastive_weight", defaults.contrastive_weight)),
                contrastive_temperature=float(
                    hp.get("contrastive_temperature", defaults.contrastive_temperature)
                ),
                fedface_margin=float(hp.get("fedface_margin", defaults.fedface_margin)),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bad hyper-parameters {dict(hp)!r}: {exc}") from exc
        if cfg.local_epochs < 1 or cfg.batch_size < 2:
            raise ValueError("local_epochs must be >= 1 and batch_size >= 2")
        if not (cfg.lr > 0 and cfg.momentum >= 0 and cfg.weight_decay >= 0 and cfg.mu >= 0):
            raise ValueError("lr must be > 0; momentum, weight_decay and mu must be >= 0")
        if cfg.max_hard_negatives < 0 or cfg.dfc_weight < 0 or cfg.contrastive_weight < 0:
            raise ValueError("max_hard_negatives, dfc_weight and contrastive_weight must be >= 0")
        if cfg.contrastive_temperature <= 0:
            raise ValueError("contrastive_temperature must be > 0")
        return cfg


@dataclass(frozen=True)
class RoundInputs:
    """What an algorithm needs beyond the base weights (fetched by ``device_sdk.fetch_round_inputs``).

    FedFR: the public pack (images + identity labels) and this version's public feature bank.
    FedFace: the device's class embedding as the server last spread it out (None in its first round).
    """

    public: PublicSet | None = None
    bank_embeddings: np.ndarray | None = None
    class_embedding: np.ndarray | None = None


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
        inputs: RoundInputs | None = None,
    ) -> TrainResult:
        """Train the assignment's backbone on ``dataset`` and return the delta to upload.

        Args:
            assignment: architecture, embedding_dim, algorithm (fedavg | fedprox | fedfr | fedface) and
                hyperparams.
            base_weights: the round's global weights (from ``FederatedClient.download_model``).
            dataset: the device's training images (at least two; FedFace: one identity).
            state_dir: where the device's private state persists across rounds: the local head, and for
                FedFR the DFC module and the personalized backbone (None: fresh, not saved).
            seed: seeds batch order and augmentation (reproducible runs); random when None.
            inputs: FedFR's public pack and bank, FedFace's class embedding (``fetch_round_inputs``).
        """
        with self._threads():
            algorithm = assignment.algorithm.lower()
            if algorithm == "fedfr":
                return self._train_fedfr(assignment, base_weights, dataset, state_dir, seed, inputs)
            if algorithm == "fedface":
                return self._train_fedface(assignment, base_weights, dataset, seed, inputs)
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
            raise ValueError(
                f"the trainer implements fedavg, fedprox, fedfr and fedface, not {assignment.algorithm!r}"
            )
        cfg, gen = self._prepare(assignment, dataset, seed)

        model = self._backbone(assignment.architecture, assignment.embedding_dim, base_weights)
        trained = _freeze_outside(model, base_weights, _prefixes(assignment))
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
            global_params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

        params = _trainable_parameters(model) + list(head.parameters())
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        n = len(dataset)
        steps = 0
        epoch_loss = 0.0
        first_epoch_loss: float | None = None
        prox_total = 0.0
        _train_mode(model, trained)
        head.train()
        for _epoch in range(cfg.local_epochs):
            epoch_loss, seen = 0.0, 0
            for idx, x in self._epoch(x_all, cfg, gen):
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
        delta = codec.delta({k: local[k] for k in trained}, {k: base_weights[k] for k in trained})
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

    # ---------------------------------------------------------------------------------------- FedFR

    def _train_fedfr(
        self,
        assignment: AssignmentLike,
        base_weights: Mapping[str, np.ndarray],
        dataset: LocalDataset,
        state_dir: str | Path | None,
        seed: int | None,
        inputs: RoundInputs | None,
    ) -> TrainResult:
        """FedFR's local round (DESIGN section 4): union CosFace over local + public classes on the local
        images and the hard negatives picked from the public bank, + DFC loss + contrastive term."""
        started = time.perf_counter()
        if inputs is None or inputs.public is None or inputs.bank_embeddings is None:
            raise ValueError("fedfr needs the public pack and feature bank (device_sdk.fetch_round_inputs)")
        if PUBLIC_HEAD_KEY not in base_weights:
            raise ValueError(f"a fedfr global model carries {PUBLIC_HEAD_KEY!r}; this one does not")
        public = inputs.public
        if len(inputs.bank_embeddings) != len(public.images):
            raise ValueError("the public bank and pack disagree on the number of images")
        cfg, gen = self._prepare(assignment, dataset, seed)
        arch = assignment.architecture

        model = self._backbone(arch, assignment.embedding_dim, base_weights)
        trained = _freeze_outside(model, base_weights, _prefixes(assignment))  # + the public classifier
        embedding_dim = self._embedding_dim(model)
        x_local = self._preprocess(dataset.images, arch)
        emb_before = self._embed_tensor(model, x_local)
        head = self._load_or_init_head(state_dir, dataset, emb_before, embedding_dim, cfg, arch)
        num_local = dataset.num_identities
        public_head = torch.nn.Parameter(
            torch.from_numpy(np.array(base_weights[PUBLIC_HEAD_KEY])).to(self.device)
        )

        # 1. hard negatives, chosen here from the whole bank (the server never learns which)
        picked = select_hard_negatives(
            emb_before.cpu().numpy(),
            inputs.bank_embeddings,
            cfg.hard_negative_threshold,
            cfg.max_hard_negatives,
        )
        x_all = torch.cat([x_local, self._preprocess(public.images[picked], arch)])
        # union labels: local classes first, then public classes; DFC labels: -1 for public images
        y_union = torch.cat(
            [torch.from_numpy(dataset.labels), torch.from_numpy(public.labels[picked]) + num_local]
        ).to(self.device)
        y_dfc = torch.cat([torch.from_numpy(dataset.labels), torch.full((len(picked),), -1)]).to(self.device)

        # 2. frozen models for the contrastive term: this round's global model, the previous local one
        previous = (
            self._load_personalized(state_dir, arch, embedding_dim) if cfg.contrastive_weight > 0 else None
        )
        global_frozen = (
            self._backbone(arch, assignment.embedding_dim, base_weights) if previous is not None else None
        )
        for frozen in (previous, global_frozen):
            if frozen is not None:
                frozen.eval().requires_grad_(False)

        # 3. DFC: kept on the device; the binary classifiers start from the local classifier's rows
        dfc = self._load_or_init_dfc(state_dir, dataset, head, embedding_dim, arch)

        decay = _trainable_parameters(model) + list(head.parameters())
        # no weight decay on the public classifier or DFC: a device moves public rows through its loss
        # only, rather than shrinking all of them every round (CosFace normalizes rows anyway)
        optimizer = torch.optim.SGD(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": [public_head], "weight_decay": 0.0},
                {"params": list(dfc.parameters()), "weight_decay": 0.0},
            ],
            lr=cfg.lr,
            momentum=cfg.momentum,
        )
        sums = {"ce": 0.0, "dfc": 0.0, "contrastive": 0.0}
        steps = 0
        _train_mode(model, trained)
        head.train()
        dfc.train()
        for _epoch in range(cfg.local_epochs):
            for idx, x in self._epoch(x_all, cfg, gen):
                dev_idx = idx.to(self.device)
                emb = model(x)
                weight = torch.cat([head.weight, public_head])
                ce = F.cross_entropy(
                    cosface_logits(emb, weight, y_union[dev_idx], cfg.scale, cfg.margin), y_union[dev_idx]
                )
                total = ce
                sums["ce"] += float(ce.detach())
                if cfg.dfc_weight > 0:
                    dfc_loss = dfc(emb, y_dfc[dev_idx])
                    total = total + cfg.dfc_weight * dfc_loss
                    sums["dfc"] += float(dfc_loss.detach())
                if previous is not None and global_frozen is not None:
                    with torch.no_grad():
                        z_global, z_previous = global_frozen(x), previous(x)
                    con = contrastive_loss(emb, z_global, z_previous, cfg.contrastive_temperature)
                    total = total + cfg.contrastive_weight * con
                    sums["contrastive"] += float(con.detach())
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                steps += 1

        local = state_to_numpy(model)
        local_with_head = {**local, PUBLIC_HEAD_KEY: public_head.detach().cpu().numpy().astype(np.float32)}
        delta = codec.delta({k: local_with_head[k] for k in trained}, {k: base_weights[k] for k in trained})
        emb_after = self._embed_tensor(model, x_local)
        loss_after, acc_after = self._score(head, emb_after, torch.from_numpy(dataset.labels).to(self.device))
        if state_dir is not None:
            state = Path(state_dir)
            self._save_head(state, head, dataset.identities, arch)
            self._save_dfc(state, dfc, dataset.identities, arch)
            save_checkpoint(state / PERSONALIZED_FILE, local, arch, embedding_dim)
        metrics = {
            "train_loss": sums["ce"] / max(steps, 1),
            "dfc_loss": sums["dfc"] / max(steps, 1),
            "contrastive_loss": sums["contrastive"] / max(steps, 1),
            "hard_negatives": float(len(picked)),
            "loss_after": loss_after,
            "train_accuracy": acc_after,
            "steps": float(steps),
            "epochs": float(cfg.local_epochs),
            "delta_norm": codec.global_norm(delta),
        }
        # weighted by the device's own images only (public images are shared by everyone)
        return TrainResult(
            delta=delta, num_samples=len(dataset), metrics=metrics, seconds=time.perf_counter() - started
        )

    def _load_personalized(
        self, state_dir: str | Path | None, architecture: str, embedding_dim: int
    ) -> torch.nn.Module | None:
        """The previous round's local backbone, or None (first round, or state of another model)."""
        if state_dir is None or not (Path(state_dir) / PERSONALIZED_FILE).exists():
            return None
        try:
            ckpt = load_checkpoint(Path(state_dir) / PERSONALIZED_FILE)
            if ckpt.architecture != architecture or ckpt.embedding_dim != embedding_dim:
                return None
            return self._backbone(architecture, embedding_dim, ckpt.tensors)
        except (CheckpointError, ValueError, OSError):
            return None  # unreadable state: leave the term out this round rather than fail

    def _load_or_init_dfc(
        self,
        state_dir: str | Path | None,
        dataset: LocalDataset,
        head: CosFaceHead,
        embedding_dim: int,
        architecture: str,
    ) -> DFC:
        dfc = DFC(embedding_dim, dataset.num_identities)
        dfc.init_classifiers(head.weight.detach().cpu())
        path = Path(state_dir) / DFC_FILE if state_dir is not None else None
        if path is not None and path.exists():
            try:
                with safe_open(str(path), framework="numpy") as fh:
                    meta = fh.metadata() or {}
                    stored = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open API)
                names = json.loads(meta.get("identities", "[]"))
                if meta.get("architecture") == architecture and stored["converter.weight"].shape == (
                    embedding_dim,
                    embedding_dim,
                ):
                    with torch.no_grad():
                        dfc.converter.weight.copy_(torch.from_numpy(stored["converter.weight"]))
                        dfc.converter.bias.copy_(torch.from_numpy(stored["converter.bias"]))
                        row_of = {str(name): i for i, name in enumerate(names)}
                        for i, name in enumerate(dataset.identities):
                            if name in row_of:
                                dfc.weight[i] = torch.from_numpy(stored["weight"][row_of[name]])
                                dfc.bias[i] = float(stored["bias"][row_of[name]])
            except (OSError, ValueError, KeyError, json.JSONDecodeError):
                pass  # unreadable state: a fresh module (identity converter)
        return dfc.to(self.device)

    @staticmethod
    def _save_dfc(state_dir: Path, dfc: DFC, identities: tuple[str, ...], architecture: str) -> None:
        tensors = {name: p.detach().cpu().float() for name, p in dfc.state_dict().items()}
        data = codec.encode(
            tensors, metadata={"identities": json.dumps(list(identities)), "architecture": architecture}
        )
        atomic_write_bytes(state_dir / DFC_FILE, data)

    # -------------------------------------------------------------------------------------- FedFace

    def _train_fedface(
        self,
        assignment: AssignmentLike,
        base_weights: Mapping[str, np.ndarray],
        dataset: LocalDataset,
        seed: int | None,
        inputs: RoundInputs | None,
    ) -> TrainResult:
        """FedFace's local round: pull the one identity's embeddings toward its fixed class embedding."""
        started = time.perf_counter()
        if dataset.num_identities != 1:
            raise ValueError(
                f"fedface trains one identity per device, this dataset has {dataset.num_identities}"
            )
        cfg, gen = self._prepare(assignment, dataset, seed)
        model = self._backbone(assignment.architecture, assignment.embedding_dim, base_weights)
        trained = _freeze_outside(model, base_weights, _prefixes(assignment))
        embedding_dim = self._embedding_dim(model)
        x_all = self._preprocess(dataset.images, assignment.architecture)
        received = inputs.class_embedding if inputs is not None else None
        if received is not None and received.shape == (embedding_dim,):
            w = F.normalize(torch.from_numpy(np.asarray(received, np.float32)), dim=0).to(self.device)
        else:  # first round: the mean embedding under the received model
            w = class_embedding(self._embed_tensor(model, x_all))
        loss_before = float(positive_loss(self._embed_tensor(model, x_all), w, cfg.fedface_margin))
        optimizer = torch.optim.SGD(
            _trainable_parameters(model), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        n = len(x_all)
        steps, loss_sum = 0, 0.0
        _train_mode(model, trained)
        for _epoch in range(cfg.local_epochs):
            for _idx, x in self._epoch(x_all, cfg, gen):
                loss = positive_loss(model(x), w, cfg.fedface_margin)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps += 1
                loss_sum += float(loss.detach())
        local = state_to_numpy(model)
        delta = codec.delta({k: local[k] for k in trained}, {k: base_weights[k] for k in trained})
        metrics = {
            "train_loss": loss_sum / max(steps, 1),
            "loss_before": loss_before,
            "loss_after": float(positive_loss(self._embed_tensor(model, x_all), w, cfg.fedface_margin)),
            "steps": float(steps),
            "epochs": float(cfg.local_epochs),
            "delta_norm": codec.global_norm(delta),
        }
        # the class embedding leaves the device: FedFace's documented trade-off (the server spreads
        # the identities apart with it)
        delta[CLASS_EMBEDDING_KEY] = w.detach().cpu().numpy().astype(np.float32)
        return TrainResult(delta=delta, num_samples=n, metrics=metrics, seconds=time.perf_counter() - started)

    # ------------------------------------------------------------------------------------- shared

    @staticmethod
    def _prepare(
        assignment: AssignmentLike, dataset: LocalDataset, seed: int | None
    ) -> tuple[TrainConfig, torch.Generator]:
        """The validated hyper-parameters and the seeded generator of batch order and augmentation."""
        cfg = TrainConfig.from_hyperparams(assignment.hyperparams)
        if len(dataset) < 2:
            raise ValueError("local training needs at least two images")
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(seed) if seed is not None else int(torch.seed() % (2**63)))
        return cfg, gen

    def _epoch(
        self, x_all: torch.Tensor, cfg: TrainConfig, gen: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of (indices, batch on the device): a fresh permutation, a horizontal flip for about
        half the images, balanced batch sizes, and never a batch of one (BatchNorm cannot train on it)."""
        n = len(x_all)
        perm = torch.randperm(n, generator=gen)
        flips = torch.rand(n, generator=gen) < 0.5
        for idx in torch.tensor_split(perm, max(1, math.ceil(n / cfg.batch_size))):
            if len(idx) < 2:
                continue
            x = x_all[idx]
            yield (
                idx,
                torch.where(flips[idx][:, None, None, None], x.flip(3), x).to(self.device, non_blocking=True),
            )

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
        model = backbone_from_weights(architecture, embedding_dim, weights)
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
        atomic_write_bytes(state_dir / HEAD_FILE, data)


def _prefixes(assignment: AssignmentLike) -> Sequence[str] | None:
    """The assignment's trainable name prefixes (None: the whole model; assignments without the field)."""
    prefixes: Sequence[str] | None = getattr(assignment, "trainable_prefixes", None)
    return prefixes


def _freeze_outside(
    model: torch.nn.Module, base_weights: Mapping[str, np.ndarray], prefixes: Sequence[str] | None
) -> list[str]:
    """Freeze the parameters outside ``prefixes`` (requires_grad False); the names of ``base_weights``
    that train and are uploaded (every one without prefixes; a global model's extras always)."""
    trained = trainable_names(base_weights, prefixes)
    if prefixes is not None:
        keep = set(trained)
        for name, p in model.named_parameters():
            p.requires_grad_(name in keep)
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"the trainable prefixes {list(prefixes)} select no parameter of this model")
    return trained


def _trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _train_mode(model: torch.nn.Module, trained: Sequence[str]) -> None:
    """Train mode, except for modules none of whose own tensors train: those stay in eval mode, so a
    frozen BatchNorm normalizes with, and keeps, the base model's running statistics."""
    model.train()
    keep = set(trained)
    for module_name, module in model.named_modules():
        own = [
            f"{module_name}.{n}" if module_name else n
            for n, t in itertools.chain(
                module.named_parameters(recurse=False), module.named_buffers(recurse=False)
            )
            if t.is_floating_point()
        ]
        if own and not any(n in keep for n in own):
            module.eval()


def load_personalized_model(state_dir: str | Path) -> torch.nn.Module:
    """The personalized model a FedFR device keeps in ``state_dir`` (its backbone after the last local
    training, then the DFC converter, L2-normalized), in eval mode; the same module ``facefl export
    --personalized`` writes to ONNX (:func:`export.onnx.load_personalized`)."""
    from export.onnx import load_personalized

    return load_personalized(state_dir).module
