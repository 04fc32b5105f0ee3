"""Update intake: authorization checks, payload validation, and a durable commit before 202."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from facefl import codec
from facefl.algorithms import registry
from facefl.models import resolve_trainable, trainable_names
from server_api import metrics as prom
from server_api import security
from server_api.errors import conflict, forbidden, gone, invalid, not_found
from server_api.orm import ROUND_OPEN, Assignment, Round, Task, Update, utcnow
from server_api.schemas import UpdateAccepted, has_control_chars
from server_api.services import aggregation, models, queries
from server_api.services.context import ServiceContext, log

MAX_METRICS = 32


@dataclass(frozen=True)
class UploadTarget:
    round_id: int
    base_version: int
    norm_bound: float | None
    algorithm: str = registry.DEFAULT
    embedding_dim: int | None = None
    max_sample_weight: int | None = None
    # partial training: the name prefixes of the task's trainable groups (None: every tensor)
    trainable_prefixes: tuple[str, ...] | None = None


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


def _check_assignment(
    s: Session, round_id: int, device_id: str, upload_token: str
) -> tuple[Round, Assignment]:
    """The checks that need no payload: 404 round, 403 token, 409 already used, 410 closed."""
    rnd = s.get(Round, round_id)
    if rnd is None:
        raise not_found(f"round {round_id}")
    assignment = queries.assignment_of(s, round_id, device_id)
    stored = assignment.upload_token_hash if assignment is not None else "0" * 64
    if not security.matches(upload_token, stored) or assignment is None:
        raise forbidden("upload token is not valid for this device and round")
    if assignment.reported:
        raise conflict("this assignment's update was already accepted")
    if rnd.status != ROUND_OPEN or rnd.deadline <= utcnow():
        raise gone(f"round {round_id} is closed")
    return rnd, assignment


def preflight(ctx: ServiceContext, round_id: int, device_id: str, upload_token: str) -> UploadTarget:
    """Run before the body is read: a request that will be refused anyway is not streamed to disk."""
    with ctx.db.read() as s:
        rnd, _ = _check_assignment(s, round_id, device_id, upload_token)
        task = s.get(Task, rnd.task_id)
        assert task is not None
        bound = task.policy.get("update_norm_bound")
        return UploadTarget(
            round_id,
            rnd.base_version,
            None if bound in (None, "off") else float(bound),  # None: a task created before the default
            task.algorithm,
            task.embedding_dim,
            task.policy.get("max_sample_weight"),
            resolve_trainable(task.architecture, task.trainable),
        )


def validate_payload(ctx: ServiceContext, target: UploadTarget, staged: Path) -> float:
    """Names, shapes, dtypes, finite values and the norm bound; returns the update's L2 norm.

    The names are exactly the base model's trainable tensors (all of them without ``trainable``), plus
    the algorithm's update extras (FedFace's class embedding), which do not count in the norm. The staged
    file is read in chunks (codec.scan_file), never whole: memory per upload stays small whatever the
    body size.
    """
    specs_of_base = models.expected_specs(ctx, target.base_version)
    expected = {n: specs_of_base[n] for n in trainable_names(specs_of_base, target.trainable_prefixes)}
    # the task's embedding size was read with the round in preflight: no extra query per upload
    algorithm = registry.get(target.algorithm)
    extra_specs = algorithm.update_extras(int(target.embedding_dim or 0))
    expected = {**expected, **extra_specs}
    try:
        header = codec.read_file_header(staged)
        codec.check_compatible(header.specs, expected)
        norm, kept = codec.scan_file(staged, header, keep=frozenset(extra_specs))
    except codec.CodecError as exc:
        raise invalid("bad_update", str(exc)) from exc
    extras = {name: kept[name] for name in extra_specs if name in kept}
    try:
        algorithm.check_update_extras(extras)
    except ValueError as exc:
        raise invalid("bad_update", str(exc)) from exc
    if target.norm_bound is not None and norm > target.norm_bound:
        raise invalid(
            "norm_too_large", f"update norm {norm:.4g} exceeds the task's bound {target.norm_bound:.4g}"
        )
    return norm


def accept(
    ctx: ServiceContext,
    *,
    round_id: int,
    device_id: str,
    upload_token: str,
    staged: Path,
    num_samples: int,
    metrics: dict[str, float],
) -> UpdateAccepted:
    """Validate, then make the update durable (blob fsynced, row committed) before answering 202."""
    try:
        target = preflight(ctx, round_id, device_id, upload_token)
        norm = validate_payload(ctx, target, staged)
        key, size = ctx.blobs.put_file(staged)
    finally:
        staged.unlink(missing_ok=True)
    try:
        with ctx.db.write() as s:
            # re-check under the write lock: the round may have closed while we validated
            rnd, assignment = _check_assignment(s, round_id, device_id, upload_token)
            if not queries.count_report(s, round_id, utcnow()):
                raise gone(f"round {round_id} is closed")
            assignment.reported = True
            update = Update(
                round_id=round_id,
                device_id=device_id,
                assignment_id=assignment.id,
                blob_key=key,
                size_bytes=size,
                # the weight this update gets in the mean: the task caps what a device may claim
                num_samples=min(num_samples, target.max_sample_weight or num_samples),
                norm=norm,
                metrics=metrics,
            )
            s.add(update)
            s.flush()
            s.refresh(rnd)
            accepted = UpdateAccepted(update_id=update.id, round_id=round_id, reports=rnd.reported)
            target_reached = rnd.reported >= rnd.target_reports
    except BaseException:
        _drop_unreferenced(ctx, key)
        raise
    prom.REPORTS_ACCEPTED.inc()
    prom.UPLOAD_BYTES.inc(size)
    log.info("update accepted", extra={"round_id": round_id, "device_id": device_id, "bytes": size})
    if target_reached:
        ctx.submit(aggregation.aggregate_round, ctx, round_id)
    return accepted


def _drop_unreferenced(ctx: ServiceContext, key: str) -> None:
    """A refused update leaves no blob behind (unless identical bytes are referenced elsewhere)."""
    try:
        with ctx.db.read() as s:
            referenced = queries.blob_referenced(s, key)
        if not referenced:
            ctx.blobs.delete(key)
    except Exception:  # never mask the original error
        log.exception("could not clean up blob %s", key)


__all__ = ["UploadTarget", "accept", "parse_metrics", "preflight"]
