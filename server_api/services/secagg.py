"""Secure aggregation of a round (facefl.secagg; docs/protocol.md "Secure aggregation"): the device
requests of each stage. The stage changes are :mod:`server_api.services.secagg_stages`.

Every request runs in one transaction holding the round's secagg row (FOR UPDATE), so stage changes and
requests never interleave; a refused request changes nothing.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy.orm import Session

from facefl import codec
from facefl.fileio import sha256_file
from facefl.secagg import keys, shamir
from facefl.secagg.roster import SHARE_CIPHERTEXT_BYTES
from server_api import metrics as prom
from server_api import security
from server_api.errors import ApiError, conflict, forbidden, gone, invalid, not_found
from server_api.orm import (
    ROUND_OPEN,
    SECAGG_ADVERTISE,
    SECAGG_DONE,
    SECAGG_SHARE,
    SECAGG_UNMASK,
    SECAGG_UPLOAD,
    Assignment,
    ModelVersion,
    Round,
    SecAggMember,
    SecAggReveal,
    SecAggRound,
    SecAggShare,
    Task,
    utcnow,
)
from server_api.schemas import SecAggAccepted, SecAggKeysIn, SecAggMemberOut, SecAggStateOut, UpdateAccepted
from server_api.services import models, queries, secagg_resend, secagg_stages, secagg_sum
from server_api.services.context import ServiceContext, log
from server_api.services.secagg_cohorts import FrozenCohort

_STAGES = (SECAGG_ADVERTISE, SECAGG_SHARE, SECAGG_UPLOAD, SECAGG_UNMASK, SECAGG_DONE)


@dataclass
class _Caller:
    rnd: Round
    state: SecAggRound
    assignment: Assignment


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _authorize(s: Session, round_id: int, device_id: str, upload_token: str, *, lock: bool) -> _Caller:
    """404 unknown round or no secure aggregation; 403 not this device's assignment (upload token)."""
    state = queries.secagg_state(s, round_id, lock=lock)  # first: the lock orders us before reading the round
    rnd = s.get(Round, round_id) if state is not None else None
    if rnd is None or state is None:
        raise not_found(f"secure aggregation of round {round_id}")
    assignment = queries.assignment_of(s, round_id, device_id)
    stored = assignment.upload_token_hash if assignment is not None else "0" * 64
    if not hmac.compare_digest(security.hash_secret(upload_token), stored) or assignment is None:
        raise forbidden("upload token is not valid for this device and round")
    return _Caller(rnd, state, assignment)


def _require_stage(caller: _Caller, stage: str, now: datetime) -> None:
    """410 round closed or stage deadline passed; 409 ``wrong_stage``."""
    if caller.rnd.status != ROUND_OPEN or caller.rnd.deadline <= now:
        raise gone(f"round {caller.rnd.id} is closed or its {caller.state.stage} stage is over")
    if caller.state.stage != stage:
        raise conflict(
            f"round {caller.rnd.id} is in its {caller.state.stage} stage, not {stage}", code="wrong_stage"
        )


def _member(s: Session, caller: _Caller, device_id: str, *, sharer: bool = False) -> SecAggMember:
    """403 ``not_in_cohort``: the device did not advertise keys (or, with ``sharer``, is not in U2)."""
    member = s.get(SecAggMember, (caller.rnd.id, device_id))
    if member is None or (sharer and not member.shared):
        raise ApiError(403, "not_in_cohort", f"device is not in the cohort of round {caller.rnd.id}")
    return member


def _resend_answer(caller: _Caller, device_id: str, what: str) -> SecAggAccepted:
    """A resend of what this device's request already recorded (it lost the answer): answered like the
    first one, whatever the stage is now, and nothing changes (secagg_resend)."""
    log.info(
        "secure aggregation request resent, answered from the record",
        extra={"round_id": caller.rnd.id, "device_id": device_id, "request": what},
    )
    return SecAggAccepted(round_id=caller.rnd.id, stage=caller.state.stage)  # type: ignore[arg-type]


def _public_key(text: str, field: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise invalid("bad_key", f"{field} is not base64") from exc
    if len(raw) != keys.PUBLIC_KEY_BYTES:
        raise invalid("bad_key", f"{field} must be {keys.PUBLIC_KEY_BYTES} bytes")
    try:  # a low-order point gives every peer an all-zero shared secret
        keys.derive_key(keys.KeyPair.generate().private, raw, round_id=0, purpose=b"check")
    except keys.KeyError_ as exc:
        raise invalid("bad_key", f"{field} is not a usable X25519 public key") from exc
    return raw


# ------------------------------------------------------------------------------------ requests


def advertise(
    ctx: ServiceContext, round_id: int, device_id: str, upload_token: str, body: SecAggKeysIn
) -> SecAggAccepted:
    c_public, s_public = _public_key(body.c_public, "c_public"), _public_key(body.s_public, "s_public")
    if c_public == s_public:
        raise invalid("bad_key", "c_public and s_public must differ")
    now = utcnow()
    with ctx.db.write() as s:
        caller = _authorize(s, round_id, device_id, upload_token, lock=True)
        recorded = s.get(SecAggMember, (round_id, device_id))
        sent = secagg_resend.keys_digest(c_public, s_public)
        if recorded is not None and secagg_resend.keys_digest(recorded.c_public, recorded.s_public) == sent:
            return _resend_answer(caller, device_id, secagg_resend.KEYS)
        _require_stage(caller, SECAGG_ADVERTISE, now)
        members = queries.secagg_members(s, round_id)
        if any(m.device_id == device_id for m in members):
            raise conflict("this device already advertised its keys in this round", code="already_done")
        taken = {bytes(k) for m in members for k in (m.c_public, m.s_public)}
        if c_public in taken or s_public in taken:
            raise invalid("bad_key", "a public key of another device of this round")
        s.add(SecAggMember(round_id=round_id, device_id=device_id, c_public=c_public, s_public=s_public))
        s.flush()
        outcome = secagg_stages.close_if_complete(s, caller.rnd, caller.state, now)
        stage = caller.state.stage
    secagg_stages.follow_up(ctx, round_id, outcome)
    return SecAggAccepted(round_id=round_id, stage=stage)  # type: ignore[arg-type]


def post_shares(
    ctx: ServiceContext, round_id: int, device_id: str, upload_token: str, body: bytes
) -> SecAggAccepted:
    """``body``: the encrypted shares for this device's neighbours, sorted by device id, concatenated."""
    now, sent = utcnow(), secagg_resend.body_digest(body)
    with ctx.db.write() as s:
        caller = _authorize(s, round_id, device_id, upload_token, lock=True)
        recorded = s.get(SecAggMember, (round_id, device_id))
        # in the share stage, shares rows exist exactly when the flag is set: no read for a first post
        if (
            recorded is not None
            and (recorded.shared or caller.state.stage != SECAGG_SHARE)
            and secagg_resend.shares_digest(s, recorded) == sent
        ):
            return _resend_answer(caller, device_id, secagg_resend.SHARES)
        _require_stage(caller, SECAGG_SHARE, now)
        member = _member(s, caller, device_id)
        if member.shared:
            raise conflict("this device already sent its shares in this round", code="already_done")
        neighbours = _cohort(ctx, s, caller).roster.neighbours(device_id)
        expected = len(neighbours) * SHARE_CIPHERTEXT_BYTES
        if len(body) != expected:
            raise invalid(
                "bad_shares",
                f"expected {len(neighbours)} shares of {SHARE_CIPHERTEXT_BYTES} bytes ({expected} bytes), "
                f"got {len(body)} bytes",
            )
        for i, recipient in enumerate(neighbours):
            chunk = body[i * SHARE_CIPHERTEXT_BYTES : (i + 1) * SHARE_CIPHERTEXT_BYTES]
            s.add(
                SecAggShare(round_id=round_id, sender_id=device_id, recipient_id=recipient, ciphertext=chunk)
            )
        member.shared = True
        s.flush()
        outcome = secagg_stages.close_if_complete(s, caller.rnd, caller.state, now)
        stage = caller.state.stage
    secagg_stages.follow_up(ctx, round_id, outcome)
    return SecAggAccepted(round_id=round_id, stage=stage)  # type: ignore[arg-type]


@dataclass(frozen=True)
class MaskedTarget:
    round_id: int
    device_id: str
    upload_token: str
    vector_length: int
    recorded: secagg_resend.RecordedUpload | None = None  # this device's upload is in: a resend?


def preflight_masked(ctx: ServiceContext, round_id: int, device_id: str, upload_token: str) -> MaskedTarget:
    """The checks of a masked upload that need no body (run before it is read). When this device's
    upload was already accepted, the body decides: the same one is a resend, another is refused."""
    with ctx.db.read() as s:
        caller = _authorize(s, round_id, device_id, upload_token, lock=False)
        recorded = secagg_resend.masked_of(s, caller.assignment)
        if recorded is None:
            _refuse_masked(s, caller, device_id)
        length = _vector_length(ctx, s, caller.rnd)
    return MaskedTarget(round_id, device_id, upload_token, length, recorded)


def _refuse_masked(s: Session, caller: _Caller, device_id: str) -> None:
    """In this order: 410, 409 ``wrong_stage``, 403 ``not_in_cohort``, 409 ``conflict`` (accepted)."""
    _require_stage(caller, SECAGG_UPLOAD, utcnow())
    _member(s, caller, device_id, sharer=True)
    if caller.assignment.reported:
        raise conflict("this assignment's update was already accepted")


def _masked_resend(ctx: ServiceContext, target: MaskedTarget, staged: Path) -> UpdateAccepted:
    """The body of a device whose upload was accepted: the same one is answered from the record; another
    gets the refusal it would have got before its body was read."""
    assert target.recorded is not None
    with ctx.db.read() as s:
        caller = _authorize(s, target.round_id, target.device_id, target.upload_token, lock=False)
        if sha256_file(staged) != target.recorded.digest:
            _refuse_masked(s, caller, target.device_id)
            raise conflict("this assignment's update was already accepted")  # not reached: it is reported
        return _upload_answer(s, target, target.recorded)


def _upload_answer(
    s: Session, target: MaskedTarget, recorded: secagg_resend.RecordedUpload
) -> UpdateAccepted:
    """A resent masked update, answered from the record (with today's count of uploads)."""
    log.info(
        "secure aggregation request resent, answered from the record",
        extra={"round_id": target.round_id, "device_id": target.device_id, "request": secagg_resend.MASKED},
    )
    reports = len(queries.uploaders_of(s, target.round_id))
    return UpdateAccepted(update_id=recorded.update_id, round_id=target.round_id, reports=reports)


def accept_masked(ctx: ServiceContext, target: MaskedTarget, staged: Path) -> UpdateAccepted:
    """Validate the staged body (one U32 tensor of the round's vector length), store it, record it."""
    if target.recorded is not None:
        return _masked_resend(ctx, target, staged)
    try:
        secagg_sum.masked_values(staged, target.vector_length)
    except codec.CodecError as exc:
        raise invalid("bad_update", str(exc)) from exc
    key, size = ctx.blobs.put_file(staged)
    now = utcnow()
    try:
        with ctx.db.write() as s:
            caller = _authorize(s, target.round_id, target.device_id, target.upload_token, lock=True)
            # the same body may have been recorded since the preflight (a resend racing the first
            # request, on another worker): answered from the record, before the stage (it may have moved)
            recorded = secagg_resend.masked_of(s, caller.assignment)
            if recorded is not None and recorded.digest == key:
                return _upload_answer(s, target, recorded)  # the blob is the recorded one: kept
            _require_stage(caller, SECAGG_UPLOAD, now)
            _member(s, caller, target.device_id, sharer=True)
            update_id = queries.record_masked_update(
                s, caller.assignment, blob_key=key, size_bytes=size, now=now
            )
            if update_id is None:
                raise conflict("this assignment's update was already accepted")
            reports = len(queries.uploaders_of(s, target.round_id))
            outcome = secagg_stages.close_if_complete(s, caller.rnd, caller.state, now)
    except BaseException:
        models.drop_unreferenced_blob(ctx, key)
        raise
    prom.REPORTS_ACCEPTED.inc()
    prom.UPLOAD_BYTES.inc(size)
    log.info("masked update accepted", extra={"round_id": target.round_id, "device_id": target.device_id})
    secagg_stages.follow_up(ctx, target.round_id, outcome)
    return UpdateAccepted(update_id=update_id, round_id=target.round_id, reports=reports)


def reveal(
    ctx: ServiceContext, round_id: int, device_id: str, upload_token: str, body: bytes
) -> SecAggAccepted:
    """``body``: 66-byte share values, first of the mask keys of this device's dropped neighbours (U2 - U3),
    then of the self-mask seeds of its surviving neighbours (U3), each list sorted by device id."""
    now, sent = utcnow(), secagg_resend.body_digest(body)
    with ctx.db.write() as s:
        caller = _authorize(s, round_id, device_id, upload_token, lock=True)
        recorded = s.get(SecAggMember, (round_id, device_id))
        if recorded is not None and secagg_resend.reveal_digest(s, recorded) == sent:
            return _resend_answer(caller, device_id, secagg_resend.REVEAL)
        _require_stage(caller, SECAGG_UNMASK, now)
        member = _member(s, caller, device_id, sharer=True)
        cohort = _cohort(ctx, s, caller)
        assert cohort.sharers is not None and cohort.uploaders is not None  # the unmask stage
        uploaders = cohort.uploaders
        if device_id not in uploaders:
            raise ApiError(403, "not_in_cohort", "only devices whose masked update arrived reveal shares")
        if member.revealed:
            raise conflict("this device already revealed its shares in this round", code="already_done")
        mine = set(cohort.roster.neighbours(device_id)) & cohort.sharers
        owners = [("mask_key", o) for o in sorted(mine - uploaders)] + [
            ("self_seed", o) for o in sorted(mine & uploaders)
        ]
        width = shamir.SHARE_BYTES
        if len(body) != len(owners) * width:
            raise invalid(
                "bad_shares", f"expected {len(owners)} shares of {width} bytes, got {len(body)} bytes"
            )
        for i, (kind, owner) in enumerate(owners):
            chunk = body[i * width : (i + 1) * width]
            try:
                shamir.Share.from_bytes(1, chunk)
            except shamir.ShamirError as exc:
                raise invalid("bad_shares", f"share of {owner}: {exc}") from exc
            s.add(
                SecAggReveal(round_id=round_id, holder_id=device_id, owner_id=owner, kind=kind, share=chunk)
            )
        member.revealed = True
        s.flush()
        outcome = secagg_stages.close_if_complete(s, caller.rnd, caller.state, now)
        stage = caller.state.stage
    secagg_stages.follow_up(ctx, round_id, outcome)
    return SecAggAccepted(round_id=round_id, stage=stage)  # type: ignore[arg-type]


def view(ctx: ServiceContext, round_id: int, device_id: str, upload_token: str) -> SecAggStateOut:
    """This device's view of the round's secure aggregation (any round status: it tells a device waiting
    for a stage that the round was abandoned)."""
    with ctx.db.read() as s:
        caller = _authorize(s, round_id, device_id, upload_token, lock=False)
        state, rnd = caller.state, caller.rnd
        reached = _STAGES.index(state.stage)
        out = SecAggStateOut(
            round_id=round_id,
            round_status=rnd.status,
            stage=state.stage,  # type: ignore[arg-type]
            deadline=rnd.deadline,
            retry_after_s=ctx.settings.tick_interval_s,
            vector_length=_vector_length(ctx, s, rnd),
            submitted=secagg_resend.submitted(s, caller.assignment, state.stage, ctx.secagg_submitted),
        )
        if reached >= _STAGES.index(SECAGG_SHARE):
            cohort = _cohort(ctx, s, caller)
            out.graph_seed = state.graph_seed
            out.roster = [
                SecAggMemberOut(device_id=a.device_id, c_public=_b64(a.c_public), s_public=_b64(a.s_public))
                for a in cohort.roster.advertisements
            ]
            if cohort.sharers is not None:
                out.sharers = sorted(cohort.sharers)
                out.inbox = {
                    r.sender_id: _b64(r.ciphertext) for r in queries.secagg_inbox(s, round_id, device_id)
                }
            if cohort.uploaders is not None:
                out.uploaders = sorted(cohort.uploaders)
        return out


def _cohort(ctx: ServiceContext, s: Session, caller: _Caller) -> FrozenCohort:
    """The round's cohort as of its stage (share stage on): final once read, so cached per process
    (``FrozenCohorts``) instead of read and its graph rebuilt by every request of every device."""
    rid, stage = caller.rnd.id, caller.state.stage
    cached = ctx.secagg_cohorts.get(rid, stage)
    if cached is not None:
        return cached
    reached = _STAGES.index(stage)
    assert reached >= _STAGES.index(SECAGG_SHARE)
    members = queries.secagg_members(s, rid)
    cohort = FrozenCohort(
        stage=stage,
        roster=secagg_stages.cohort_roster(caller.state, members),
        sharers=frozenset(m.device_id for m in members if m.shared)
        if reached >= _STAGES.index(SECAGG_UPLOAD)
        else None,
        uploaders=frozenset(queries.uploaders_of(s, rid))
        if reached >= _STAGES.index(SECAGG_UNMASK)
        else None,
    )
    ctx.secagg_cohorts.put(rid, cohort)
    return cohort


def _vector_length(ctx: ServiceContext, s: Session, rnd: Round) -> int:
    base = s.get(ModelVersion, rnd.base_version)
    task = s.get(Task, rnd.task_id)
    assert base is not None and task is not None
    specs = models.specs_of_blob(ctx, base.blob_key)
    return secagg_sum.vector_length(secagg_sum.layout(specs, task.architecture, task.trainable))
