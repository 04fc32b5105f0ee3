"""Server-side evaluation of each new model version on the task's held-out generic set (off the loop)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from facefl import codec
from facefl.embedders import TorchEmbedder
from facefl.evaluation import VerificationSet, evaluate_verification
from facefl.models import ARCHITECTURES, backbone_from_weights
from server_api.orm import ModelVersion
from server_api.services.context import ServiceContext, log


@lru_cache(maxsize=4)
def _verification_set(root: str, image_size: int) -> VerificationSet:
    # decoded once per process and size: the set is read-only and every version reuses it
    return VerificationSet.from_dir(Path(root), image_size)


def evaluate_weights(
    ctx: ServiceContext,
    eval_set: str,
    architecture: str,
    embedding_dim: int | None,
    weights: Mapping[str, np.ndarray],
) -> dict[str, Any]:
    """The evaluation report of ``weights`` on the configured set ``eval_set`` (nothing is stored)."""
    t0 = time.perf_counter()
    vset = _verification_set(str(ctx.settings.eval_sets[eval_set]), ARCHITECTURES[architecture].image_size)
    model = backbone_from_weights(architecture, embedding_dim, weights)
    report: dict[str, Any] = dict(evaluate_verification(TorchEmbedder(model, architecture), vset))
    report.update(set=eval_set, seconds=time.perf_counter() - t0)
    return report


def report_of(ctx: ServiceContext, version: int, eval_set: str) -> dict[str, Any]:
    """The version's stored report on ``eval_set``; evaluated (and stored) now when there is none yet."""
    with ctx.db.read() as s:
        mv = s.get(ModelVersion, version)
        if mv is None:
            raise ValueError(f"model version {version} does not exist")
        stored = mv.metrics.get("eval")
    if isinstance(stored, dict) and stored.get("set") == eval_set:
        return stored
    return evaluate_version(ctx, version, eval_set)


def evaluate_version(ctx: ServiceContext, version: int, eval_set: str) -> dict[str, Any]:
    """Embed the set with the version's weights, score it, and store the metrics with the version."""
    with ctx.db.read() as s:
        mv = s.get(ModelVersion, version)
        if mv is None:
            raise ValueError(f"model version {version} does not exist")
        architecture, embedding_dim, blob_key = mv.architecture, mv.embedding_dim, mv.blob_key
    weights = codec.load_file(ctx.blobs.path(blob_key))
    report = evaluate_weights(ctx, eval_set, architecture, embedding_dim, weights)
    with ctx.db.write() as s:
        mv = s.get(ModelVersion, version)
        assert mv is not None
        mv.metrics = {**mv.metrics, "eval": report}  # a new dict: JSON columns track assignment, not mutation
    log.info("model version evaluated", extra={"model_version": version, "accuracy": report["accuracy"]})
    return report
