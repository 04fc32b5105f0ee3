"""FedFace (Aggarwal et al., 2021): one identity per device, server-side spreadout of class embeddings.

The device holds one identity. Its class embedding ``w`` starts as the mean normalized embedding of its
images under the received model (or is the row the server last spread out for it); local training pulls
the device's embeddings toward the fixed ``w`` with :func:`~facefl.losses.positive_margin_loss`. The
device uploads its backbone delta and ``w``. The server averages the backbones, then spreads the class
embeddings of all devices apart with a few gradient steps of :func:`~facefl.losses.spreadout_loss`
(:func:`spreadout`), since no device ever sees another identity to push away from.

Privacy trade-off (the paper's): ``w`` is a template of the device's one person and leaves the device. The
server keeps every device's row and sends each device only its own.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from facefl import codec
from facefl.algorithms.base import (
    Algorithm,
    Hyperparams,
    InputsClient,
    RoundInputs,
    ServerState,
    ServerStepInputs,
    ServerStepResult,
    TrainResult,
)
from facefl.algorithms.local import LocalJob, local_state, train_loop, trainable_parameters
from facefl.losses import positive_margin_loss, spreadout_loss

__all__ = [
    "CLASS_EMBEDDINGS",
    "CLASS_EMBEDDING_KEY",
    "FedFace",
    "FedFaceHyperparams",
    "class_embedding",
    "positive_loss",
    "spread_state",
    "spreadout",
    "spreadout_loss",
]

# FedFace's device loss is the positive-only margin loss of facefl.losses (its name here predates it)
positive_loss = positive_margin_loss

# Extra tensor in a FedFace update, next to the backbone delta.
CLASS_EMBEDDING_KEY = "fedface.class_embedding"
# The server state: every device's class embedding, one row per device (metadata "devices": their ids)
CLASS_EMBEDDINGS = "class_embeddings"


def class_embedding(embeddings: torch.Tensor) -> torch.Tensor:
    """The normalized mean of L2-normalized embeddings (n, d) -> (d,)."""
    if embeddings.dim() != 2 or len(embeddings) == 0:
        raise ValueError("need a non-empty (n, d) batch of embeddings")
    return F.normalize(F.normalize(embeddings, dim=1).mean(0), dim=0)


def spreadout(w: np.ndarray, *, margin: float = 0.0, steps: int = 10, lr: float = 1.0) -> np.ndarray:
    """Gradient steps of :func:`spreadout_loss` on normalized rows; returns normalized rows (M, d) float32.

    ``lr`` is per row: the gradient of a mean over M(M-1) pairs reaching one row shrinks as 1/M, so the
    step is scaled by M to keep its effect independent of how many devices have joined.
    """
    if w.ndim != 2:
        raise ValueError("class embeddings must be (M, d)")
    if steps < 0 or lr <= 0:
        raise ValueError("steps must be >= 0 and lr > 0")
    param = torch.nn.Parameter(F.normalize(torch.as_tensor(w, dtype=torch.float64), dim=1))
    opt = torch.optim.SGD([param], lr=lr * max(len(w), 1))
    for _ in range(steps):
        opt.zero_grad()
        spreadout_loss(param, margin).backward()
        opt.step()
        with torch.no_grad():
            param.copy_(F.normalize(param, dim=1))
    return param.detach().numpy().astype(np.float32)


class FedFaceHyperparams(Hyperparams):
    # the device's positive margin, the server's spreadout
    fedface_margin: Annotated[float, Field(ge=-1, le=1)] = 0.9
    spreadout_margin: Annotated[float, Field(ge=-1, lt=1)] = 0.0
    spreadout_steps: Annotated[int, Field(ge=0, le=10_000)] = 10
    spreadout_lr: Annotated[float, Field(gt=0, le=100)] = 1.0


def rows_of(state: ServerState) -> dict[str, np.ndarray]:
    """The class embeddings of a state, by device id."""
    devices = json.loads(state.metadata["devices"])
    matrix = state.tensors[CLASS_EMBEDDINGS]
    return {str(d): np.asarray(matrix[i], np.float32) for i, d in enumerate(devices)}


def spread_state(
    previous: ServerState | None, reported: dict[str, np.ndarray], *, margin: float, steps: int, lr: float
) -> ServerState:
    """Every device's class embedding after a round: reported rows replace the stored ones, then the
    spreadout regularizer pushes all of them apart."""
    rows: dict[str, np.ndarray] = rows_of(previous) if previous is not None else {}
    rows.update(reported)
    devices = sorted(rows)
    spread = spreadout(
        np.stack([rows[d] for d in devices]).astype(np.float32), margin=margin, steps=steps, lr=lr
    )
    return ServerState({CLASS_EMBEDDINGS: spread}, {"devices": json.dumps(devices)})


class FedFace(Algorithm):
    """FedFace: updates carry the device's class embedding (not averaged); after the mean, the server
    spreads every device's class embedding apart and keeps them as its state; each device downloads its
    own row before training."""

    name = "fedface"
    title = "FedFace (Aggarwal et al., 2021): one identity per device, server-side spreadout"
    hyperparams = FedFaceHyperparams
    one_identity_per_device = True
    updates_only_summed = False  # each device's class embedding goes to the server on its own

    def update_extras(self, embedding_dim: int) -> dict[str, codec.TensorSpec]:
        return {CLASS_EMBEDDING_KEY: codec.TensorSpec(shape=(int(embedding_dim),), dtype="F32")}

    def check_update_extras(self, extras: dict[str, np.ndarray]) -> None:
        w = extras.get(CLASS_EMBEDDING_KEY)
        if w is not None and abs(float(np.linalg.norm(w)) - 1.0) > 1e-3:
            raise ValueError(f"{CLASS_EMBEDDING_KEY} must be L2-normalized")

    def server_step(self, inputs: ServerStepInputs) -> ServerStepResult:
        hp = inputs.hyperparams
        reported = {d: e[CLASS_EMBEDDING_KEY] for d, e in inputs.extras.items() if CLASS_EMBEDDING_KEY in e}
        state = spread_state(
            inputs.state, reported, margin=hp.spreadout_margin, steps=hp.spreadout_steps, lr=hp.spreadout_lr
        )
        return ServerStepResult(delta=inputs.delta, state=state)

    def device_state(self, state: ServerState, device_id: str) -> dict[str, np.ndarray] | None:
        row = rows_of(state).get(device_id)
        return None if row is None else {CLASS_EMBEDDING_KEY: row}

    def round_inputs(self, client: InputsClient, assignment: Any) -> RoundInputs:
        """This device's own class embedding (None in its first round)."""
        return RoundInputs(class_embedding=client.download_class_embedding(assignment.base_version))

    def local_update(self, job: LocalJob) -> TrainResult:
        """Pull the one identity's embeddings toward its fixed class embedding."""
        started = time.perf_counter()
        dataset = job.dataset
        if dataset.num_identities != 1:
            raise ValueError(
                f"fedface trains one identity per device, this dataset has {dataset.num_identities}"
            )
        hp, gen = job.prepare()
        model = job.backbone()
        trained = job.freeze_outside(model)
        embedding_dim = job.embedding_dim(model)
        x_all = job.preprocess(dataset.images)
        received = job.inputs.class_embedding if job.inputs is not None else None
        if received is not None and received.shape == (embedding_dim,):
            w = F.normalize(torch.from_numpy(np.asarray(received, np.float32)), dim=0).to(job.device)
        else:  # first round: the mean embedding under the received model
            w = class_embedding(job.embed(model, x_all))
        loss_before = float(positive_margin_loss(job.embed(model, x_all), w, hp.fedface_margin))

        def step(_idx: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            loss = positive_margin_loss(model(x), w, hp.fedface_margin)
            return loss, {"loss": loss}

        stats = train_loop(job, model, trained, trainable_parameters(model), hp, gen, x_all, step)
        delta = job.delta(local_state(model), trained)
        metrics = {
            "train_loss": stats.mean("loss"),
            "loss_before": loss_before,
            "loss_after": float(positive_margin_loss(job.embed(model, x_all), w, hp.fedface_margin)),
            "steps": float(stats.steps),
            "epochs": float(hp.local_epochs),
            "delta_norm": codec.global_norm(delta),
        }
        # the class embedding leaves the device: FedFace's documented trade-off (the server spreads
        # the identities apart with it)
        delta[CLASS_EMBEDDING_KEY] = w.detach().cpu().numpy().astype(np.float32)
        return TrainResult(
            delta=delta, num_samples=len(x_all), metrics=metrics, seconds=time.perf_counter() - started
        )
