"""The stages of a secure-aggregation round and their changes (docs/protocol.md "Secure aggregation").

A round whose task asks for secure aggregation has a ``secagg_rounds`` row from its opening; its stages
run in order, each until every device expected in it has answered or until the stage's deadline (the
round's ``deadline`` column, moved at each change):

- ``advertise``: assigned devices post two X25519 public keys; it closes at ``target_reports`` devices
  (or at the round deadline with at least ``min_reports``); the cohort (U1) is fixed and check-ins stop;
- ``share``: each cohort member posts its encrypted shares for its neighbours; U2 = those that did (less
  those left with fewer neighbours in U2 than their threshold);
- ``upload``: U2 posts masked updates; U3 = those that arrived;
- ``unmask``: U3 reveal shares; when every needed secret has its threshold, the round is aggregated.

Too few devices at any close abandons the round (it reopens on the same base). The callers hold the
round's secagg row locked (FOR UPDATE) while they change it.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from facefl.secagg import server as unmasking
from facefl.secagg.roster import Advertisement, Roster
from server_api.orm import (
    ROUND_OPEN,
    SECAGG_ADVERTISE,
    SECAGG_DONE,
    SECAGG_SHARE,
    SECAGG_UNMASK,
    SECAGG_UPLOAD,
    Round,
    SecAggMember,
    SecAggRound,
    utcnow,
)
from server_api.services import aggregation, queries, rounds, secagg_sum
from server_api.services.context import ServiceContext


@dataclass(frozen=True)
class Outcome:
    """What a stage change asks for once its transaction committed."""

    abandon: str | None = None  # the reason
    aggregate: bool = False


def cohort_roster(state: SecAggRound, members: Sequence[SecAggMember]) -> Roster:
    ads = [Advertisement(m.device_id, bytes(m.c_public), bytes(m.s_public)) for m in members]
    return secagg_sum.roster_of(state, ads)


def advance(ctx: ServiceContext, round_id: int) -> bool:
    """The ticker's step for a secure-aggregation round: close the stage when its deadline passed or
    everyone expected answered. True when something changed."""
    now = utcnow()
    with ctx.db.write() as s:
        state = queries.secagg_state(s, round_id, lock=True)  # first: see secagg._authorize
        rnd = s.get(Round, round_id)
        if rnd is None or state is None or rnd.status != ROUND_OPEN:
            return False
        before = state.stage
        if before == SECAGG_DONE:  # its aggregation was submitted but never started (a crash): again
            outcome = Outcome(aggregate=True)
        elif rnd.deadline <= now:
            outcome = _close(s, rnd, state, now)
        else:
            outcome = close_if_complete(s, rnd, state, now)
        changed = state.stage != before or outcome != Outcome()
    follow_up(ctx, round_id, outcome)
    return changed


def follow_up(ctx: ServiceContext, round_id: int, outcome: Outcome) -> None:
    if outcome.abandon is not None:
        rounds.abandon(ctx, round_id, outcome.abandon)
    elif outcome.aggregate:
        ctx.submit(aggregation.aggregate_round, ctx, round_id)


def close_if_complete(s: Session, rnd: Round, state: SecAggRound, now: datetime) -> Outcome:
    """Close the stage early when every device expected in it has answered."""
    rid, stage = rnd.id, state.stage
    members = queries.secagg_members(s, rid)
    if stage == SECAGG_ADVERTISE:
        complete = len(members) >= rnd.target_reports
    elif stage == SECAGG_SHARE:
        complete = all(m.shared for m in members)
    elif stage == SECAGG_UPLOAD:
        complete = {m.device_id for m in members if m.shared} <= set(queries.uploaders_of(s, rid))
    elif stage == SECAGG_UNMASK:
        uploaders = set(queries.uploaders_of(s, rid))
        complete = all(m.revealed for m in members if m.device_id in uploaders)
    else:
        complete = False
    return _close(s, rnd, state, now) if complete else Outcome()


def _next_stage(rnd: Round, state: SecAggRound, stage: str, now: datetime) -> None:
    state.stage = stage
    rnd.deadline = now + timedelta(seconds=float(state.params["stage_timeout_s"]))


def _close(s: Session, rnd: Round, state: SecAggRound, now: datetime) -> Outcome:
    """Close the current stage with whoever answered in it (the caller holds the row lock)."""
    members = queries.secagg_members(s, rnd.id)
    need = rnd.min_reports
    if state.stage == SECAGG_ADVERTISE:
        if len(members) < need:
            return Outcome(
                abandon=f"secure aggregation: {len(members)} devices advertised keys, {need} needed"
            )
        state.graph_seed = secrets.randbelow(2**31)
        rnd.max_assignments = rnd.assigned  # the cohort is fixed: no more check-ins
        _next_stage(rnd, state, SECAGG_SHARE, now)
        return Outcome()
    roster = cohort_roster(state, members)
    sharers = {m.device_id for m in members if m.shared}
    if state.stage == SECAGG_SHARE:
        # a sharer whose neighbours in U2 are fewer than its threshold could not be unmasked: out
        while True:
            short = {u for u in sharers if len(roster.graph[u] & sharers) < roster.threshold(u)}
            if not short:
                break
            sharers -= short
        for m in members:
            m.shared = m.device_id in sharers
        if len(sharers) < need:
            return Outcome(abandon=f"secure aggregation: {len(sharers)} devices shared keys, {need} needed")
        _next_stage(rnd, state, SECAGG_UPLOAD, now)
        return Outcome()
    uploaders = set(queries.uploaders_of(s, rnd.id))
    if state.stage == SECAGG_UPLOAD:
        if len(uploaders) < need:
            return Outcome(abandon=f"secure aggregation: {len(uploaders)} masked updates, {need} needed")
        if unmasking.missing_secrets(roster, sharers=sharers, uploaders=uploaders, revealers=uploaders):
            return Outcome(abandon="secure aggregation: too few survivors to remove the masks")
        _next_stage(rnd, state, SECAGG_UNMASK, now)
        return Outcome()
    if state.stage == SECAGG_UNMASK:
        revealers = {m.device_id for m in members if m.revealed}
        missing = unmasking.missing_secrets(roster, sharers=sharers, uploaders=uploaders, revealers=revealers)
        if missing:
            return Outcome(
                abandon=f"secure aggregation: too few shares revealed for {len(missing)} device(s)"
            )
        state.stage = SECAGG_DONE
        return Outcome(aggregate=True)
    return Outcome()
