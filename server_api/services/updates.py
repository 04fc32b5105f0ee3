"""Update intake: authorization checks, payload validation, and a durable commit before 202."""

from __future__ import annotations

import hmac
import json
import math
from dataclasses import dataclass
from typing import Any

from facefl import codec
from facefl.algorithms import registry
from facefl.models import resolve_trainable, trainable_names
from server_api import metrics as prom
from server_api import security
from server_api.errors import conflict, forbidden, gone, invalid, not_found
from server_api.orm import ROUND_OPEN, utcnow
from server_api.schemas import UpdateAccepted, has_control_chars
from server_api.services import aggregation, models, queries
from server_api.services.context import ServiceContext, log
from server_api.services.intake import StagedUpdate

MAX_METRICS = 32
_NO_HASH = "0" * 64  # compared against when there is no assignment: timing does not tell


@dataclass(frozen=True)
class UploadTarget:
    """What an upload is validated against, read (and authorized) before its body is."""

    round_id: int
    device_id: str
    assignment_id: int
    token_hash: str  # of the upload token presented: the commit compares it again
    base_version: int
    norm_bound: float | None
    algorithm: str
    # the tensors the update must hold (the base model's trainable ones, plus the algorithm's extras)
    expected: dict[str, codec.TensorSpec]
    extras: frozenset[str]  # the algorithm's extras (not in the norm, checked by the algorithm)
    max_sample_weight: int | None = None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a finite number")


def parse_metrics(raw: str | None) -> dict[str, float]:
    """X-Metrics: a JSON object of at most 32 finite numbers with short names (no control characters).

    Crafted input (deep nesting, 10^400, NaN) is a 422, never a 500.
    """
    if raw is None or raw == "":
        return {}
    try:
        value = json.loads(raw, parse_constant=_no_constant)
    except RecursionError as exc:
        raise invalid("bad_metrics", "X-Metrics is nested too deeply") from exc
    except ValueError as exc:  # not JSON, NaN/Infinity, or an integer too long to convert
        raise invalid("bad_metrics", f"X-Metrics is not valid JSON: {exc}") from exc
    if not isinstance(value, dict) or len(value) > MAX_METRICS:
        raise invalid("bad_metrics", f"X-Metrics must be a JSON object of at most {MAX_METRICS} numbers")
    out: dict[str, float] = {}
    for k, v in value.items():
        if not 0 < len(k) <= 64 or has_control_chars(k):
            raise invalid("bad_metrics", "X-Metrics names must be 1-64 characters, none a control character")
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise invalid("bad_metrics", f"X-Metrics[{k!r}] must be a finite number")
        try:
            number = float(v)  # an integer such as 10**400 overflows a float
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise invalid("bad_metrics", f"X-Metrics[{k!r}] must be a finite number")
        out[k] = number
    return out


def _check(view: queries.UploadView | None, round_id: int, token_hash: str) -> queries.UploadView:
    """The checks that need no payload: 404 round, 403 token, 409 already used, 410 closed."""
    if view is None:
        raise not_found(f"round {round_id}")
    stored = view.upload_token_hash if view.upload_token_hash is not None else _NO_HASH
    if not hmac.compare_digest(token_hash, stored) or view.assignment_id is None:
        raise forbidden("upload token is not valid for this device and round")
    if view.reported:
        raise conflict("this assignment's update was already accepted")
    if view.round_status != ROUND_OPEN or view.deadline <= utcnow():
        raise gone(f"round {round_id} is closed")
    return view


def preflight(ctx: ServiceContext, round_id: int, device_id: str, upload_token: str) -> UploadTarget:
    """Run before the body is read: a request that will be refused anyway is not streamed to disk."""
    token_hash = security.hash_secret(upload_token)
    with ctx.db.driver_read() as tx:
        view = _check(queries.upload_view(tx, round_id, device_id), round_id, token_hash)
    assert view.assignment_id is not None  # _check
    policy = view.policy
    if policy.get("secure_aggregation"):  # an unmasked update must never be taken in such a round
        raise conflict(
            f"round {round_id} uses secure aggregation: POST /v1/rounds/{round_id}/secagg/masked-update",
            code="secure_aggregation",
        )
    bound = policy.get("update_norm_bound")
    algorithm = registry.get(view.algorithm)
    extras = algorithm.update_extras(int(view.embedding_dim or 0))
    specs_of_base = models.specs_of_blob(ctx, view.base_blob_key)
    trainable = resolve_trainable(view.architecture, view.trainable)
    expected = {n: specs_of_base[n] for n in trainable_names(specs_of_base, trainable)}
    return UploadTarget(
        round_id=round_id,
        device_id=device_id,
        assignment_id=view.assignment_id,
        token_hash=token_hash,
        base_version=view.base_version,
        norm_bound=None
        if bound in (None, "off")
        else float(bound),  # None: a task created before the default
        algorithm=view.algorithm,
        expected={**expected, **extras},
        extras=frozenset(extras),
        max_sample_weight=policy.get("max_sample_weight"),
    )


def open_upload(
    ctx: ServiceContext, round_id: int, device_id: str, upload_token: str
) -> tuple[UploadTarget, StagedUpdate]:
    """:func:`preflight`, then the staging file the body streams into, validated on the way
    (server_api.services.intake): one thread hop for both."""
    target = preflight(ctx, round_id, device_id, upload_token)
    return target, StagedUpdate(ctx.blobs, target.expected, target.extras)


def validate(target: UploadTarget, staged: StagedUpdate) -> float:
    """The checks that need the whole payload (its names, shapes, dtypes and finite values were checked
    while it streamed): the algorithm's extras and the norm bound on the decoded values; the norm."""
    result = staged.finish()
    try:
        registry.get(target.algorithm).check_update_extras(result.kept)
    except ValueError as exc:
        raise invalid("bad_update", str(exc)) from exc
    if target.norm_bound is not None and result.norm > target.norm_bound:
        raise invalid(
            "norm_too_large",
            f"update norm {result.norm:.4g} exceeds the task's bound {target.norm_bound:.4g}",
        )
    return result.norm


class _Refused(Exception):
    """A compare-and-set of the commit failed: the transaction rolls back, then we say why."""


def accept(
    ctx: ServiceContext,
    target: UploadTarget,
    staged: StagedUpdate,
    *,
    num_samples: int,
    metrics: dict[str, float],
) -> UpdateAccepted:
    """Validate, then make the update durable (blob fsynced, row committed) before answering 202."""
    norm = validate(target, staged)
    key, size = staged.store()
    row = {
        "round_id": target.round_id,
        "device_id": target.device_id,
        "assignment_id": target.assignment_id,
        "token_hash": target.token_hash,
        "blob_key": key,
        "size_bytes": size,
        # the weight this update gets in the mean: the task caps what a device may claim
        "num_samples": min(num_samples, target.max_sample_weight or num_samples),
        "norm": norm,
        "metrics": metrics,
        "now": utcnow(),
    }
    try:
        try:
            # the same checks again under the write lock, as compare-and-sets: the round may have closed,
            # or the device may have checked in again (a new upload token) while the body streamed
            with ctx.db.driver_write() as tx:
                recorded = queries.record_update(tx, row)
                if recorded is None:
                    raise _Refused
        except _Refused:
            with ctx.db.driver_read() as tx:
                _check(
                    queries.upload_view(tx, target.round_id, target.device_id),
                    target.round_id,
                    target.token_hash,
                )
            raise gone(f"round {target.round_id} is closed") from None
    except BaseException:
        models.drop_unreferenced_blob(ctx, key)
        raise
    update_id, reports, target_reports = recorded
    prom.REPORTS_ACCEPTED.inc()
    prom.UPLOAD_BYTES.inc(size)
    log.info(
        "update accepted", extra={"round_id": target.round_id, "device_id": target.device_id, "bytes": size}
    )
    if reports >= target_reports:
        ctx.submit(aggregation.aggregate_round, ctx, target.round_id)
    return UpdateAccepted(update_id=update_id, round_id=target.round_id, reports=reports)


__all__ = ["UploadTarget", "accept", "open_upload", "parse_metrics", "preflight", "validate"]
