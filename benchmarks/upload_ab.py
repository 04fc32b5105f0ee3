#!/usr/bin/env python
"""Server CPU per upload of two versions of the server, measured in one run (A/B), with the bare baselines.

    python benchmarks/upload_ab.py [--old-ref main] [--db URL] [--rounds 5] [--uploads 20]
                                   [--concurrency 4] [--json PATH]

Three servers run at once for the whole run, each a uvicorn subprocess with one worker on 127.0.0.1, all
on the same stack (httptools and uvloop): ``old``, the server of ``--old-ref`` (``git archive`` of that
commit, served from a temporary folder); ``new``, this checkout; ``bare``, benchmarks/_bare_app.py, whose
``/upload`` streams the body to a file and fsyncs it (``fsync=1``) or not (``fsync=0``). Each facefl
server has its own SQLite file (or, with ``--db``, its own fresh database on that PostgreSQL server) and a
mobilefacenet task whose round takes every upload; its devices are registered and assigned up front.

In each of ``--rounds`` rounds, the servers take turns (in a rotated order) receiving ``--uploads``
distinct 4.12 MB deltas from ``--concurrency`` clients, exactly as benchmarks/server_throughput.py sends
them; the bare server receives the same payloads twice (with and without fsync). Background load from
other work then falls on all of them alike. CPU is the server process's user + system time (/proc), per
upload; the table shows medians over the rounds. Nothing is asserted.
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

import numpy as np

REPO = Path(__file__).resolve().parent.parent
for entry in (REPO, REPO / "benchmarks"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

import server_throughput as bench  # noqa: E402
from checkin_ab import StackServer, export_ref  # noqa: E402


def prepare(server: StackServer, count: int, concurrency: int) -> list[bench.Req]:
    """A mobilefacenet task on ``server``, ``count`` devices with an assignment each, and one upload
    request per device (distinct payloads: the blob store deduplicates)."""
    with bench.admin_client(server) as admin:
        task = admin.create_task(
            "ab-upload", architecture="mobilefacenet", rounds=1,
            policy={"target_reports": count + 1, "over_selection": 1.0, "min_reports": count + 1,
                    "round_timeout_s": 86_400.0},
        )  # fmt: skip
        assert task.current_version is not None
        base = admin.download_model(task.current_version)
    tokens, _ = bench.register_devices(server, count, concurrency)
    assignments = bench.assignments_of(
        bench.run_load(server, bench.checkin_reqs(tokens, task.id), concurrency)
    )
    return bench.upload_reqs(tokens, assignments, bench.make_deltas(base, count))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--old-ref", default="main", help="the commit to compare against (default main)")
    p.add_argument("--db", default=None, help="a PostgreSQL server URL (default: SQLite files)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--uploads", type=int, default=20, help="uploads per server and round")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "upload_ab.json")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.uploads < 1 or args.concurrency < 1:
        p.error("--rounds, --uploads and --concurrency must be >= 1")
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    warmup = 2 * args.concurrency
    per_server = warmup + args.rounds * args.uploads
    samples: dict[str, list[float]] = {}
    loads: list[float] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="facefl-upload-ab-")))
        old_commit = export_ref(args.old_ref, tmp / "old-src")
        servers: dict[str, StackServer] = {}

        @stack.callback
        def stop_all() -> None:
            for server in servers.values():
                server.stop()

        for name, source in (("old", tmp / "old-src"), ("new", None)):
            db_url = stack.enter_context(bench.fresh_postgres(args.db)) if args.db else None
            servers[name] = StackServer(
                name, tmp / name, "new", source, database_url=db_url, admin_token=bench.ADMIN,
                enrollment_secret=bench.SECRET, min_retry_after_s=1.0, extra_env={"FACEFL_DEV_MODE": "0"},
            )  # fmt: skip
        servers["bare"] = StackServer(
            "bare", tmp / "bare", "new", None, app="_bare_app:create_app", app_dir=REPO / "benchmarks",
            health_path="/health", extra_env={"FACEFL_BENCH_UPLOAD_DIR": str(tmp / "bare-uploads")},
        )  # fmt: skip
        for s in servers.values():
            s.start()
        native = {name: s.native_modules() for name, s in servers.items()}
        log(f"servers up: old = {old_commit}, new = this checkout; loaded: {native}")
        reqs = {name: prepare(servers[name], per_server, args.concurrency) for name in ("old", "new")}
        payloads = [r.body for r in reqs["new"]]
        bare_headers = {"Content-Type": "application/octet-stream"}

        def bare_reqs(fsync: int, lo: int, hi: int) -> list[bench.Req]:
            return [
                bench.Req("POST", f"/upload?fsync={fsync}", bare_headers, payloads[i], 202)
                for i in range(lo, hi)
            ]

        for name in ("old", "new"):  # warm-up (untimed)
            bench.run_load(servers[name], reqs[name][:warmup], args.concurrency)
        bench.run_load(servers["bare"], bare_reqs(1, 0, warmup), args.concurrency)

        variants = ["old", "new", "bare_fsync", "bare_no_fsync"]
        for r in range(args.rounds):
            lo, hi = warmup + r * args.uploads, warmup + (r + 1) * args.uploads
            rotated = variants[r % len(variants) :] + variants[: r % len(variants)]
            log(f"round {r + 1}/{args.rounds}: {' -> '.join(rotated)}, {args.uploads} uploads each")
            loads.append(os.getloadavg()[0])
            for variant in rotated:
                if variant.startswith("bare"):
                    load = bench.run_load(
                        servers["bare"], bare_reqs(int(variant == "bare_fsync"), lo, hi), args.concurrency
                    )
                else:
                    load = bench.run_load(servers[variant], reqs[variant][lo:hi], args.concurrency)
                assert load.server_cpu_s is not None
                samples.setdefault(f"{variant}_cpu_ms", []).append(1000 * load.server_cpu_s / args.uploads)
                samples.setdefault(f"{variant}_per_s", []).append(args.uploads / load.seconds)

    medians = {k: float(np.median(v)) for k, v in samples.items()}
    command = " ".join(["python benchmarks/upload_ab.py", *(sys.argv[1:] if argv is None else argv)])
    rows = []
    for variant in variants:
        per_s, cpu_ms = medians[f"{variant}_per_s"], medians[f"{variant}_cpu_ms"]
        rows.append({
            "server": variant, "cpu_ms": cpu_ms, "uploads_per_s": per_s,
            "per_s_over_bare_fsync": per_s / medians["bare_fsync_per_s"],
            # None: CPU time is read in clock ticks (10 ms), 0 for a tiny run's few uploads
            "bare_fsync_cpu_over_cpu": medians["bare_fsync_cpu_ms"] / cpu_ms if cpu_ms > 0 else None,
        })  # fmt: skip
    result: dict[str, Any] = {
        "meta": {
            "command": command,
            "old_ref": args.old_ref, "old_commit": old_commit, "new_commit": bench.git_commit(),
            "database": "postgresql" if args.db else "sqlite", "rounds": args.rounds, "uploads": args.uploads,
            "concurrency": args.concurrency, "payload_bytes": len(payloads[0] or b""),
            "native_modules_loaded": native, "loadavg_1min_per_round": loads,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "wall_s": time.perf_counter() - t0,
        },
        "per_round": samples,
        "medians": medians,
        "table": rows,
    }  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    mb = len(payloads[0] or b"") / 1e6
    print(
        f"{mb:.2f} MB uploads, {result['meta']['database']}, medians of {args.rounds} rounds (load {loads})"
    )
    print(f"{'server':14} {'ms CPU':>7} {'uploads/s':>10} {'/ bare+fsync':>13}")
    for row in rows:
        ratio = row["per_s_over_bare_fsync"]
        print(f"{row['server']:14} {row['cpu_ms']:7.2f} {row['uploads_per_s']:10.1f} {ratio:12.3f}x")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
