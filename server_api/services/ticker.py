"""The deadline tick: closes rounds whose deadline passed or whose target was reached, resumes dead
aggregations and reopens orphaned tasks. Any worker may run it; compare-and-set keeps it exactly-once."""

from __future__ import annotations

from datetime import timedelta

from server_api.orm import ROUND_AGGREGATING, Task, utcnow
from server_api.round_policy import RoundAction, RoundCounters, decide
from server_api.services import aggregation, queries, rounds, secagg_stages
from server_api.services.context import ServiceContext


def tick(ctx: ServiceContext) -> list[tuple[int, RoundAction]]:
    """Enforce deadlines and recover: any worker may run this; compare-and-set keeps it exactly-once."""
    now = utcnow()
    stale_before = now - timedelta(seconds=ctx.settings.aggregation_lease_s)
    with ctx.db.read() as s:
        due = [
            (r.id, r.status, RoundCounters(r.reported, r.target_reports, r.min_reports, r.deadline))
            for r in queries.rounds_needing_attention(s, now, stale_before)
        ]
        orphaned_tasks = [t.id for t in queries.running_tasks_without_active_round(s)]
        secure = queries.secagg_round_ids(s, [round_id for round_id, _, _ in due])
    done: list[tuple[int, RoundAction]] = []
    for round_id, status, counters in due:
        if status != ROUND_AGGREGATING and round_id in secure:
            secagg_stages.advance(ctx, round_id)  # its stages decide; "done" submits the aggregation
            continue
        action = RoundAction.AGGREGATE if status == ROUND_AGGREGATING else decide(counters, now)
        if action is RoundAction.AGGREGATE:
            if aggregation.aggregate_round(ctx, round_id) is not None:
                done.append((round_id, action))
        elif action is RoundAction.ABANDON and rounds.abandon(ctx, round_id):
            done.append((round_id, action))
    for task_id in orphaned_tasks:  # e.g. a crash between closing a round and opening the next
        with ctx.db.write() as s:
            task = s.get(Task, task_id)
            if task is not None and task.status == "running" and queries.active_round(s, task_id) is None:
                rounds.open_round(s, task)
    return done
