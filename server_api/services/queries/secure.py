"""The secure-aggregation rounds' rows: stage state, members, encrypted shares, reveals, masked uploads."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from server_api.orm import (
    ROUND_OPEN,
    Assignment,
    Round,
    SecAggMember,
    SecAggReveal,
    SecAggRound,
    SecAggShare,
    Update,
)

# ------------------------------------------------------------------------------ secure aggregation


def secagg_state(s: Session, round_id: int, *, lock: bool = False) -> SecAggRound | None:
    """The round's secure-aggregation row; ``lock``: FOR UPDATE on PostgreSQL (SQLite has one writer),
    so stage changes and the requests of a stage are serialized per round."""
    stmt = select(SecAggRound).where(SecAggRound.round_id == round_id)
    return s.scalars(stmt.with_for_update() if lock else stmt).first()


def secagg_members(s: Session, round_id: int) -> Sequence[SecAggMember]:
    return s.scalars(
        select(SecAggMember).where(SecAggMember.round_id == round_id).order_by(SecAggMember.device_id)
    ).all()


def secagg_round_ids(s: Session, round_ids: Sequence[int]) -> set[int]:
    if not round_ids:
        return set()
    return set(s.scalars(select(SecAggRound.round_id).where(SecAggRound.round_id.in_(round_ids))).all())


def secagg_inbox(s: Session, round_id: int, recipient: str) -> Sequence[SecAggShare]:
    """The shares for ``recipient`` from the devices that stayed in the share stage's outcome (U2)."""
    sharers = select(SecAggMember.device_id).where(SecAggMember.round_id == round_id, SecAggMember.shared)
    return s.scalars(
        select(SecAggShare)
        .where(
            SecAggShare.round_id == round_id,
            SecAggShare.recipient_id == recipient,
            SecAggShare.sender_id.in_(sharers),
        )
        .order_by(SecAggShare.sender_id)
    ).all()


def secagg_reveals(s: Session, round_id: int) -> Sequence[SecAggReveal]:
    return s.scalars(select(SecAggReveal).where(SecAggReveal.round_id == round_id)).all()


def uploaders_of(s: Session, round_id: int) -> list[str]:
    return list(s.scalars(select(Update.device_id).where(Update.round_id == round_id)).all())


def record_masked_update(
    s: Session, assignment: Assignment, *, blob_key: str, size_bytes: int, now: datetime
) -> int | None:
    """A masked upload: compare-and-set the assignment (not reported), count it on the open round, add
    its row (weight and norm unknown to the server: 0); its id. None: a compare-and-set failed (the caller
    rolls back)."""
    marked = s.execute(
        update(Assignment)
        .where(Assignment.id == assignment.id, Assignment.reported.is_(False))
        .values(reported=True)
    )
    if marked.rowcount != 1:  # type: ignore[attr-defined]
        return None
    counted = s.execute(
        update(Round)
        .where(Round.id == assignment.round_id, Round.status == ROUND_OPEN)
        .values(reported=Round.reported + 1)
    )
    if counted.rowcount != 1:  # type: ignore[attr-defined]
        return None
    row = Update(
        round_id=assignment.round_id,
        device_id=assignment.device_id,
        assignment_id=assignment.id,
        blob_key=blob_key,
        size_bytes=size_bytes,
        num_samples=0,
        norm=0.0,
        metrics={},
        created_at=now,
    )
    s.add(row)
    s.flush()
    return row.id
