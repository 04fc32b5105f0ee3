"""The shared machinery of every algorithm's local update on the device (PyTorch; CUDA when present).

:class:`LocalJob` is one round of local training as the SDK's ``Trainer`` hands it to
:meth:`~facefl.algorithms.base.Algorithm.local_update`: the assignment, the base weights, the device's
images and state directory, and the helpers every local update uses (backbone, preprocessing,
embedding, partial training, the persisted local head). :func:`train_loop` is the one training loop:
an algorithm supplies the loss of a batch; the loop owns the optimizer, train modes, epochs, batches
and the bookkeeping of the loss terms.

With a task's ``trainable`` parameter groups (``assignment.trainable_prefixes``) everything else is
frozen (no gradient, and frozen BatchNorm layers keep their running statistics) and the delta holds the
trainable tensors only (plus the global model's extras, e.g. FedFR's public classifier).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from facefl import codec, compression
from facefl.algorithms.base import AssignmentLike, Hyperparams, RoundInputs
from facefl.data import preprocessing_for
from facefl.device_state import FEEDBACK_FILE, HEAD_FILE, DeviceState
from facefl.models import CosFaceHead, backbone_from_weights, state_to_numpy, trainable_names

__all__ = [
    "FEEDBACK_FILE",
    "HEAD_FILE",
    "LocalData",
    "LocalJob",
    "LoopStats",
    "freeze_outside",
    "make_optimizer",
    "read_head",
    "train_loop",
    "train_mode",
    "trainable_parameters",
    "unnormalized_embeddings",
]

# a batch's loss: (total to minimize, named terms to report)
StepFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class LocalData(Protocol):
    """The device's images (``device_sdk.LocalDataset`` satisfies it)."""

    @property
    def images(self) -> np.ndarray: ...

    @property
    def labels(self) -> np.ndarray: ...

    @property
    def identities(self) -> tuple[str, ...]: ...

    @property
    def num_identities(self) -> int: ...

    def __len__(self) -> int: ...


@dataclass
class LocalJob:
    """One round of local training and the helpers every local update shares."""

    assignment: AssignmentLike
    base_weights: Mapping[str, np.ndarray]
    dataset: LocalData
    state_dir: Path | None
    hyperparams_model: type[Hyperparams]
    seed: int | None = None
    inputs: RoundInputs | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    eval_batch_size: int = 256

    @property
    def architecture(self) -> str:
        return self.assignment.architecture

    @property
    def state(self) -> DeviceState | None:
        """The device's state folder (None: train fresh and keep nothing)."""
        return DeviceState(self.state_dir) if self.state_dir is not None else None

    def prepare(self) -> tuple[Any, torch.Generator]:
        """The validated hyper-parameters and the seeded generator of batch order and augmentation."""
        try:
            hp = self.hyperparams_model.lenient(self.assignment.hyperparams)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bad hyper-parameters {dict(self.assignment.hyperparams)!r}: {exc}") from exc
        if hp.batch_size < 2:
            raise ValueError("batch_size must be >= 2")
        if len(self.dataset) < 2:
            raise ValueError("local training needs at least two images")
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(self.seed) if self.seed is not None else int(torch.seed() % (2**63)))
        return hp, gen

    # ---------------------------------------------------------------------------------- models

    def backbone(self, weights: Mapping[str, np.ndarray] | None = None) -> torch.nn.Module:
        """A backbone of the assignment's architecture holding ``weights`` (default: the base), on the
        training device."""
        model = backbone_from_weights(
            self.architecture,
            self.assignment.embedding_dim,
            self.base_weights if weights is None else weights,
        )
        return model.to(self.device)

    def freeze_outside(self, model: torch.nn.Module) -> list[str]:
        """Freeze what the assignment does not train; the names of the base weights that are uploaded."""
        return freeze_outside(model, self.base_weights, trainable_prefixes(self.assignment))

    def delta(self, local: Mapping[str, np.ndarray], trained: Sequence[str]) -> dict[str, np.ndarray]:
        """``local - base`` for the uploaded names (plus, under the task's error feedback, what encoding
        dropped from the previous rounds' deltas)."""
        delta = codec.delta({k: local[k] for k in trained}, {k: self.base_weights[k] for k in trained})
        return self.error_feedback(delta)

    def error_feedback(self, delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """With the assignment's ``update_error_feedback`` (and a state folder): the delta plus the saved
        residual, and the new residual saved (facefl.compression.ErrorFeedback). Encoding is
        deterministic, so the residual is known before the upload encodes the returned delta."""
        encoding = getattr(self.assignment, "update_encoding", compression.DEFAULT_ENCODING)
        state = self.state
        if not getattr(self.assignment, "update_error_feedback", False) or state is None:
            return delta
        feedback = compression.ErrorFeedback.load(state.feedback_path)
        corrected = feedback.correct(delta, encoding)
        state.root.mkdir(parents=True, exist_ok=True)
        feedback.save(state.feedback_path)
        return corrected

    @staticmethod
    def embedding_dim(model: torch.nn.Module) -> int:
        dim = getattr(model, "embedding_dim", None)
        if dim is None:
            raise ValueError("backbone does not expose embedding_dim")
        return int(dim)

    # ------------------------------------------------------------------------------- the data

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, S, S, 3) -> float32 (N, 3, S', S') with the one shared preprocessing (on CPU)."""
        return torch.from_numpy(preprocessing_for(self.architecture).batch(images))

    @torch.no_grad()
    def embed(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Eval-mode embeddings of ``x``, in batches of ``eval_batch_size``."""
        return embed_tensor(model, x, self.device, self.eval_batch_size)

    def epoch(
        self, x_all: torch.Tensor, batch_size: int, gen: torch.Generator
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of (indices, batch on the device): a fresh permutation, a horizontal flip for about
        half the images, balanced batch sizes, and never a batch of one (BatchNorm cannot train on it)."""
        n = len(x_all)
        perm = torch.randperm(n, generator=gen)
        flips = torch.rand(n, generator=gen) < 0.5
        for idx in torch.tensor_split(perm, max(1, math.ceil(n / batch_size))):
            if len(idx) < 2:
                continue
            x = x_all[idx]
            yield (
                idx,
                torch.where(flips[idx][:, None, None, None], x.flip(3), x).to(self.device, non_blocking=True),
            )

    # ---------------------------------------------------------------------- the local CosFace head

    @staticmethod
    @torch.no_grad()
    def score(head: CosFaceHead, emb: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """Mean CosFace loss and accuracy of eval-mode embeddings ``emb`` with labels ``y``."""
        head.eval()
        loss = F.cross_entropy(head(emb, y), y)
        acc = (head.cosine(emb).argmax(1) == y).float().mean()
        return float(loss), float(acc)

    def load_or_init_head(self, embeddings: torch.Tensor, embedding_dim: int, hp: Hyperparams) -> CosFaceHead:
        """The stored head for known identities; class-mean embeddings for identities new to it."""
        dataset = self.dataset
        head = CosFaceHead(embedding_dim, dataset.num_identities, scale=hp.scale, margin=hp.margin)
        state = self.state
        stored = state.load_head(self.architecture, embedding_dim) if state is not None else {}
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

    def save_head(self, head: CosFaceHead) -> None:
        """Persist the head in the state directory (no-op without one)."""
        state = self.state
        if state is not None:
            state.save_head(head.weight, self.dataset.identities, self.architecture)


@dataclass
class LoopStats:
    """Bookkeeping of :func:`train_loop`: per-term sums over steps and sample-weighted epoch means."""

    steps: int = 0
    sums: dict[str, float] = field(default_factory=dict)  # term -> sum over steps of the batch mean
    first_epoch: dict[str, float] = field(default_factory=dict)  # term -> sample-weighted mean, epoch 1
    last_epoch: dict[str, float] = field(default_factory=dict)  # term -> sample-weighted mean, last epoch

    def mean(self, term: str) -> float:
        """The term's mean over steps (0 when it never occurred)."""
        return self.sums.get(term, 0.0) / max(self.steps, 1)


def train_loop(
    job: LocalJob,
    model: torch.nn.Module,
    trained: Sequence[str],
    params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
    hp: Hyperparams,
    gen: torch.Generator,
    x_all: torch.Tensor,
    step: StepFn,
    modules: Sequence[torch.nn.Module] = (),
) -> LoopStats:
    """``hp.local_epochs`` epochs of ``hp.optimizer`` (:func:`make_optimizer`) over ``x_all``;
    ``step(indices on the device, batch)`` returns the batch's total loss and its named terms. ``model``
    trains as ``trained`` says (see :func:`train_mode`), ``modules`` (heads, converters) in train mode."""
    optimizer = make_optimizer(params, hp)
    stats = LoopStats()
    train_mode(model, trained)
    for module in modules:
        module.train()
    for epoch in range(hp.local_epochs):
        weighted: dict[str, float] = {}
        seen = 0
        for idx, x in job.epoch(x_all, hp.batch_size, gen):
            total, terms = step(idx.to(job.device), x)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            stats.steps += 1
            for name, value in terms.items():
                v = float(value.detach())
                stats.sums[name] = stats.sums.get(name, 0.0) + v
                weighted[name] = weighted.get(name, 0.0) + v * len(idx)
            seen += len(idx)
        stats.last_epoch = {name: v / max(seen, 1) for name, v in weighted.items()}
        if epoch == 0:
            stats.first_epoch = dict(stats.last_epoch)
    return stats


def make_optimizer(
    params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]], hp: Hyperparams
) -> torch.optim.Optimizer:
    """The local optimizer ``hp.optimizer`` names, with ``hp``'s lr and weight decay (parameter groups
    may override the decay); SGD also takes ``hp.momentum``."""
    if hp.optimizer == "adam":
        return torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
    return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)


def unnormalized_embeddings(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The backbone's embeddings before L2 normalization (every facefl backbone has ``unnormalized``)."""
    unnormalized = getattr(model, "unnormalized", None)
    if unnormalized is None:
        raise ValueError(f"{type(model).__name__} has no unnormalized embedding")
    out: torch.Tensor = unnormalized(x)
    return out


def read_head(state_dir: Path, architecture: str, embedding_dim: int) -> dict[str, np.ndarray]:
    """The stored class rows of the local head by identity name (empty if absent or for another model)."""
    return DeviceState(state_dir).load_head(architecture, embedding_dim)


def embed_tensor(
    model: torch.nn.Module, x: torch.Tensor, device: torch.device, batch_size: int
) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = [model(x[i : i + batch_size].to(device)) for i in range(0, len(x), batch_size)]
    if not out:
        return torch.zeros((0, LocalJob.embedding_dim(model)))
    return torch.cat(out)


def trainable_prefixes(assignment: object) -> Sequence[str] | None:
    """The assignment's trainable name prefixes (None: the whole model; assignments without the field)."""
    prefixes: Sequence[str] | None = getattr(assignment, "trainable_prefixes", None)
    return prefixes


def freeze_outside(
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


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train_mode(model: torch.nn.Module, trained: Sequence[str]) -> None:
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


def local_state(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's floating-point state as NumPy (what a delta is computed from)."""
    return state_to_numpy(model)
