"""FedFR (Liu et al., 2022): generic + personalized face recognition with a public face set.

The pieces the device runs each round, as pure functions and one small module:

- :func:`select_hard_negatives`: public images whose cosine to any local image exceeds a threshold,
  picked on the device from a public feature bank it downloads whole (the server never learns which
  public faces resemble the device's people);
- :func:`~facefl.losses.cosface_logits`: CosFace over the union of local classes (the device's own
  classifier) and public classes (the global model's public classifier), so hard negatives push local
  identities away from the public faces that resemble them;
- :func:`contrastive_loss`: the MOON-style regularizer (positive: the frozen global model of this round;
  negative: the device's previous local model; omitted in the device's first round);
- :class:`DFC`: Decoupled Feature Customization, a converter ``Linear(d, d)`` initialized to identity
  followed by one binary classifier per local identity, trained with the binary CosFace of
  :func:`facefl.losses.binary_cosface_loss`.

The DFC module and the local classifier stay on the device; the device uploads backbone and public
classifier deltas only. The personalized model is the device's backbone after local training followed by
the converter (see :meth:`DFC.convert`).
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from facefl import codec
from facefl.algorithms.base import Algorithm, Hyperparams, InputsClient, RoundInputs, ServerEnv, TrainResult
from facefl.algorithms.local import LocalJob, local_state, train_loop, trainable_parameters
from facefl.device_state import DFC_FILE, PERSONALIZED_FILE
from facefl.losses import binary_cosface_loss, cosface_logits, cosine_similarities, sharpen_cosine
from facefl.models import ARCHITECTURES
from facefl.vectors import l2_normalize

__all__ = [
    "DFC",
    "DFC_FILE",
    "PERSONALIZED_FILE",
    "PUBLIC_HEAD_KEY",
    "FedFR",
    "FedFRHyperparams",
    "contrastive_loss",
    "cosface_logits",
    "dfc_binary_loss",
    "select_hard_negatives",
    "sharpen_cosine",
]

# DFC's loss is the one-vs-rest binary CosFace of facefl.losses (its name here predates that module)
dfc_binary_loss = binary_cosface_loss

# Name of the public classifier inside FedFR's global model (next to the backbone tensors).
PUBLIC_HEAD_KEY = "public_head.weight"
# FedFR's personal state in the device's state folder (facefl.device_state owns it; export reads it):
# DFC_FILE, the DFC module, and PERSONALIZED_FILE, the backbone after the last local training


def select_hard_negatives(
    local_embeddings: np.ndarray,
    bank_embeddings: np.ndarray,
    threshold: float,
    max_count: int | None = None,
) -> np.ndarray:
    """Indices of bank rows whose cosine to any local embedding exceeds ``threshold``.

    Both inputs are L2-normalized (n, d) and (N, d) arrays. The result is sorted by decreasing maximum
    similarity, so ``max_count`` (a compute bound for small devices) keeps the hardest negatives.
    """
    if local_embeddings.ndim != 2 or bank_embeddings.ndim != 2:
        raise ValueError("embeddings must be 2-D (n, d) arrays")
    if local_embeddings.shape[1] != bank_embeddings.shape[1]:
        raise ValueError(
            f"dimension mismatch: local d={local_embeddings.shape[1]}, bank d={bank_embeddings.shape[1]}"
        )
    if max_count is not None and max_count < 0:
        raise ValueError("max_count must be >= 0")
    if len(local_embeddings) == 0 or len(bank_embeddings) == 0:
        return np.zeros(0, dtype=np.int64)
    best = np.full(len(bank_embeddings), -np.inf, dtype=np.float32)
    local = local_embeddings.astype(np.float32, copy=False)
    for start in range(0, len(bank_embeddings), 8192):  # bounded memory for large banks
        block = bank_embeddings[start : start + 8192].astype(np.float32, copy=False)
        best[start : start + len(block)] = (block @ local.T).max(axis=1)
    picked = np.flatnonzero(best > threshold)
    picked = picked[np.argsort(-best[picked], kind="stable")]
    if max_count is not None:
        picked = picked[:max_count]
    return picked.astype(np.int64)


def contrastive_loss(
    z: torch.Tensor, z_global: torch.Tensor, z_previous: torch.Tensor, temperature: float = 0.5
) -> torch.Tensor:
    """MOON's model-contrastive loss: pull ``z`` toward the global model's embedding, away from the last.

    ``-log(exp(cos(z, z_g)/T) / (exp(cos(z, z_g)/T) + exp(cos(z, z_p)/T)))``, averaged over the batch.
    """
    if not (z.shape == z_global.shape == z_previous.shape):
        raise ValueError("z, z_global and z_previous must have the same shape")
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    pos = F.cosine_similarity(z, z_global, dim=1)
    neg = F.cosine_similarity(z, z_previous, dim=1)
    logits = torch.stack([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(z), dtype=torch.long, device=z.device))


class DFC(nn.Module):
    """Decoupled Feature Customization: the device's personal converter and binary classifiers.

    ``convert`` maps a backbone embedding to the personalized one (``normalize(converter(e))``); the
    converter starts as the identity so the first personalized model equals the backbone. ``forward``
    returns the binary loss for a batch whose ``labels`` are local class indices, or -1 for public images
    (negatives for every local class).
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        *,
        scale: float = 30.0,
        margin: float = 0.4,
        t: float = 3.0,
        pos_weight: float = 0.7,
        neg_weight: float = 0.3,
    ) -> None:
        super().__init__()
        if embedding_dim <= 0 or num_classes <= 0:
            raise ValueError("embedding_dim and num_classes must be positive")
        self.embedding_dim = embedding_dim
        self.num_classes = num_classes
        self.scale, self.margin, self.t = float(scale), float(margin), float(t)
        self.pos_weight, self.neg_weight = float(pos_weight), float(neg_weight)
        self.converter = nn.Linear(embedding_dim, embedding_dim)
        with torch.no_grad():
            self.converter.weight.copy_(torch.eye(embedding_dim))
            self.converter.bias.zero_()
        self.weight = nn.Parameter(torch.randn(num_classes, embedding_dim) * 0.01)
        self.bias = nn.Parameter(torch.zeros(num_classes))

    @torch.no_grad()
    def init_classifiers(self, rows: torch.Tensor) -> None:
        """Start the binary classifiers from the local classifier's rows (C, d)."""
        if rows.shape != self.weight.shape:
            raise ValueError(f"expected rows of shape {tuple(self.weight.shape)}, got {tuple(rows.shape)}")
        self.weight.copy_(F.normalize(rows, dim=1))

    def convert(self, embeddings: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.converter(embeddings), dim=1)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = cosine_similarities(self.convert(embeddings), self.weight)
        targets = torch.zeros_like(cos)
        local = labels >= 0
        targets[local.nonzero(as_tuple=True)[0], labels[local].long()] = 1.0
        return binary_cosface_loss(
            cos,
            targets,
            self.bias,
            scale=self.scale,
            margin=self.margin,
            t=self.t,
            pos_weight=self.pos_weight,
            neg_weight=self.neg_weight,
        )


class FedFRHyperparams(Hyperparams):
    # the public set the server serves, hard-negative selection on the device, the weights of the DFC and
    # contrastive terms (docs/architecture.md, "Algorithms")
    public_set: Annotated[str | None, Field(min_length=1, max_length=64)] = None
    hard_negative_threshold: Annotated[float, Field(ge=-1, le=1)] = 0.4
    max_hard_negatives: Annotated[int, Field(ge=0, le=100_000)] = 512
    dfc_weight: Annotated[float, Field(ge=0, le=1000)] = 10.0
    contrastive_weight: Annotated[float, Field(ge=0, le=1000)] = 5.0
    contrastive_temperature: Annotated[float, Field(gt=0, le=10)] = 0.5


class FedFR(Algorithm):
    """FedFR: a public classifier in the global model, public pack + feature bank downloaded by devices,
    DFC and the contrastive term on the device (FedAvg's server step)."""

    name = "fedfr"
    title = "FedFR (Liu et al., 2022): public face set, hard negatives, DFC personalization"
    hyperparams = FedFRHyperparams
    global_extra_prefixes = ("public_head.",)

    def check_task(self, hp: Any) -> None:
        if hp.public_set is None:
            raise ValueError("fedfr needs hyperparams.public_set (a FACEFL_PUBLIC_SETS name)")

    def public_set(self, hp: Any) -> str | None:
        return str(hp.public_set) if hp.public_set else None

    def initial_extras(
        self, env: ServerEnv, hp: Any, architecture: str, embedding_dim: int, backbone: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """The public classifier: each public identity's normalized mean embedding (num_ids, d)."""
        public = env.public_set(hp.public_set, ARCHITECTURES[architecture].image_size)
        return {
            PUBLIC_HEAD_KEY: public_head(
                env.embed(architecture, embedding_dim, backbone, public.images), public
            )
        }

    def round_inputs(self, client: InputsClient, assignment: Any) -> RoundInputs:
        """The task's public pack (the client caches it: fetched once) and the base version's bank, whole."""
        bank, _labels = client.download_public_bank(assignment.base_version)
        return RoundInputs(public=client.download_public_pack(assignment.task_id), bank_embeddings=bank)

    def local_update(self, job: LocalJob) -> TrainResult:
        """FedFR's local round (docs/architecture.md, "Algorithms"): union CosFace over local + public
        classes on the local images and the hard negatives picked from the public bank, + DFC loss +
        contrastive term."""
        started = time.perf_counter()
        inputs, base_weights, dataset = job.inputs, job.base_weights, job.dataset
        if inputs is None or inputs.public is None or inputs.bank_embeddings is None:
            raise ValueError("fedfr needs the public pack and feature bank (device_sdk.fetch_round_inputs)")
        if PUBLIC_HEAD_KEY not in base_weights:
            raise ValueError(f"a fedfr global model carries {PUBLIC_HEAD_KEY!r}; this one does not")
        public = inputs.public
        if len(inputs.bank_embeddings) != len(public.images):
            raise ValueError("the public bank and pack disagree on the number of images")
        hp, gen = job.prepare()
        arch = job.architecture

        model = job.backbone()
        trained = job.freeze_outside(model)  # + the public classifier
        embedding_dim = job.embedding_dim(model)
        x_local = job.preprocess(dataset.images)
        emb_before = job.embed(model, x_local)
        head = job.load_or_init_head(emb_before, embedding_dim, hp)
        num_local = dataset.num_identities
        public_head_rows = torch.nn.Parameter(
            torch.from_numpy(np.array(base_weights[PUBLIC_HEAD_KEY])).to(job.device)
        )

        # 1. hard negatives, chosen here from the whole bank (the server never learns which)
        picked = select_hard_negatives(
            emb_before.cpu().numpy(),
            inputs.bank_embeddings,
            hp.hard_negative_threshold,
            hp.max_hard_negatives,
        )
        x_all = torch.cat([x_local, job.preprocess(public.images[picked])])
        # union labels: local classes first, then public classes; DFC labels: -1 for public images
        y_union = torch.cat(
            [torch.from_numpy(dataset.labels), torch.from_numpy(public.labels[picked]) + num_local]
        ).to(job.device)
        y_dfc = torch.cat([torch.from_numpy(dataset.labels), torch.full((len(picked),), -1)]).to(job.device)

        # 2. frozen models for the contrastive term: this round's global model, the previous local one
        previous = _load_personalized(job, embedding_dim) if hp.contrastive_weight > 0 else None
        global_frozen = job.backbone() if previous is not None else None
        for frozen in (previous, global_frozen):
            if frozen is not None:
                frozen.eval().requires_grad_(False)

        # 3. DFC: kept on the device; the binary classifiers start from the local classifier's rows
        dfc = _load_or_init_dfc(job, head.weight.detach().cpu(), embedding_dim)

        decay = trainable_parameters(model) + list(head.parameters())
        # no weight decay on the public classifier or DFC: a device moves public rows through its loss
        # only, rather than shrinking all of them every round (CosFace normalizes rows anyway)
        groups = [
            {"params": decay, "weight_decay": hp.weight_decay},
            {"params": [public_head_rows], "weight_decay": 0.0},
            {"params": list(dfc.parameters()), "weight_decay": 0.0},
        ]

        def step(idx: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            emb = model(x)
            weight = torch.cat([head.weight, public_head_rows])
            ce = F.cross_entropy(cosface_logits(emb, weight, y_union[idx], hp.scale, hp.margin), y_union[idx])
            total, terms = ce, {"ce": ce}
            if hp.dfc_weight > 0:
                dfc_loss = dfc(emb, y_dfc[idx])
                total = total + hp.dfc_weight * dfc_loss
                terms["dfc"] = dfc_loss
            if previous is not None and global_frozen is not None:
                with torch.no_grad():
                    z_global, z_previous = global_frozen(x), previous(x)
                con = contrastive_loss(emb, z_global, z_previous, hp.contrastive_temperature)
                total = total + hp.contrastive_weight * con
                terms["contrastive"] = con
            return total, terms

        stats = train_loop(job, model, trained, groups, hp, gen, x_all, step, modules=(head, dfc))

        local = local_state(model)
        local_with_head = {
            **local,
            PUBLIC_HEAD_KEY: public_head_rows.detach().cpu().numpy().astype(np.float32),
        }
        delta = job.delta(local_with_head, trained)
        emb_after = job.embed(model, x_local)
        loss_after, acc_after = job.score(head, emb_after, torch.from_numpy(dataset.labels).to(job.device))
        state = job.state
        if state is not None:
            job.save_head(head)
            state.save_dfc(dfc.state_dict(), dataset.identities, arch)
            state.save_personalized(local, arch, embedding_dim)
        metrics = {
            "train_loss": stats.mean("ce"),
            "dfc_loss": stats.mean("dfc"),
            "contrastive_loss": stats.mean("contrastive"),
            "hard_negatives": float(len(picked)),
            "loss_after": loss_after,
            "train_accuracy": acc_after,
            "steps": float(stats.steps),
            "epochs": float(hp.local_epochs),
            "delta_norm": codec.global_norm(delta),
        }
        # weighted by the device's own images only (public images are shared by everyone)
        return TrainResult(
            delta=delta, num_samples=len(dataset), metrics=metrics, seconds=time.perf_counter() - started
        )


def public_head(embeddings: np.ndarray, public: Any) -> np.ndarray:
    """Each public identity's normalized mean of ``embeddings`` (one row per image of ``public``)."""
    sums = np.zeros((public.num_identities, embeddings.shape[1]), np.float64)
    np.add.at(sums, public.labels, embeddings)
    return l2_normalize(sums)


def _load_personalized(job: LocalJob, embedding_dim: int) -> torch.nn.Module | None:
    """The previous round's local backbone, or None (first round, or state of another model)."""
    state = job.state
    ckpt = state.load_previous_backbone(job.architecture, embedding_dim) if state is not None else None
    if ckpt is None:
        return None
    try:
        return job.backbone(ckpt.tensors)
    except ValueError:
        return None  # unusable state: leave the term out this round rather than fail


def _load_or_init_dfc(job: LocalJob, head_rows: torch.Tensor, embedding_dim: int) -> DFC:
    """The stored DFC module (its converter, and the classifier rows of identities it knows), else a
    fresh one (identity converter, classifiers from the local head's rows)."""
    dataset = job.dataset
    dfc = DFC(embedding_dim, dataset.num_identities)
    dfc.init_classifiers(head_rows)
    state = job.state
    stored = state.load_dfc(job.architecture, embedding_dim) if state is not None else None
    if stored is not None:
        t = stored.tensors
        with torch.no_grad():
            dfc.converter.weight.copy_(torch.from_numpy(t["converter.weight"]))
            dfc.converter.bias.copy_(torch.from_numpy(t["converter.bias"]))
            row_of = {name: i for i, name in enumerate(stored.identities)}
            for i, name in enumerate(dataset.identities):
                if name in row_of:
                    dfc.weight[i] = torch.from_numpy(t["weight"][row_of[name]])
                    dfc.bias[i] = float(t["bias"][row_of[name]])
    return dfc.to(job.device)
