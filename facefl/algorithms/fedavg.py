"""FedAvg (McMahan et al., 2017): the streaming weighted mean, and the base algorithm of the registry.

On the server, the new version is the base plus the weighted mean of the updates (``Algorithm``'s
default server step). On the device, :meth:`FedAvg.local_update` trains the backbone with a CosFace
head over the device's own identities; other algorithms reuse it (FedProx adds a regularizer; the
server optimizers change the server step only).

The accumulator holds one float64 buffer per tensor, so memory is O(model) whatever the number of
updates: the server feeds updates one at a time as it reads them from the blob store.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from facefl import codec
from facefl.algorithms.base import Algorithm, Hyperparams, TrainResult
from facefl.algorithms.local import (
    LocalJob,
    local_state,
    train_loop,
    trainable_parameters,
    unnormalized_embeddings,
)
from facefl.losses import pair_margin_loss

TensorDict = dict[str, np.ndarray]


class WeightedMean:
    """Running sum_i w_i * x_i / sum_i w_i over named tensors with identical names and shapes."""

    def __init__(self) -> None:
        self._sums: dict[str, np.ndarray] = {}
        self._scratch = np.empty(0, np.float64)  # reused: one weighted copy at a time, no per-add temporaries
        self._total_weight = 0.0
        self.count = 0

    @property
    def total_weight(self) -> float:
        return self._total_weight

    def add(self, tensors: Mapping[str, np.ndarray], weight: float) -> None:
        if not np.isfinite(weight) or weight <= 0:
            raise ValueError(f"weight must be a positive finite number, got {weight}")
        if self._sums and tensors.keys() != self._sums.keys():
            raise ValueError("update tensor names differ from the first update's")
        for name, value in tensors.items():
            arr = np.asarray(value)
            acc = self._sums.get(name)
            if acc is None:
                self._sums[name] = arr.astype(np.float64) * weight
            else:
                if acc.shape != arr.shape:
                    raise ValueError(f"tensor {name!r}: shape {arr.shape} != {acc.shape}")
                if self._scratch.size < arr.size:
                    self._scratch = np.empty(arr.size, np.float64)
                weighted = self._scratch[: arr.size].reshape(arr.shape)
                # dtype=float64 makes NumPy compute in float64: without it NumPy 2 multiplies in the input's
                # float32 and only then stores, so 3e38 * 10 would already be inf
                np.multiply(arr, weight, out=weighted, dtype=np.float64)
                acc += weighted
        self._total_weight += float(weight)
        self.count += 1

    def result(self, dtype: np.dtype | type = np.float32) -> TensorDict:
        if self.count == 0:
            raise ValueError("no updates were added")
        return {name: (acc / self._total_weight).astype(dtype) for name, acc in self._sums.items()}


def fedavg(updates: Iterable[tuple[Mapping[str, np.ndarray], float]]) -> TensorDict:
    """Weighted mean of (tensors, weight) pairs, consumed lazily from any iterable."""
    acc = WeightedMean()
    for tensors, weight in updates:
        acc.add(tensors, weight)
    return acc.result()


class FedAvgHyperparams(Hyperparams):
    """FedAvg's local update (and that of every algorithm built on it): the shared fields plus its loss.

    ``loss``: "cosface" trains the embedding with the device's private CosFace head; "pair_margin" trains
    it with dlib's pairwise metric loss (:func:`facefl.losses.pair_margin_loss`, on the unnormalized
    embedding, ``pair_threshold`` and ``pair_margin`` in its units): the loss dlib-resnet was trained with,
    which fine-tunes it without reshaping its geometry (benchmarks/finetune_study.py).
    """

    loss: Literal["cosface", "pair_margin"] = "cosface"
    pair_threshold: Annotated[float, Field(gt=0, le=100)] = 0.6
    pair_margin: Annotated[float, Field(ge=0, le=100)] = 0.04


class FedAvg(Algorithm):
    """FedAvg: the weighted mean of the updates is the new version's delta; the device trains its
    backbone with a CosFace head over its local identities (the head is private and persisted)."""

    name = "fedavg"
    title = "FedAvg (McMahan et al., 2017): weighted mean of the updates"
    hyperparams: ClassVar[type[Hyperparams]] = FedAvgHyperparams
    # the metric reporting the regularizer's mean over steps is "<regularizer_metric>_mean"
    regularizer_metric: ClassVar[str] = "regularizer"

    def regularizer(self, hp: Any, model: torch.nn.Module) -> Callable[[], torch.Tensor] | None:
        """A term added to every batch's loss (FedProx's proximal term); None: none."""
        return None

    def local_update(self, job: LocalJob) -> TrainResult:
        started = time.perf_counter()
        hp, gen = job.prepare()
        dataset = job.dataset
        model = job.backbone()
        trained = job.freeze_outside(model)
        x_all = job.preprocess(dataset.images)
        y_all = torch.from_numpy(dataset.labels).to(job.device)
        embedding_dim = job.embedding_dim(model)

        emb_before = job.embed(model, x_all)  # eval mode, under the received model
        head = job.load_or_init_head(emb_before, embedding_dim, hp)
        loss_before, _ = job.score(head, emb_before, y_all)
        regularizer = self.regularizer(hp, model)

        pair = hp.loss == "pair_margin"

        def step(idx: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            y = y_all[idx]
            if pair:
                emb = unnormalized_embeddings(model, x)
                loss = pair_margin_loss(emb, y, hp.pair_threshold, hp.pair_margin)
            else:
                loss = F.cross_entropy(head(model(x), y), y)
            if regularizer is None:
                return loss, {"loss": loss}
            reg = regularizer()
            return loss + reg, {"loss": loss, "regularizer": reg}

        # the pair loss has no classes: the head is kept (and scored) but does not train
        params = trainable_parameters(model) + ([] if pair else list(head.parameters()))
        stats = train_loop(job, model, trained, params, hp, gen, x_all, step, modules=(head,))

        loss_after, acc_after = job.score(head, job.embed(model, x_all), y_all)
        delta = job.delta(local_state(model), trained)
        job.save_head(head)
        epoch_loss = stats.last_epoch.get("loss", 0.0)
        # train_loss*: mean CosFace loss over an epoch's batches (train mode, augmented);
        # loss_before/after, train_accuracy: the whole local set in eval mode (BatchNorm running stats)
        metrics = {
            "train_loss": epoch_loss,
            "train_loss_first_epoch": stats.first_epoch.get("loss", epoch_loss),
            "loss_before": loss_before,
            "loss_after": loss_after,
            "train_accuracy": acc_after,
            "steps": float(stats.steps),
            "epochs": float(hp.local_epochs),
            "delta_norm": codec.global_norm(delta),
        }
        if regularizer is not None:
            metrics[f"{self.regularizer_metric}_mean"] = stats.mean("regularizer")
        return TrainResult(
            delta=delta, num_samples=len(dataset), metrics=metrics, seconds=time.perf_counter() - started
        )
