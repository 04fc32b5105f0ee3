#!/usr/bin/env python
"""How facefl's throughput on the trivial FedAvg task scales with server workers, SQLite and PostgreSQL.

    python benchmarks/server_scaling.py [--clients 500] [--rounds 3] [--workers 1 2 4]
                                        [--postgres postgresql://postgres@127.0.0.1:5432/postgres]

Each configuration is one ``facefl serve --workers N --db URL`` run of benchmarks/_trivial_fedavg.py
(device SDK clients over real HTTP; one warm-up round, then the timed rounds). PostgreSQL runs get a
scratch database each (created and dropped, ``server_api.db.scratch_database``); SQLite runs a fresh file.
Where ``facefl serve`` refuses a configuration (several workers on SQLite), the row says so.
Markdown table on stdout, JSON under benchmarks/results/. Speed is measured, not asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._trivial_fedavg import run_facefl  # noqa: E402
from benchmarks.server_throughput import git_commit  # noqa: E402
from simulator.server import ServerStartError  # noqa: E402

DEFAULT_JSON = REPO / "benchmarks" / "results" / "server_scaling.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--clients", type=int, default=500)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--postgres", default=None, help="PostgreSQL server URL (scratch databases); omit to skip")
    p.add_argument("--no-sqlite", action="store_true", help="PostgreSQL only")
    p.add_argument("--procs", type=int, default=2, help="client processes (2)")
    p.add_argument("--threads", type=int, default=16, help="threads per client process (16)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = p.parse_args(argv)
    if args.clients < 2 or args.rounds < 1 or min(args.workers) < 1:
        p.error("--clients must be >= 2, --rounds >= 1, --workers >= 1")
    if args.no_sqlite and not args.postgres:
        p.error("--no-sqlite needs --postgres")
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    backends = ([] if args.no_sqlite else ["sqlite"]) + (["postgresql"] if args.postgres else [])
    rows: list[dict[str, Any]] = []
    for backend in backends:
        for workers in args.workers:
            row: dict[str, Any] = {"database": backend, "workers": workers}
            with contextlib.ExitStack() as stack:
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="facefl-scaling-")))
                url = None
                if backend == "postgresql":
                    from server_api.db import scratch_database

                    url = stack.enter_context(scratch_database(args.postgres, "facefl_bench"))
                try:
                    run = run_facefl(
                        tmp, clients=args.clients, rounds=args.rounds, workers=workers, database_url=url,
                        procs=args.procs, threads=args.threads, log=log,
                    )  # fmt: skip
                    row |= run.to_json() | {"status": "ok"}
                    log(f"{backend} x{workers}: {run.updates_per_s:.1f} updates/s")
                except ServerStartError as exc:
                    refused = "several workers need PostgreSQL" in str(exc)  # older servers
                    row["status"] = "refused by serve (SQLite single-writer)" if refused else "server failed"
                    row["error"] = str(exc)[-600:]
                    log(f"{backend} x{workers}: {row['status']}")
            rows.append(row)
    base = {r["database"]: r["updates_per_s"] for r in rows if r.get("workers") == 1 and r["status"] == "ok"}
    lines = [
        "| database | server workers | updates/s | vs 1 worker | s per round | server CPU ms/update "
        "| status |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['database']} | {r['workers']} | - | - | - | - | {r['status']} |")
            continue
        speedup = r["updates_per_s"] / base[r["database"]] if r["database"] in base else float("nan")
        cpu = r["server_cpu_s"]
        cpu_ms = f"{1000 * cpu / (r['clients'] * r['rounds']):.1f}" if cpu is not None else "-"
        rounds = ", ".join(f"{s:.1f}" for s in r["round_s"])
        lines.append(
            f"| {r['database']} | {r['workers']} | {r['updates_per_s']:.1f} | {speedup:.2f}x | {rounds} | "
            f"{cpu_ms} | ok |"
        )
    result = {
        "meta": {
            "clients": args.clients, "rounds": args.rounds, "warmup_rounds": 1,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"), "git_commit": git_commit(),
            "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "clients_run_as": f"{args.procs} processes x {args.threads} threads",
            "wall_s": time.perf_counter() - t_start,
        },
        "rows": rows,
    }  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"trivial FedAvg through facefl, {args.clients} clients, {args.rounds} timed rounds, "
        f"{os.cpu_count()} CPUs"
    )
    print("\n".join(lines))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
