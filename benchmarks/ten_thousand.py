#!/usr/bin/env python
"""One federated round with N devices (10,000 by default) through real HTTP and the real database.

    python benchmarks/ten_thousand.py [--devices 10000] [--db postgresql://postgres@127.0.0.1:5432/test]
                                      [--workers 2] [--device-threads 8] [--json PATH]

A real uvicorn server (simulator.server.LocalServer: SQLite in a temporary directory, or a scratch
database created on the ``--db`` PostgreSQL server and dropped afterwards) and ``facefl simulate``'s
machinery (simulator.simulate with ``--server``): N devices registered, one round of the ``tiny`` model
(980 floats) whose target is every device (over-selection 1.0: each device is assigned and must report),
2 identities x 2 generated faces per device (one local step), FedAvg. The devices run as jobs in
``--workers`` processes, ``--device-threads`` at a time in each, sharing the process's connection pool.

Measured: the round's wall time (round open to aggregated, as the simulator reports it), the time to
register the devices, the server process's CPU time during the round per device (Linux /proc, sampled
every 0.2 s with its resident memory), its peak RSS (the largest sample and the kernel's VmHWM), the
devices' outcomes and errors (any job not "uploaded", any error line in the server log), and the load
average (the machine may be shared: the figures are then low). Speed is measured, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.server_throughput import git_commit, process_cpu_s  # noqa: E402

DEFAULT_JSON = REPO / "benchmarks" / "results" / "ten_thousand.json"
SAMPLE_S = 0.2


@dataclass
class Sample:
    t: float
    cpu_s: float
    rss_mb: float


def rss_mb(pid: int, key: str = "VmRSS") -> float | None:
    """A /proc/PID/status memory figure (kB there) in MB, or None."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return None


@dataclass
class Sampler:
    """The server process's CPU time and RSS every SAMPLE_S seconds, in a thread."""

    pid: int
    samples: list[Sample] = field(default_factory=list)
    hwm_mb: float | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(SAMPLE_S)

    def sample(self) -> None:
        cpu, rss = process_cpu_s(self.pid), rss_mb(self.pid)
        if cpu is not None and rss is not None:
            self.samples.append(Sample(time.perf_counter(), cpu, rss))
        self.hwm_mb = rss_mb(self.pid, "VmHWM") or self.hwm_mb

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def cpu_between(self, start: float, end: float) -> float:
        """Server CPU seconds from the last sample at or before ``start`` to the first at or after ``end``."""
        before = [s for s in self.samples if s.t <= start] or self.samples[:1]
        after = [s for s in self.samples if s.t >= end] or self.samples[-1:]
        return after[0].cpu_s - before[-1].cpu_s

    def peak_rss_mb(self, start: float = 0.0, end: float = float("inf")) -> float:
        return max((s.rss_mb for s in self.samples if start <= s.t <= end), default=float("nan"))


def server_log_errors(log_text: str) -> list[str]:
    """Lines of the server log (level warning) that report a failure."""
    marks = ("Traceback", "ERROR", "Exception", " 500 ")
    return [line for line in log_text.splitlines() if any(m in line for m in marks)]


def run_once(args: argparse.Namespace, database_url: str | None, work: Path) -> dict[str, Any]:
    from simulator import SimulationConfig, simulate
    from simulator.server import LocalServer

    events: list[tuple[float, str]] = []

    def log(msg: str) -> None:
        events.append((time.perf_counter(), msg))
        print(f"[ten_thousand] {msg}", file=sys.stderr, flush=True)

    load_before = os.getloadavg()
    client_cpu_before = _own_cpu_s()
    server = LocalServer(work / "server", database_url=database_url, min_retry_after_s=0.2)
    with server:
        assert server.pid is not None
        sampler = Sampler(server.pid).start()
        try:
            result = simulate(
                SimulationConfig(
                    devices=args.devices,
                    rounds=1,
                    model="tiny",
                    ids_per_device=2,
                    images_per_id=2,
                    heldout_ids=2,
                    server=server.base_url,
                    workers=args.workers,
                    device_threads=args.device_threads,
                    target_reports=args.devices,
                    min_reports=args.devices,
                    over_selection=1.0,
                    round_timeout_s=args.round_timeout_s,
                    seed=0,
                    progress=False,
                ),
                log=log,
            )
            ended = time.perf_counter()
        finally:
            sampler.stop()
        log_errors = server_log_errors(server.log_tail(max_chars=1_000_000))
    client_cpu_s = _own_cpu_s() - client_cpu_before
    (r,) = result.rounds
    # the simulator's round wall time ends when it sees the round closed; what it does after (an
    # evaluation of the 980-float model, stopping its workers) costs the server nothing
    round_end = ended
    round_begin = round_end - r.wall_s
    registered = [(t, m) for t, m in events if m.startswith("registered ")]
    registration_s = float(registered[0][1].split(" in ")[1].split(" s")[0]) if registered else None
    round_cpu = sampler.cpu_between(round_begin, round_end)
    not_uploaded = {k: v for k, v in r.jobs.items() if k != "uploaded"}
    return {
        "database": "sqlite" if database_url is None else "postgresql",
        "devices": args.devices,
        "round_status": r.status,
        "reports": r.reports,
        "assigned": r.assigned,
        "round_wall_s": r.wall_s,
        "jobs_done_s": r.jobs_done_s,
        "registration_s": registration_s,
        "total_wall_s": result.total_wall_s,
        "server_cpu_round_s": round(round_cpu, 2),
        "server_cpu_ms_per_device": round(1000 * round_cpu / args.devices, 2),
        "server_cpu_total_s": round(sampler.samples[-1].cpu_s, 2) if sampler.samples else None,
        "server_peak_rss_mb": round(sampler.peak_rss_mb(), 1),
        "server_peak_rss_round_mb": round(sampler.peak_rss_mb(round_begin, round_end), 1),
        "server_vmhwm_mb": round(sampler.hwm_mb, 1) if sampler.hwm_mb is not None else None,
        "client_cpu_s": round(client_cpu_s, 1),
        "mean_job_seconds": r.job_seconds,
        "jobs": r.jobs,
        "errors": len(result.errors) + sum(not_uploaded.values()) + len(log_errors),
        "error_samples": (result.errors + log_errors)[:10],
        "mb_uploaded": r.mb_uploaded,
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "workers": args.workers,
        "device_threads": args.device_threads,
    }


def _own_cpu_s() -> float:
    """CPU seconds of this process and its reaped children (the simulator's worker processes)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| database | devices | round wall s | registration s | server CPU ms/device (round) "
        "| server peak RSS MB | errors | load avg (1 min) before / after |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['database']} | {r['devices']:,} | {r['round_wall_s']:.1f} "
            f"| {r['registration_s'] or 0:.1f} "
            f"| {r['server_cpu_ms_per_device']:.2f} | {r['server_peak_rss_mb']:.0f} | {r['errors']} "
            f"| {r['load_before'][0]:.1f} / {r['load_after'][0]:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--devices", type=int, default=10_000)
    p.add_argument("--db", default=None, help="PostgreSQL server URL (a scratch database); default SQLite")
    p.add_argument("--workers", type=int, default=2, help="device worker processes (2)")
    p.add_argument("--device-threads", type=int, default=8, help="device jobs at once per worker (8)")
    p.add_argument("--round-timeout-s", type=float, default=3600.0)
    p.add_argument("--json", type=Path, default=None, help=f"default {DEFAULT_JSON.name} (+_postgres)")
    args = p.parse_args(argv)
    if args.devices < 1 or args.workers < 1 or args.device_threads < 1:
        p.error("--devices, --workers and --device-threads must be >= 1")
    json_path = args.json or DEFAULT_JSON.with_name(
        DEFAULT_JSON.stem + ("_postgres" if args.db else "") + f"_{args.devices}.json"
    )
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="facefl-10k-")))
        url = None
        if args.db:
            from server_api.db import scratch_database

            url = stack.enter_context(scratch_database(args.db, "facefl_bench"))
        row = run_once(args, url, work)
    report = {
        "meta": {
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "command": "python benchmarks/ten_thousand.py "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "wall_s": round(time.perf_counter() - started, 1),
        },
        "rows": [row],
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(table([row]))
    print(f"wrote {json_path}")
    return 0 if row["errors"] == 0 and row["round_status"] == "aggregated" else 1


if __name__ == "__main__":
    sys.exit(main())
