"""Aggregation of a round into a new model version: streaming, off the event loop, exactly once.

This module orchestrates: the (weighted or robust) mean of the updates -> the algorithm's server step
(``facefl.algorithms``: FedFace's spreadout, a server optimizer's moments) with its state -> the new
version (and the release gate) -> the next round.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

import numpy as np

from facefl import codec, update_files
from facefl.algorithms import registry
from facefl.algorithms.base import ServerStepInputs
from facefl.privacy import dp
from server_api import metrics as prom
from server_api.orm import ROUND_ABANDONED, ModelVersion, Round, Task, utcnow
from server_api.services import (
    evaluation,
    gate,
    models,
    privacy,
    public,
    queries,
    rounds,
    secagg_sum,
    server_state,
)
from server_api.services.context import ServiceContext, log
from server_api.services.robust import robust_delta


def aggregate_round(ctx: ServiceContext, round_id: int) -> int | None:
    """Aggregate the round if this caller wins the compare-and-set; returns the new version or None.

    Memory is O(model): updates are memory-mapped from the blob store one at a time into a running
    weighted mean (facefl.update_files); the algorithm's server step turns it into the new version's
    delta. The new version, the
    round's closure and the next round are committed in one transaction, fenced by the lease timestamp
    we set when we took the round.
    """
    now = utcnow()
    stale_before = now - timedelta(seconds=ctx.settings.aggregation_lease_s)
    with ctx.db.write() as s:
        if not queries.start_aggregation(s, round_id, now, stale_before):
            return None
        rnd = s.get(Round, round_id)
        assert rnd is not None
        s.refresh(rnd)
        lease = rnd.aggregation_started_at
        base = s.get(ModelVersion, rnd.base_version)
        task = s.get(Task, rnd.task_id)
        assert base is not None and task is not None and lease is not None
        base_key, architecture, task_id = base.blob_key, base.architecture, task.id
        embedding_dim, eval_set = base.embedding_dim, task.eval_set
        algorithm = registry.get(task.algorithm)
        hyperparams = algorithm.hyperparams.lenient(task.hyperparams)
        base_state_key = base.server_state_key
        public_set = algorithm.public_set(hyperparams)
        rows = queries.updates_of(s, round_id)
        updates = [(u.blob_key, u.num_samples, dict(u.metrics), u.device_id) for u in rows]
        robust_config = task.policy.get("robust")  # None: the plain weighted mean below
        gate_config = task.policy.get("gate")  # None: every new version is served
        first_version = queries.first_base_version(s, task_id) if gate_config else None
        dp_policy = privacy.dp_policy(task.policy)  # None: no differential privacy
        # this round is the task's next aggregated one: rounds of a task aggregate one at a time
        dp_round = task.aggregated_rounds + 1
        norms = [u.norm for u in rows] if robust_config or dp_policy else []
        masked = secagg_sum.inputs_of(s, round_id)  # None: a plain round
        if masked is not None:
            layout = secagg_sum.layout(models.specs_of_blob(ctx, base_key), architecture, task.trainable)

    # the heartbeat renews our lease while we work (a gated round evaluates two models), so another worker
    # takes the round over within aggregation_lease_s of our death; the commit is fenced by the lease, so
    # a takeover can never produce a second version
    with _Heartbeat(ctx, round_id, lease):
        t0 = time.perf_counter()
        metric_sums: dict[str, float] = defaultdict(float)
        extra_names = set(algorithm.update_extras(embedding_dim or 0))  # not part of the mean
        extras: dict[str, dict[str, np.ndarray]] = {}
        paths = [ctx.blobs.path(blob_key) for blob_key, _, _, _ in updates]
        for (_, num_samples, metrics, device_id), path in zip(updates, paths, strict=True):
            if extra_names:
                own = update_files.read_tensors(path, extra_names)
                if own:
                    extras[device_id] = own
            for name, value in metrics.items():
                metric_sums[name] += float(value) * num_samples
        total = sum(n for _, n, _, _ in updates)
        if masked is not None:
            # only the sum is known: the masks removed with the revealed shares, then the weighted mean
            try:
                delta, total = secagg_sum.weighted_mean(masked, paths, layout)
            except (secagg_sum.SecAggFailure, codec.CodecError) as exc:
                _abandon_aggregation(ctx, round_id, lease, f"secure aggregation: {exc}")
                return None
        elif dp_policy is not None:
            # DP-FedAvg: clipped, equal weights, noise on the sum (facefl.privacy.dp says why). A round of a
            # secure-aggregation task always has its secagg row (rounds.open_round), so it took the masked
            # branch above, where the devices did all three
            delta = privacy.dp_delta(paths, norms, dp_policy, exclude=extra_names)
        elif robust_config:
            reports = [(key, n, norm) for (key, n, _, _), norm in zip(updates, norms, strict=True)]
            delta = robust_delta(ctx, reports, robust_config, exclude=extra_names)
        else:
            # the blobs memory-mapped (any update encoding), accumulated in one pass each: O(model)
            weights = [float(n) for _, n, _, _ in updates]
            delta = update_files.mean_of_files(paths, weights, exclude=extra_names)
        base_weights = codec.load_file(ctx.blobs.path(base_key))
        step = algorithm.server_step(
            ServerStepInputs(
                base=base_weights,
                delta=delta,
                extras=extras,
                state=server_state.read(ctx, base_state_key),
                hyperparams=hyperparams,
            )
        )
        new_weights = codec.apply_delta(base_weights, step.delta)
        if dp_policy is not None:  # post-processing: noise may have made a running variance negative
            new_weights = dp.clamp_running_variances(new_weights)
        bad = [name for name, value in new_weights.items() if not np.isfinite(value).all()]
        if bad:  # never store or serve a non-finite model: the round is abandoned and reopened on its base
            reason = f"non-finite weights in {len(bad)} tensor(s), e.g. {bad[0]}"
            _abandon_aggregation(ctx, round_id, lease, reason)
            return None
        blob = models.store_weights(ctx, new_weights, architecture)
        state_key = server_state.store(ctx, step.state)
        agg_seconds = time.perf_counter() - t0
        round_metrics: dict[str, Any] = {}
        if dp_policy is None:
            round_metrics = {f"train_{k}": v / total for k, v in metric_sums.items()} if total else {}
            round_metrics.update(samples=total)
        else:
            # the devices' own metrics and sample counts are not covered by the noise: not published.
            # What this round's release brings the task to (epsilon null: infinite, no noise)
            round_metrics.update(
                dp_epsilon=privacy.finite_or_none(dp_policy.epsilon(dp_round)),
                dp_delta=dp_policy.delta,
                dp_rounds=dp_round,
            )
        round_metrics.update(reports=len(updates), aggregation_s=agg_seconds)
        decision = gate.GateDecision(served=True)
        if gate_config is not None and eval_set is not None:
            # the base is the served version: rounds always open on it (off the event loop, like the rest)
            decision = gate.decide(
                ctx, gate_config, eval_set, rnd.base_version, architecture, embedding_dim, new_weights,
                first_version=first_version,
            )  # fmt: skip
            round_metrics["gate_s"] = time.perf_counter() - t0 - agg_seconds

        try:
            version = _commit(
                ctx,
                round_id=round_id,
                task_id=task_id,
                base_version=rnd.base_version,
                lease=lease,
                architecture=architecture,
                embedding_dim=embedding_dim,
                blob=blob,
                reports=len(updates),
                samples=None if dp_policy is not None else total,
                round_metrics=round_metrics,
                server_state_key=state_key,
                decision=decision,
            )
        except _LostLease:
            log.warning("aggregation of round %s lost its lease; result discarded", round_id)
            return None
        prom.ROUNDS_CLOSED.labels(outcome="aggregated").inc()
        prom.AGGREGATION_SECONDS.observe(agg_seconds)
        if public_set is not None and decision.served:
            public.bank_key(ctx, version)  # ready before the next round's devices ask for it
        if eval_set is not None and decision.report is None:  # a gated version was evaluated already
            ctx.submit_eval(evaluation.evaluate_version, ctx, version, eval_set)
        log.info(
            "round aggregated",
            extra={
                "round_id": round_id,
                "model_version": version,
                "reports": len(updates),
                "seconds": agg_seconds,
                "served": decision.served,
            },
        )
        if not decision.served:
            log.warning(
                "model version held back by the release gate",
                extra={"model_version": version, "reason": decision.reason},
            )
        return version


class _Heartbeat:
    """A daemon thread renewing the round's heartbeat every lease/5 s until the block ends (or the lease
    is lost: then the fenced commit fails and the result is discarded)."""

    def __init__(self, ctx: ServiceContext, round_id: int, lease: datetime) -> None:
        self._ctx, self._round_id, self._lease = ctx, round_id, lease
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-round-{round_id}", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        interval = self._ctx.settings.aggregation_lease_s / 5
        while not self._stop.wait(interval):
            try:
                with self._ctx.db.write() as s:
                    alive = queries.renew_aggregation(s, self._round_id, self._lease, utcnow())
            except Exception:  # a failed renewal is retried; a lost lease is caught by the fenced commit
                log.warning("heartbeat of round %s failed", self._round_id, exc_info=True)
                continue
            if not alive:
                return


def _abandon_aggregation(ctx: ServiceContext, round_id: int, lease: datetime, reason: str) -> None:
    """aggregating -> abandoned (fenced by our lease), and the next round opens on the same base."""
    with ctx.db.write() as s:
        if not queries.finish_aggregation(
            s, round_id, lease, utcnow(), status=ROUND_ABANDONED, metrics={"abandoned_reason": reason}
        ):
            return
        rnd = s.get(Round, round_id)
        assert rnd is not None
        task = s.get(Task, rnd.task_id)
        assert task is not None
        rounds.open_round(s, task)
    prom.ROUNDS_CLOSED.labels(outcome="abandoned").inc()
    log.warning("round abandoned at aggregation: %s", reason, extra={"round_id": round_id})


class _LostLease(Exception):
    """Another worker took the round over (our lease expired): our transaction must roll back."""


def _commit(
    ctx: ServiceContext,
    *,
    round_id: int,
    task_id: int,
    base_version: int,
    lease: datetime,
    architecture: str,
    embedding_dim: int | None,
    blob: tuple[str, int],
    reports: int,
    samples: int | None,
    round_metrics: dict[str, Any],
    server_state_key: str | None = None,
    decision: gate.GateDecision | None = None,
) -> int:
    """The new version, the round's closure and the next round in one transaction. A version the
    release gate held back is recorded (with its metrics) but the task keeps serving ``base_version``,
    and the next round opens on it."""
    decision = decision or gate.GateDecision(served=True)
    metrics: dict[str, Any] = {"reports": reports}
    if samples is not None:  # None under differential privacy: a sum of the devices' own counts
        metrics["samples"] = samples
    if decision.report is not None:
        metrics["eval"] = decision.report
    if decision.details:
        metrics["gate"] = decision.details
    with ctx.db.write() as s:
        mv = models.add_version(
            s,
            task_id=task_id,
            parent=base_version,
            round_id=round_id,
            architecture=architecture,
            embedding_dim=embedding_dim,
            blob=blob,
            metrics=metrics,
        )
        mv.server_state_key = server_state_key
        mv.served = decision.served
        mv.held_back_reason = decision.reason
        served_version = mv.version if decision.served else base_version
        if not queries.finish_aggregation(
            s,
            round_id,
            lease,
            utcnow(),
            result_version=mv.version,
            served_version=served_version,
            metrics=round_metrics,
        ):
            raise _LostLease
        task = s.get(Task, task_id)
        assert task is not None
        task.current_version = served_version
        task.aggregated_rounds += 1
        if task.aggregated_rounds >= task.rounds:
            task.status = "completed"
        else:
            rounds.open_round(s, task)
        return mv.version
