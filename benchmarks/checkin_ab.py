#!/usr/bin/env python
"""Server CPU per check-in of two versions of the server, measured in one run (A/B), with the bare baseline.

    python benchmarks/checkin_ab.py [--old-ref main] [--old-stack h11] [--db URL] [--rounds 3]
                                    [--devices 1000] [--json PATH]

Four servers run at once for the whole run, each a uvicorn subprocess with one worker on 127.0.0.1:

- ``old``: the server of ``--old-ref`` (``git archive`` of that commit into a temporary folder, served
  from there), on the uvicorn stack that commit ran on (``--old-stack h11``: h11 and asyncio's loop,
  uvicorn's ``auto`` without httptools and uvloop installed; ``new``: httptools and uvloop);
- ``new``: the server of this checkout (httptools and uvloop, ``server_api/serving.py``);
- ``bare`` and ``bare_old_stack``: benchmarks/_bare_app.py on each stack.

Each server has its own SQLite file (or, with ``--db``, its own fresh database on that PostgreSQL
server). In each of ``--rounds`` rounds, the servers take turns (in a rotated order) at the same load as
benchmarks/server_throughput.py: ``--devices`` registrations, then one check-in per device (a new
assignment), then another (the upload token rotates); the bare servers answer the same check-in
requests. Background load from other work then falls on all of them alike. CPU is the server process's
user + system time (/proc), per request; the table shows medians over the rounds. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
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

STACKS = {"h11": ["--http", "h11", "--loop", "asyncio"], "new": None}  # None: server_api.serving's


class StackServer(bench.ServerProcess):
    """A ServerProcess on a chosen uvicorn stack, optionally serving another checkout's code."""

    def __init__(self, name: str, work_dir: Path, stack: str, source: Path | None, **kwargs: Any) -> None:
        super().__init__(name, work_dir, **kwargs)
        self.stack = stack
        self.source = source

    def _env(self) -> dict[str, str]:
        env = super()._env()
        if self.source is not None:  # the other checkout first: its server_api is the one imported
            env["PYTHONPATH"] = os.pathsep.join([str(self.source), env["PYTHONPATH"]])
        return env

    def uvicorn_options(self) -> list[str]:
        return STACKS[self.stack] or super().uvicorn_options()


def export_ref(ref: str, dest: Path) -> str:
    """``git archive`` of ``ref`` into ``dest``; its short commit id."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", ref], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.strip()
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit], cwd=REPO, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return commit


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--old-ref", default="main", help="the commit to compare against (default main)")
    p.add_argument("--old-stack", choices=sorted(STACKS), default="h11", help="the old server's stack")
    p.add_argument("--db", default=None, help="a PostgreSQL server URL (default: SQLite files)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "checkin_ab.json")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    samples: dict[str, dict[str, list[float]]] = {}
    loads: list[float] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="facefl-ab-")))
        old_commit = export_ref(args.old_ref, tmp / "old-src")
        servers: dict[str, StackServer] = {}
        stack.callback(lambda: [s.stop() for s in servers.values()])
        for name, stack_name, source in (("old", args.old_stack, tmp / "old-src"), ("new", "new", None)):
            db_url = stack.enter_context(bench.fresh_postgres(args.db)) if args.db else None
            servers[name] = StackServer(
                name, tmp / name, stack_name, source, database_url=db_url, admin_token=bench.ADMIN,
                enrollment_secret=bench.SECRET, min_retry_after_s=1.0, extra_env={"FACEFL_DEV_MODE": "0"},
            )  # fmt: skip
        for name, stack_name in (("bare", "new"), ("bare_old_stack", args.old_stack)):
            servers[name] = StackServer(
                name, tmp / name, stack_name, None, app="_bare_app:create_app", app_dir=REPO / "benchmarks",
                health_path="/health", extra_env={"FACEFL_BENCH_UPLOAD_DIR": str(tmp / f"{name}-uploads")},
            )  # fmt: skip
        for s in servers.values():
            s.start()
        native = {name: s.native_modules() for name, s in servers.items()}
        log(f"servers up: old = {old_commit} on {args.old_stack}, new = this checkout; loaded: {native}")
        tasks = {}
        for name in ("old", "new"):
            with bench.admin_client(servers[name]) as admin:
                tasks[name] = admin.create_task(
                    "ab-checkin", architecture="small", rounds=1,
                    policy={"target_reports": 100_000, "over_selection": 1.0, "min_reports": 1,
                            "round_timeout_s": 86_400.0},
                ).id  # fmt: skip
            warm, _ = bench.register_devices(servers[name], 50, args.concurrency)
            bench.run_load(servers[name], bench.checkin_reqs(warm, tasks[name]), args.concurrency)
        for name in ("bare", "bare_old_stack"):
            bench.run_load(servers[name], bench.checkin_reqs(["x"] * 50, 1, "/checkin"), args.concurrency)

        def record(name: str, phase: str, result: bench.LoadResult) -> None:
            assert result.server_cpu_s is not None
            per = samples.setdefault(name, {})
            per.setdefault(f"{phase}_cpu_ms", []).append(1000 * result.server_cpu_s / len(result.latencies_s))
            per.setdefault(f"{phase}_req_per_s", []).append(len(result.latencies_s) / result.seconds)

        order = list(servers)
        for r in range(args.rounds):
            rotated = order[r % len(order) :] + order[: r % len(order)]
            log(f"round {r + 1}/{args.rounds}: {' -> '.join(rotated)}, {args.devices} devices each")
            loads.append(os.getloadavg()[0])
            for name in rotated:
                s = servers[name]
                if name.startswith("bare"):
                    reqs = bench.checkin_reqs(["x"] * args.devices, 1, "/checkin")
                    record(name, "checkin", bench.run_load(s, reqs, args.concurrency))
                    continue
                tokens, reg = bench.register_devices(s, args.devices, args.concurrency)
                record(name, "register", reg)
                new = bench.run_load(s, bench.checkin_reqs(tokens, tasks[name]), args.concurrency)
                rotate = bench.run_load(s, bench.checkin_reqs(tokens, tasks[name]), args.concurrency)
                bench.assignments_of(new)
                bench.assignments_of(rotate)
                record(name, "checkin_new", new)
                record(name, "checkin_rotate", rotate)

    medians = {name: {k: float(np.median(v)) for k, v in per.items()} for name, per in samples.items()}
    backend = "postgresql" if args.db else "sqlite"
    rows = []
    for phase in ("checkin_new", "checkin_rotate"):
        for name, bare in (("old", "bare_old_stack"), ("new", "bare")):
            ms, base = medians[name][f"{phase}_cpu_ms"], medians[bare]["checkin_cpu_ms"]
            rows.append({"server": name, "phase": phase, "cpu_ms": ms, "bare": bare, "bare_cpu_ms": base,
                         # None: the server's CPU time, read in clock ticks (10 ms), was 0 for so few
                         # requests (a tiny run, as in the tests)
                         "bare_over_server": base / ms if ms > 0 else None,
                         "req_per_s": medians[name][f"{phase}_req_per_s"]})  # fmt: skip
    result = {
        "meta": {
            "command": " ".join(
                ["python benchmarks/checkin_ab.py", *(sys.argv[1:] if argv is None else argv)]
            ),
            "old_ref": args.old_ref,
            "old_commit": old_commit,
            "old_stack": args.old_stack,
            "new_commit": bench.git_commit(),
            "database": backend,
            "rounds": args.rounds,
            "devices": args.devices,
            "concurrency": args.concurrency,
            "native_modules_loaded": native,
            "loadavg_1min_per_round": loads,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "wall_s": time.perf_counter() - t0,
        },
        "per_round": samples,
        "medians": medians,
        "table": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"server CPU per check-in, {backend}, medians of {args.rounds} rounds (load {loads})")
    print(f"{'server':6} {'phase':15} {'ms CPU':>7} {'bare ms':>8} {'bare/server':>11} {'req/s':>6}")
    for row in rows:
        ratio = "n/a" if row["bare_over_server"] is None else f"{row['bare_over_server']:.3f}x"
        print(f"{row['server']:6} {row['phase']:15} {row['cpu_ms']:7.3f} {row['bare_cpu_ms']:8.3f} "
              f"{ratio:>11} {row['req_per_s']:6.0f}")  # fmt: skip
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
