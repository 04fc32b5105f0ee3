"""The aggregation of a secure-aggregation round: the masked uploads summed modulo 2^32 (one memory-mapped
blob at a time: memory O(model)), the masks removed with the revealed shares (facefl.secagg.server), the
sum dequantized and divided by the unmasked total weight."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy.orm import Session

from facefl import codec
from facefl.models import resolve_trainable, trainable_names
from facefl.secagg import fixedpoint
from facefl.secagg import server as unmasking
from facefl.secagg.roster import Advertisement, Roster
from server_api.orm import SECAGG_DONE, SecAggRound
from server_api.services import queries

MASKED_TENSOR = "masked"
U32 = {"U32": np.dtype("uint32")}

TensorLayout = list[tuple[str, tuple[int, ...]]]


class SecAggFailure(ValueError):
    """The masks cannot be removed (inconsistent shares) or the total weight is not usable."""


@dataclass(frozen=True)
class SecAggInputs:
    roster: Roster
    sharers: frozenset[str]
    uploaders: frozenset[str]
    mask_key_shares: dict[str, dict[str, bytes]]
    self_seed_shares: dict[str, dict[str, bytes]]
    scale: float
    bound: float
    max_weight: int
    ready: bool  # the unmask stage closed with every needed secret


def layout(
    specs_of_base: Mapping[str, codec.TensorSpec], architecture: str, trainable: list[str] | None
) -> TensorLayout:
    """The tensors of a masked upload, flattened one after the other in this order, then the weight."""
    names = trainable_names(specs_of_base, resolve_trainable(architecture, trainable))
    return [(name, specs_of_base[name].shape) for name in sorted(names)]


def vector_length(tensors: TensorLayout) -> int:
    return sum(math.prod(shape) for _, shape in tensors) + 1


def roster_of(state: SecAggRound, members: Sequence[Advertisement]) -> Roster:
    assert state.graph_seed is not None
    return Roster.build(
        state.round_id, members, graph_seed=state.graph_seed, max_degree=int(state.params["max_neighbours"])
    )


def inputs_of(s: Session, round_id: int) -> SecAggInputs | None:
    """None: a plain round."""
    state = s.get(SecAggRound, round_id)
    if state is None:
        return None
    members = queries.secagg_members(s, round_id) if state.graph_seed is not None else []
    ads = [Advertisement(m.device_id, bytes(m.c_public), bytes(m.s_public)) for m in members]
    seed, degree = state.graph_seed or 0, int(state.params["max_neighbours"])
    roster = Roster.build(round_id, ads, graph_seed=seed, max_degree=degree)
    key_shares: dict[str, dict[str, bytes]] = {}
    seed_shares: dict[str, dict[str, bytes]] = {}
    for r in queries.secagg_reveals(s, round_id):
        target = key_shares if r.kind == "mask_key" else seed_shares
        target.setdefault(r.owner_id, {})[r.holder_id] = bytes(r.share)
    return SecAggInputs(
        roster=roster,
        sharers=frozenset(m.device_id for m in members if m.shared),
        uploaders=frozenset(queries.uploaders_of(s, round_id)),
        mask_key_shares=key_shares,
        self_seed_shares=seed_shares,
        scale=float(state.params["scale"]),
        bound=float(state.params["bound"]),
        max_weight=int(state.params["max_sample_weight"]),
        ready=state.stage == SECAGG_DONE,
    )


def masked_values(path: Path, length: int) -> np.ndarray:
    """The uint32 vector of a stored masked upload, memory-mapped (validated at intake)."""
    header = codec.read_file_header(path, dtypes=U32)
    spec = header.specs.get(MASKED_TENSOR)
    if set(header.specs) != {MASKED_TENSOR} or spec is None or spec.shape != (length,):
        raise codec.CodecError(f"a masked upload holds one U32 tensor {MASKED_TENSOR!r} of shape [{length}]")
    start, _ = header.offsets[MASKED_TENSOR]
    return np.memmap(path, dtype="<u4", mode="r", offset=header.data_start + start, shape=(length,))


def weighted_mean(
    inputs: SecAggInputs, paths: Sequence[Path], tensors: TensorLayout
) -> tuple[dict[str, np.ndarray], int]:
    """(the weighted mean delta by tensor, the total weight) of the uploaders' updates."""
    if not inputs.ready:
        raise SecAggFailure("the unmask stage has not completed")
    length = vector_length(tensors)
    total = np.zeros(length, dtype=np.uint32)
    for path in paths:
        total += masked_values(path, length)  # uint32 arithmetic: modulo 2^32
    try:
        plain = unmasking.unmask_sum(
            total,
            inputs.roster,
            sharers=inputs.sharers,
            uploaders=inputs.uploaders,
            mask_key_shares=inputs.mask_key_shares,
            self_seed_shares=inputs.self_seed_shares,
        )
    except unmasking.UnmaskError as exc:
        raise SecAggFailure(str(exc)) from exc
    devices = len(inputs.uploaders)
    if not fixedpoint.plausible_sum(
        plain, devices=devices, max_weight=inputs.max_weight, scale=inputs.scale, bound=inputs.bound
    ):
        raise SecAggFailure("the unmasked sum is out of range: a revealed share or an upload was wrong")
    weight = int(plain[-1])  # the sum of integer weights, each <= max_sample_weight: no wrap (schemas)
    mean = fixedpoint.dequantize(plain[:-1], scale=inputs.scale) / weight
    out: dict[str, np.ndarray] = {}
    cursor = 0
    for name, shape in tensors:
        size = math.prod(shape)
        out[name] = mean[cursor : cursor + size].reshape(shape).astype(np.float32)
        cursor += size
    return out, weight
