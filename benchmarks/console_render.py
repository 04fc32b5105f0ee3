#!/usr/bin/env python
"""How long the operator's console takes to answer for a task with 1,000 rounds.

    python benchmarks/console_render.py [--rounds 1000] [--requests 30] [--json PATH]

A throwaway SQLite database under a temporary directory: a real server creates the task (initial model
version, round 1), then the benchmark writes 1,000 aggregated rounds with their model versions (server
evaluation report and training loss in their metrics, like `facefl simulate --eval-set` leaves them) and
one open round straight into that database with the server's ORM, and starts the server again on it.
Then, logged in through the console's form, it times GET over HTTP (a keep-alive httpx client, 3 warm-up
requests, then `--requests` timed ones) of: the task page (newest 200 rounds + the curves over all
versions), the older-rounds page, the model-versions page, a round page, the tasks list, and the REST
listing of all the task's rounds for comparison. It also renders, in this process, the task template with
all 1,000 rows (what the page would cost without pagination). Table on stdout, JSON under
benchmarks/results/. Speed is measured, not asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import re
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from benchmarks.server_throughput import git_commit  # noqa: E402
from server_api.db import Database  # noqa: E402
from server_api.orm import ModelVersion, Round, Task  # noqa: E402
from simulator.server import LocalServer  # noqa: E402

DEFAULT_JSON = REPO / "benchmarks" / "results" / "console_render.json"
ADMIN = "bench-admin-token"
SECRET = "bench-enrollment-secret"


def populate(url: str, task_id: int, rounds: int, seed: int = 0) -> None:
    """``rounds`` aggregated rounds, each with its new model version, then one open round."""
    rng = random.Random(seed)
    db = Database(url)
    try:
        with db.write() as s:
            task = s.get(Task, task_id)
            assert task is not None and task.current_version is not None
            first = s.get(ModelVersion, task.current_version)
            assert first is not None
            first.metrics = {"eval": _report(rng, 0)}
            opened = datetime.now(UTC) - timedelta(seconds=30 * (rounds + 1))
            base = first.version
            for number in range(1, rounds + 1):
                rnd = s.get(Round, number) if number == 1 else None
                if rnd is None:
                    rnd = Round(
                        task_id=task_id,
                        number=number,
                        base_version=base,
                        target_reports=10,
                        min_reports=5,
                        max_assignments=13,
                        deadline=opened + timedelta(minutes=10),
                    )
                    s.add(rnd)
                    s.flush()
                mv = ModelVersion(
                    task_id=task_id,
                    parent_version=base,
                    round_id=rnd.id,
                    architecture=first.architecture,
                    embedding_dim=first.embedding_dim,
                    blob_key=first.blob_key,
                    sha256=first.sha256,
                    size_bytes=first.size_bytes,
                    metrics={"reports": 10, "samples": 400, "eval": _report(rng, number)},
                )
                s.add(mv)
                s.flush()
                rnd.status, rnd.assigned, rnd.reported = "aggregated", 13, 10
                rnd.opened_at = opened
                rnd.closed_at = opened + timedelta(seconds=rng.uniform(20, 28))
                rnd.result_version = rnd.served_version = mv.version
                rnd.metrics = {
                    "reports": 10,
                    "samples": 400,
                    "aggregation_s": rng.uniform(0.05, 0.2),
                    "train_train_loss": 12.0 * 0.999**number + rng.uniform(-0.2, 0.2),
                }
                base, opened = mv.version, opened + timedelta(seconds=30)
            s.add(
                Round(
                    task_id=task_id,
                    number=rounds + 1,
                    base_version=base,
                    target_reports=10,
                    min_reports=5,
                    max_assignments=13,
                    opened_at=opened,
                    deadline=opened + timedelta(minutes=10),
                )
            )
            task.current_version, task.aggregated_rounds, task.rounds = base, rounds, rounds * 2
    finally:
        db.dispose()


def _report(rng: random.Random, number: int) -> dict[str, Any]:
    accuracy = min(0.99, 0.6 + 0.3 * (1 - 0.995**number) + rng.uniform(-0.01, 0.01))
    return {
        "accuracy": accuracy,
        "auc": min(1.0, accuracy + 0.05),
        "tar@far=1e-3": accuracy * 0.5,
        "tar@far=1e-2": accuracy * 0.7,
        "set": "heldout",
        "seconds": 1.0,
    }


def time_get(client: httpx.Client, path: str, requests: int) -> dict[str, Any]:
    for _ in range(3):
        assert client.get(path).status_code == 200, path
    latencies, size = [], 0
    for _ in range(requests):
        t0 = time.perf_counter()
        r = client.get(path)
        latencies.append(time.perf_counter() - t0)
        assert r.status_code == 200, path
        size = len(r.content)
    latencies.sort()
    return {
        "path": path,
        "median_ms": statistics.median(latencies) * 1000,
        "p95_ms": latencies[max(0, int(len(latencies) * 0.95) - 1)] * 1000,
        "bytes": size,
    }


def render_all_rows(url: str, data_dir: Path, task_id: int) -> dict[str, Any]:
    """The task template with every round (no pagination), rendered in this process."""
    from server_api.console import render, views
    from server_api.services import models, tasks
    from server_api.services.context import ServiceContext
    from server_api.settings import Settings

    ctx = ServiceContext.from_settings(
        Settings(database_url=url, data_dir=data_dir, admin_token=ADMIN, enrollment_secret=SECRET)
    )
    try:
        t0 = time.perf_counter()
        task = tasks.get(ctx, task_id)
        all_rounds = tasks.rounds_of(ctx, task_id)
        metrics = models.metrics_by_version(ctx, task_id)
        t1 = time.perf_counter()
        now = datetime.now(UTC)
        html = render.page(
            "task.html",
            title="bench",
            task=task,
            rows=[views.round_row(r, {}, now) for r in reversed(all_rounds)],
            older=None,
            paged=False,
            eval_chart=views.eval_chart(metrics),
            train_chart=views.train_chart(all_rounds),
            versions=len(metrics),
            evaluated=views.evaluated(metrics),
            csrf="x",
            refresh=None,
        ).body
        t2 = time.perf_counter()
    finally:
        ctx.close()
    return {
        "rows": len(all_rounds),
        "services_ms": (t1 - t0) * 1000,
        "render_ms": (t2 - t1) * 1000,
        "bytes": len(html),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=1000)
    p.add_argument("--requests", type=int, default=30)
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="facefl-console-bench-") as tmp:
        server = LocalServer(Path(tmp), admin_token=ADMIN, enrollment_secret=SECRET).start()
        try:
            with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {ADMIN}"}) as api:
                body = {
                    "name": "bench",
                    "architecture": "small",
                    "embedding_dim": 64,
                    "rounds": 2 * args.rounds,
                    "eval_set": None,
                }
                task_id = int(api.post("/v1/tasks", json=body).raise_for_status().json()["id"])
        finally:
            server.stop()
        t0 = time.perf_counter()
        populate(server.database_url, task_id, args.rounds)
        populate_s = time.perf_counter() - t0
        server.start()
        try:
            with httpx.Client(base_url=server.base_url, timeout=60) as c:
                assert c.post("/console/login", data={"token": ADMIN}).status_code == 303
                task_page = c.get(f"/console/tasks/{task_id}").text
                older = re.search(r"\?before=([0-9]+)", task_page)
                assert older is not None, "the task page links to older rounds"
                paths = {
                    "task page (newest 200 rounds, curves over all versions)": f"/console/tasks/{task_id}",
                    "older rounds page": f"/console/tasks/{task_id}?before={older.group(1)}",
                    "model versions page (newest 200)": f"/console/tasks/{task_id}/versions",
                    "a round page": f"/console/rounds/{args.rounds // 2}",
                    "tasks list": "/console",
                }
                rows = {name: time_get(c, path, args.requests) for name, path in paths.items()}
            with httpx.Client(
                base_url=server.base_url, timeout=60, headers={"Authorization": f"Bearer {ADMIN}"}
            ) as api:
                rows["REST: all rounds as JSON"] = time_get(api, f"/v1/tasks/{task_id}/rounds", args.requests)
        finally:
            server.stop()
        unpaged = render_all_rows(server.database_url, server.data_dir, task_id)
    print(
        f"console with a {args.rounds}-round task (SQLite, 1 uvicorn worker; {args.requests} requests each)\n"
    )
    print(f"| {'GET':<58} | {'median ms':>9} | {'p95 ms':>7} | {'KiB':>7} |")
    print(f"|{'-' * 60}|{'-' * 11}|{'-' * 9}|{'-' * 9}|")
    for name, row in rows.items():
        print(
            f"| {name:<58} | {row['median_ms']:>9.1f} | {row['p95_ms']:>7.1f} | {row['bytes'] / 1024:>7.1f} |"
        )
    print(
        f"\nwithout pagination (in process): {unpaged['rows']} rows, "
        f"services {unpaged['services_ms']:.0f} ms + render {unpaged['render_ms']:.0f} ms, "
        f"{unpaged['bytes'] / 1024:.0f} KiB"
    )
    print(f"populating the database: {populate_s:.1f} s")
    out = {
        "benchmark": "console_render",
        "rounds": args.rounds,
        "requests": args.requests,
        "pages": rows,
        "unpaginated_in_process": unpaged,
        "populate_s": populate_s,
        "commit": git_commit(),
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
