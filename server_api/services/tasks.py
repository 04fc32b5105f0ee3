"""Task creation (initial model version + first round) and task status."""

from __future__ import annotations

import functools

from sqlalchemy.orm import Session

from facefl import codec
from facefl.algorithms import registry
from facefl.algorithms.base import Algorithm, Hyperparams
from facefl.models import ARCHITECTURES, backbone_state, build_backbone, resolve_trainable, state_to_numpy
from server_api.errors import conflict, invalid, not_found
from server_api.orm import TASK_PAUSED, TASK_RUNNING, ModelVersion, Task
from server_api.schemas import RoundOut, TaskOut
from server_api.services import evaluation, models, privacy, public, queries, rounds
from server_api.services.context import ServiceContext, log
from server_api.task_schemas import TaskIn


def create(ctx: ServiceContext, body: TaskIn) -> TaskOut:
    try:
        resolve_trainable(body.architecture, body.trainable)
    except ValueError as exc:
        raise invalid("unknown_parameter_group", str(exc)) from exc
    if body.eval_set is not None and body.eval_set not in ctx.settings.eval_sets:
        known = sorted(ctx.settings.eval_sets) or "none (set FACEFL_EVAL_SETS)"
        raise invalid("unknown_eval_set", f"eval_set {body.eval_set!r} is not configured; known: {known}")
    _check_privacy_budget(body)
    arch = ARCHITECTURES[body.architecture]
    embedding_dim = body.embedding_dim or arch.default_embedding_dim
    blob = None
    algorithm = registry.get(body.algorithm)
    hp = algorithm.hyperparams.model_validate(body.hyperparams)
    public_set = algorithm.public_set(hp)
    if public_set is not None:
        public.check_set_name(ctx, public_set)
    if algorithm.global_extra_prefixes:
        # the global model is the backbone plus the algorithm's extras (FedFR's public classifier): a new
        # version, child of the initial one when given (CPU work: before the transaction opens)
        blob, embedding_dim = _initial_model_with_extras(ctx, body, algorithm, hp, embedding_dim)
    elif body.initial_version is None:
        # CPU work (building and serializing the model) happens before the transaction opens
        backbone = build_backbone(body.architecture, embedding_dim=embedding_dim, seed=body.seed)
        blob = models.store_weights(ctx, state_to_numpy(backbone), body.architecture)
    with ctx.db.write() as s:
        if body.initial_version is not None:
            base = _initial_version(s, body)
            embedding_dim = base.embedding_dim or embedding_dim
        task = Task(
            name=body.name,
            algorithm=body.algorithm,
            architecture=body.architecture,
            embedding_dim=embedding_dim,
            image_size=arch.image_size,
            rounds=body.rounds,
            hyperparams=body.hyperparams,
            policy=_resolved_policy(body, embedding_dim),
            status="running",
            eval_set=body.eval_set,
            trainable=body.trainable,
            aggregated_rounds=0,
        )
        s.add(task)
        s.flush()
        if blob is not None:
            mv = models.add_version(
                s,
                task_id=task.id,
                parent=body.initial_version,
                round_id=None,
                architecture=body.architecture,
                embedding_dim=embedding_dim,
                blob=blob,
            )
            task.current_version = mv.version
        else:
            task.current_version = body.initial_version
        rounds.open_round(s, task)
        out = _task_out(s, task)
    if out.eval_set is not None and out.current_version is not None:
        ctx.submit_eval(evaluation.evaluate_version, ctx, out.current_version, out.eval_set)
    return out


def _check_privacy_budget(body: TaskIn) -> None:
    """422 when policy.dp.epsilon_budget does not even cover the first round."""
    settings = privacy.dp_policy(body.policy.model_dump())
    if settings is None or settings.epsilon_budget is None:
        return
    first = settings.epsilon(1)
    if first > settings.epsilon_budget:
        raise invalid(
            "privacy_budget_too_small",
            f"policy.dp.epsilon_budget {settings.epsilon_budget:g} is below one round's epsilon "
            f"{first:.4g} (noise_multiplier {settings.noise_multiplier:g}, sampling rate "
            f"{settings.sampling_rate:.4g}, delta {settings.delta:g})",
        )


#: The default update-norm bound is this many times the L2 norm of the architecture's fresh weights.
#: Honest updates carry BatchNorm running statistics, which move far more than the weights: 20 devices x
#: 5 local epochs of `small` on generated faces gave norms up to 1,166, 25x its fresh norm of 46.8. The
#: bound is a sanity limit (robust aggregation handles subtler attacks): it must never refuse an honest
#: device, and it keeps any one update many orders of magnitude below what overflows float32.
NORM_BOUND_FACTOR = 1000.0


@functools.lru_cache(maxsize=32)
def default_update_norm_bound(architecture: str, embedding_dim: int) -> float:
    """NORM_BOUND_FACTOR x the L2 norm of the architecture's freshly initialised weights (seed 0)."""
    weights = state_to_numpy(build_backbone(architecture, embedding_dim=embedding_dim, seed=0))
    return float(f"{NORM_BOUND_FACTOR * codec.global_norm(weights):.4g}")


def _resolved_policy(body: TaskIn, embedding_dim: int) -> dict[str, object]:
    policy = body.policy.model_dump()
    if policy["update_norm_bound"] is None:
        policy["update_norm_bound"] = default_update_norm_bound(body.architecture, embedding_dim)
    return policy


def _initial_version(s: Session, body: TaskIn) -> ModelVersion:
    """The task's initial model version, checked against the requested architecture and embedding size."""
    assert body.initial_version is not None
    base = s.get(ModelVersion, body.initial_version)
    if base is None:
        raise invalid("unknown_model_version", f"initial_version {body.initial_version} does not exist")
    if base.architecture != body.architecture:
        raise invalid(
            "architecture_mismatch",
            f"initial_version {base.version} is a {base.architecture} model, not {body.architecture}",
        )
    if base.embedding_dim is not None and body.embedding_dim not in (None, base.embedding_dim):
        raise invalid(
            "embedding_dim_mismatch", f"initial_version {base.version} has embedding_dim {base.embedding_dim}"
        )
    return base


def _initial_model_with_extras(
    ctx: ServiceContext, body: TaskIn, algorithm: Algorithm, hp: Hyperparams, embedding_dim: int
) -> tuple[tuple[str, int], int]:
    if body.initial_version is not None:
        with ctx.db.read() as s:
            base = _initial_version(s, body)
            embedding_dim = base.embedding_dim or embedding_dim
            blob_key = base.blob_key
        weights = backbone_state(codec.load_file(ctx.blobs.path(blob_key)))
    else:
        weights = state_to_numpy(
            build_backbone(body.architecture, embedding_dim=embedding_dim, seed=body.seed)
        )
    extras = algorithm.initial_extras(public.Env(ctx), hp, body.architecture, embedding_dim, weights)
    return models.store_weights(ctx, {**weights, **extras}, body.architecture), embedding_dim


def get(ctx: ServiceContext, task_id: int) -> TaskOut:
    with ctx.db.read() as s:
        task = s.get(Task, task_id)
        if task is None:
            raise not_found(f"task {task_id}")
        return _task_out(s, task)


def listing(ctx: ServiceContext) -> list[TaskOut]:
    with ctx.db.read() as s:
        return [_task_out(s, t) for t in queries.tasks(s)]


def rounds_of(
    ctx: ServiceContext, task_id: int, before_number: int | None = None, limit: int | None = None
) -> list[RoundOut]:
    """The task's rounds in order (with ``limit``: the newest ``limit`` below ``before_number``)."""
    with ctx.db.read() as s:
        if s.get(Task, task_id) is None:
            raise not_found(f"task {task_id}")
        return [RoundOut.model_validate(r) for r in queries.rounds_of(s, task_id, before_number, limit)]


def pause(ctx: ServiceContext, task_id: int) -> TaskOut:
    """Stop handing out assignments (check-ins wait with reason ``task_paused``). The open round runs to
    its end as usual (devices already assigned may still report); no next round opens until ``resume``.
    Pausing a paused task changes nothing; a completed task cannot be paused (409)."""
    with ctx.db.write() as s:
        task = _task_for_status_change(s, task_id, "pause")
        if queries.set_task_status(s, task_id, TASK_RUNNING, TASK_PAUSED):
            s.refresh(task)
            log.info("task paused", extra={"task_id": task_id})
        return _task_out(s, task)


def resume(ctx: ServiceContext, task_id: int) -> TaskOut:
    """Hand out assignments again; opens the next round at once when the paused task has none open.
    Resuming a running task changes nothing; a completed task cannot be resumed (409)."""
    with ctx.db.write() as s:
        task = _task_for_status_change(s, task_id, "resume")
        if queries.set_task_status(s, task_id, TASK_PAUSED, TASK_RUNNING):
            s.refresh(task)
            if queries.active_round(s, task_id) is None:
                rounds.open_round(s, task)
            log.info("task resumed", extra={"task_id": task_id})
        return _task_out(s, task)


def _task_for_status_change(s: Session, task_id: int, action: str) -> Task:
    task = s.get(Task, task_id)
    if task is None:
        raise not_found(f"task {task_id}")
    if task.status not in (TASK_RUNNING, TASK_PAUSED):
        detail = f"task {task_id} is {task.status}, not running or paused: nothing to {action}"
        raise conflict(detail, code="task_done")
    return task


def _task_out(s: Session, task: Task) -> TaskOut:
    active = queries.active_round(s, task.id)
    out = TaskOut.model_validate(task)
    out.current_round = RoundOut.model_validate(active) if active is not None else None
    out.privacy = privacy.spent(task.policy, task.aggregated_rounds)
    return out
