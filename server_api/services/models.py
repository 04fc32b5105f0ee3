"""Model versions: creation (with lineage), listing and blob access."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from facefl import codec
from facefl.models import ARCHITECTURES, build_backbone, state_to_numpy
from server_api.errors import invalid, not_found
from server_api.orm import ModelVersion
from server_api.schemas import ModelVersionOut
from server_api.services import queries
from server_api.services.blob_cache import VersionBlob
from server_api.services.context import ServiceContext, log


def store_weights(
    ctx: ServiceContext, tensors: Mapping[str, np.ndarray], architecture: str
) -> tuple[str, int]:
    """Write weights to the blob store; returns (blob key = sha256, size). Safe to call outside a txn."""
    key, size = ctx.blobs.put_bytes(codec.encode(tensors, metadata={"architecture": architecture}))
    return key, size


def add_version(
    s: Session,
    *,
    task_id: int | None,
    parent: int | None,
    round_id: int | None,
    architecture: str,
    embedding_dim: int | None,
    blob: tuple[str, int],
    metrics: dict[str, Any] | None = None,
) -> ModelVersion:
    key, size = blob
    mv = ModelVersion(
        task_id=task_id,
        parent_version=parent,
        round_id=round_id,
        architecture=architecture,
        embedding_dim=embedding_dim,
        blob_key=key,
        sha256=key,  # content-addressed: the blob key is the sha256
        size_bytes=size,
        metrics=metrics or {},
    )
    s.add(mv)
    s.flush()
    return mv


def info(ctx: ServiceContext, version: int) -> ModelVersionOut:
    with ctx.db.read() as s:
        mv = s.get(ModelVersion, version)
        if mv is None:
            raise not_found(f"model version {version}")
        return ModelVersionOut.model_validate(mv)


def listing(
    ctx: ServiceContext, task_id: int | None, before: int | None = None, limit: int | None = None
) -> list[ModelVersionOut]:
    """Model versions in order; with ``limit``, the newest ``limit`` numbered below ``before``."""
    with ctx.db.read() as s:
        return [
            ModelVersionOut.model_validate(mv) for mv in queries.model_versions(s, task_id, before, limit)
        ]


def metrics_by_version(ctx: ServiceContext, task_id: int) -> list[tuple[int, dict[str, Any]]]:
    """Every version of the task with its metrics (evaluation report, gate), in order: for curves over
    a long task, without loading whole rows."""
    with ctx.db.read() as s:
        return list(queries.version_metrics(s, task_id))


def blob_path(ctx: ServiceContext, version: int) -> tuple[Path, str]:
    with ctx.db.read() as s:
        mv = s.get(ModelVersion, version)
        if mv is None:
            raise not_found(f"model version {version}")
        return ctx.blobs.path(mv.blob_key), mv.sha256


def served_blob_path(ctx: ServiceContext, version: int, principal: str) -> tuple[Path, str]:
    """``blob_path`` for a download: a version the release gate held back is the admin's only."""
    with ctx.db.read() as s:
        mv = s.get(ModelVersion, version)
        if mv is None or (not mv.served and principal != "admin"):
            raise not_found(f"model version {version}")
        return ctx.blobs.path(mv.blob_key), mv.sha256


def version_blob(ctx: ServiceContext, version: int) -> VersionBlob:
    """The blob row of a model version, from this process's cache or the database (404: no such
    version). Only found rows are cached: a version another worker commits later is found then."""
    row = ctx.version_blobs.get(version)
    if row is None:
        with ctx.db.driver_read() as tx:
            found = queries.version_blob(tx, version)
        if found is None:
            raise not_found(f"model version {version}")
        row = VersionBlob(*found)
        ctx.version_blobs.put(version, row)
    return row


def expected_specs(ctx: ServiceContext, version: int) -> dict[str, codec.TensorSpec]:
    """Names and shapes an update against this base version must have (read from the blob header)."""
    path, _ = blob_path(ctx, version)
    return _specs_cached(str(path))


def specs_of_blob(ctx: ServiceContext, blob_key: str) -> dict[str, codec.TensorSpec]:
    """:func:`expected_specs` of a model version whose blob key is known (no query)."""
    return _specs_cached(str(ctx.blobs.path(blob_key)))


@lru_cache(maxsize=256)
def _specs_cached(path: str) -> dict[str, codec.TensorSpec]:
    # model blobs are immutable and content-addressed, so a cached header never goes stale
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(header_len))
    return {
        name: codec.TensorSpec(shape=tuple(entry["shape"]), dtype=entry["dtype"])
        for name, entry in header.items()
        if name != "__metadata__"
    }


def import_weights(
    ctx: ServiceContext, staged: Path, architecture: str | None, embedding_dim: int | None
) -> ModelVersionOut:
    """A root model version from uploaded weights (e.g. a `facefl pretrain` checkpoint).

    The architecture and embedding size come from the query or the safetensors metadata; the tensors
    must match exactly what the registry builds for them, and be finite.
    """
    try:
        header = codec.read_file_header(staged)  # the header only: bounded, strictly typed
        meta = header.metadata
        architecture = architecture or meta.get("architecture")
        if architecture not in ARCHITECTURES:
            raise invalid(
                "unknown_architecture",
                f"architecture {str(architecture)[:32]!r} is not one of {sorted(ARCHITECTURES)} "
                "(query or metadata)",
            )
        if embedding_dim is None and "embedding_dim" in meta:
            # ASCII digits only: str.isdigit() accepts "²", which int() then refuses
            if re.fullmatch(r"[0-9]{1,4}", meta["embedding_dim"]) is None:
                raise invalid("bad_metadata", "metadata embedding_dim is not an integer in 8..4096")
            embedding_dim = int(meta["embedding_dim"])
            if not 8 <= embedding_dim <= 4096:
                raise invalid("bad_metadata", "metadata embedding_dim is not an integer in 8..4096")
        embedding_dim = embedding_dim or ARCHITECTURES[architecture].default_embedding_dim
        expected = codec.specs_of(state_to_numpy(build_backbone(architecture, embedding_dim, seed=0)))
        codec.check_compatible(header.specs, expected)  # before any tensor is read
        tensors = codec.load_file(staged)
        codec.check_finite(tensors)
    except codec.CodecError as exc:
        raise invalid("bad_model", str(exc)) from exc
    blob = store_weights(ctx, {k: np.asarray(v, np.float32) for k, v in tensors.items()}, architecture)
    with ctx.db.write() as s:
        mv = add_version(
            s, task_id=None, parent=None, round_id=None, architecture=architecture,
            embedding_dim=embedding_dim, blob=blob, metrics={},
        )  # fmt: skip
        return ModelVersionOut.model_validate(mv)


def drop_unreferenced_blob(ctx: ServiceContext, key: str) -> None:
    """Delete a refused upload's blob unless identical bytes are referenced elsewhere (content-addressed
    store). Cleanup only: a failure is logged, never raised over the refusal being answered."""
    try:
        with ctx.db.read() as s:
            referenced = queries.blob_referenced(s, key)
        if not referenced:
            ctx.blobs.delete(key)
    except Exception:  # never mask the original error
        log.exception("could not clean up blob %s", key)
