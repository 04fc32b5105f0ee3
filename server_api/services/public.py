"""The public face set on the server (FedFR's, or any algorithm whose ``public_set`` names one): the
image pack and the per-version feature bank.

The pack (every public image at the model's input size) is built once per (set, image size); the bank
(fp16 embeddings of the pack under one model version, with identity labels) once per version, eagerly
after each aggregation and lazily on first request. Both live in the content-addressed blob store; a
small index file under ``<data_dir>/derived`` maps what they were built from to their blob key, so every
worker and every restart reuses them. Building is CPU work: callers run it off the event loop.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

import numpy as np

from facefl import codec
from facefl.algorithms import registry
from facefl.data.public import PublicSet, decode_pack, encode_pack, load_public_set
from facefl.embedders import TorchEmbedder
from facefl.fileio import atomic_write_bytes
from facefl.models import ARCHITECTURES, backbone_from_weights
from server_api.errors import invalid, not_found
from server_api.orm import ModelVersion, Task
from server_api.services.context import ServiceContext, log

BANK_EMBEDDINGS, BANK_LABELS = "embeddings", "labels"

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock_for(name: str) -> threading.Lock:
    # one builder per artefact in this process; other workers may build the same bytes concurrently,
    # which is harmless: the blob store is content-addressed and the index write is atomic
    with _locks_guard:
        return _locks.setdefault(name, threading.Lock())


def _index_path(ctx: ServiceContext, name: str) -> Path:
    return ctx.settings.data_dir / "derived" / f"{name}.key"


def _read_index(ctx: ServiceContext, name: str) -> str | None:
    path = _index_path(ctx, name)
    try:
        key = path.read_text(encoding="ascii").strip()
    except OSError:
        return None
    return key if ctx.blobs.exists(key) else None


def _write_index(ctx: ServiceContext, name: str, key: str) -> None:
    atomic_write_bytes(_index_path(ctx, name), key.encode("ascii"))


def check_set_name(ctx: ServiceContext, name: str | None) -> str:
    if not name:
        raise invalid("public_set_required", "hyperparams.public_set is required (a FACEFL_PUBLIC_SETS name)")
    if name not in ctx.settings.public_sets:
        known = sorted(ctx.settings.public_sets) or "none (set FACEFL_PUBLIC_SETS)"
        raise invalid("unknown_public_set", f"public_set {name!r} is not configured; known: {known}")
    return name


def pack_key(ctx: ServiceContext, name: str, image_size: int) -> str:
    """Blob key of the set's pack at ``image_size``, building it on first use."""
    index = f"pack-{name}-{image_size}"
    with _lock_for(index):
        key = _read_index(ctx, index)
        if key is None:
            public = load_public_set(ctx.settings.public_sets[name], image_size)
            key, size = ctx.blobs.put_bytes(encode_pack(public))
            _write_index(ctx, index, key)
            log.info(
                "public pack built", extra={"public_set": name, "images": len(public.images), "bytes": size}
            )
        return key


@lru_cache(maxsize=2)
def _pack_cached(path: str) -> PublicSet:
    # decoded once per process: packs are immutable (content-addressed)
    return decode_pack(Path(path).read_bytes())


def load_pack(ctx: ServiceContext, name: str, image_size: int) -> PublicSet:
    return _pack_cached(str(ctx.blobs.path(pack_key(ctx, name, image_size))))


def _embed(
    architecture: str, embedding_dim: int | None, weights: Mapping[str, np.ndarray], images: np.ndarray
) -> np.ndarray:
    model = backbone_from_weights(architecture, embedding_dim, weights)
    return TorchEmbedder(model, architecture).embed(images)


class Env:
    """What the server offers an algorithm at task creation (``facefl.algorithms.base.ServerEnv``)."""

    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx

    def public_set(self, name: str, image_size: int) -> PublicSet:
        return load_pack(self._ctx, check_set_name(self._ctx, name), image_size)

    def embed(
        self,
        architecture: str,
        embedding_dim: int | None,
        weights: Mapping[str, np.ndarray],
        images: np.ndarray,
    ) -> np.ndarray:
        return _embed(architecture, embedding_dim, weights, images)


def public_set_of(task: Task | None) -> str | None:
    """The public set a task's algorithm uses (None for a task whose algorithm uses none)."""
    if task is None:
        return None
    algorithm = registry.get(task.algorithm)
    return algorithm.public_set(algorithm.hyperparams.lenient(task.hyperparams or {}))


def _version_and_set(ctx: ServiceContext, version: int) -> tuple[ModelVersion, str]:
    with ctx.db.read() as s:
        mv = s.get(ModelVersion, version)
        if mv is None:
            raise not_found(f"model version {version}")
        name = public_set_of(s.get(Task, mv.task_id) if mv.task_id is not None else None)
        if not name:
            raise not_found(
                f"model version {version} belongs to no task with a public set (FedFR): it has no public "
                "feature bank"
            )
        s.expunge(mv)
        return mv, name


def bank_key(ctx: ServiceContext, version: int) -> str:
    """Blob key of the version's public feature bank, computing it on first use."""
    mv, name = _version_and_set(ctx, version)
    index = f"bank-{mv.sha256}-{name}"
    with _lock_for(index):
        key = _read_index(ctx, index)
        if key is None:
            public = load_pack(ctx, name, ARCHITECTURES[mv.architecture].image_size)
            weights = codec.load_file(ctx.blobs.path(mv.blob_key))
            emb = _embed(mv.architecture, mv.embedding_dim, weights, public.images)
            data = codec.encode(
                {BANK_EMBEDDINGS: emb.astype(np.float16), BANK_LABELS: public.labels.astype(np.float32)},
                metadata={"model_sha256": mv.sha256, "public_set": name},
            )
            key, _ = ctx.blobs.put_bytes(data)
            _write_index(ctx, index, key)
            log.info("public bank built", extra={"model_version": version, "images": len(emb)})
        return key


def task_pack_key(ctx: ServiceContext, task_id: int) -> str:
    with ctx.db.read() as s:
        task = s.get(Task, task_id)
        if task is None:
            raise not_found(f"task {task_id}")
        name = public_set_of(task)
        architecture = task.architecture
    if not name:
        raise not_found(f"task {task_id} uses no public set (not a FedFR task): it has no public pack")
    return pack_key(ctx, name, ARCHITECTURES[architecture].image_size)
