"""An algorithm's server state (facefl.algorithms.base.ServerState) as a blob referenced by the model
version's ``server_state_key``: FedFace's class embeddings, a server optimizer's moments."""

from __future__ import annotations

from facefl import codec
from facefl.algorithms import registry
from facefl.algorithms.base import ServerState
from server_api.errors import not_found
from server_api.orm import ModelVersion, Task
from server_api.services.context import ServiceContext


def read(ctx: ServiceContext, key: str | None) -> ServerState | None:
    return None if key is None else ServerState.decode(ctx.blobs.read(key))


def store(ctx: ServiceContext, state: ServerState | None) -> str | None:
    """The state's blob key (None: no state)."""
    if state is None:
        return None
    key, _ = ctx.blobs.put_bytes(state.encode())
    return key


def device_state_of(ctx: ServiceContext, version: int, device_id: str) -> bytes:
    """The part of the version's server state that belongs to the device (FedFace: its own class
    embedding), as safetensors bytes; 404 when there is none."""
    with ctx.db.read() as s:
        mv = s.get(ModelVersion, version)
        if mv is None:
            raise not_found(f"model version {version}")
        key = mv.server_state_key
        task = s.get(Task, mv.task_id) if mv.task_id is not None else None
        algorithm = registry.get(task.algorithm) if task is not None else None
    state = read(ctx, key) if algorithm is not None else None
    tensors = (
        algorithm.device_state(state, device_id) if algorithm is not None and state is not None else None
    )
    if tensors is None:
        raise not_found(f"no class embedding for this device at model version {version}")
    return codec.encode(tensors)
