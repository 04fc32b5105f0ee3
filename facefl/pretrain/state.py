"""Pretraining's resumable state: model, head and SGD momentum after an epoch, next to the checkpoint.

Resuming is at epoch granularity and exact: the data order and augmentation of epoch ``e`` depend only
on ``(seed, e)`` (see :func:`facefl.pretrain.loop.epoch_generators`), and the state file holds the full
module state, head and momentum buffers. A state written by a run with another training key (everything
that shapes the trajectory, :meth:`PretrainConfig.training_key`) is refused, never silently mixed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Progress", "restore", "save"]


@dataclass
class Progress:
    """Where a run stands: the last finished epoch, the global step, the table so far, the metrics of
    the last evaluation."""

    epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


def _momentum_params(optimizer: Any) -> list[Any]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def restore(state_path: Path, key: dict[str, Any], named: dict[str, Any], optimizer: Any) -> Progress:
    """Load the state at ``state_path`` into the ``named`` tensors and the optimizer's momentum;
    CheckpointError when it belongs to another run (its key differs) or lacks a tensor."""
    import torch

    from facefl.checkpoint import CheckpointError, load_training_state

    state = load_training_state(state_path)
    saved_key = state.metadata.get("config") or {}
    if saved_key != key:
        diff = sorted(k for k in key.keys() | saved_key.keys() if key.get(k) != saved_key.get(k))
        raise CheckpointError(
            f"{state_path} was written by a different run (differs in: {', '.join(diff)}); "
            "pass --no-resume to start over (overwriting it) or choose another --out"
        )
    with torch.no_grad():
        for name, tensor in named.items():
            if name not in state.tensors:
                raise CheckpointError(f"{state_path}: missing tensor {name!r}")
            tensor.copy_(torch.from_numpy(np.array(state.tensors[name])))
    for i, p in enumerate(_momentum_params(optimizer)):
        buf = state.tensors.get(f"momentum.{i}")
        if buf is not None:
            optimizer.state[p]["momentum_buffer"] = torch.from_numpy(np.array(buf))
    return Progress(
        epoch=int(state.metadata["epoch"]),
        step=int(state.metadata["step"]),
        history=list(state.metadata.get("history") or []),
        metrics=dict(state.metadata.get("metrics") or {}),
    )


def save(
    state_path: Path,
    key: dict[str, Any],
    named: dict[str, Any],
    optimizer: Any,
    progress: Progress,
    *,
    total_steps: int,
    warmup_steps: int,
    seed: int,
) -> None:
    """Write the state after ``progress.epoch`` (atomically, see :func:`facefl.checkpoint`)."""
    from facefl.checkpoint import save_training_state

    tensors: dict[str, Any] = {k: v.detach().clone() for k, v in named.items()}
    for i, p in enumerate(_momentum_params(optimizer)):
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            tensors[f"momentum.{i}"] = buf
    save_training_state(
        state_path,
        tensors,
        {
            "config": key,
            "epoch": progress.epoch,
            "step": progress.step,
            "total_steps": total_steps,
            "warmup_steps": warmup_steps,
            "seed": seed,
            "rng": "per-epoch generators seeded by (seed, epoch)",
            "history": progress.history,
            "metrics": progress.metrics,
        },
    )
