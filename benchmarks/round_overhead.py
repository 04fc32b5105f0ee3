#!/usr/bin/env python
"""Overhead of a facefl round with real training, over the devices' pure local-training time.

    python benchmarks/round_overhead.py [--devices 20] [--workers N] [--overlap 2] [--local-epochs 2]
        [--rounds 3]

A real simulation (``facefl simulate`` internals: a real server on 127.0.0.1 with SQLite, device SDK jobs
in ``--workers`` training slots, one torch thread each, with ``--overlap`` worker processes per slot so
that one's check-in, download and upload run while another trains), ``small`` backbone, generated
faces. Round 1 also pays the one-off costs (worker imports, data generation) and is reported but not
used for the ratio.

Definition. With W parallel workers, the ideal round is the devices' pure training alone with the same
parallelism: the makespan of their measured local-training times (``Trainer`` seconds: forward, backward,
optimizer steps) packed onto W workers by longest-processing-time-first. overhead = round wall time /
that ideal, where the round wall time runs from "the simulator sees the round open" to "the server
reports it aggregated" (check-in, model download, local training incl. model set-up, upload, the wait
for the last report and the aggregation). Goal <= 1.10. Markdown table on stdout, JSON under
benchmarks/results/. Speed is measured, not asserted.
"""

from __future__ import annotations

import argparse
import heapq
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

from benchmarks.server_throughput import git_commit  # noqa: E402
from simulator.run import SimulationConfig, simulate  # noqa: E402

DEFAULT_JSON = REPO / "benchmarks" / "results" / "round_overhead.json"


def lpt_makespan(durations: list[float], workers: int) -> float:
    """Longest-processing-time-first schedule of ``durations`` on ``workers`` identical machines."""
    loads = [0.0] * max(1, workers)
    for d in sorted(durations, reverse=True):
        heapq.heappush(loads, heapq.heappop(loads) + d)
    return max(loads)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--devices", type=int, default=20)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--overlap", type=int, default=2, help="worker processes per training slot (2; 1: no overlap)"
    )
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--ids-per-device", type=int, default=5)
    p.add_argument("--images-per-id", type=int, default=20)
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = p.parse_args(argv)
    if args.devices < 1 or args.workers < 1 or args.overlap < 1 or args.rounds < 2:
        p.error("--devices, --workers and --overlap must be >= 1, --rounds >= 2 (round 1 is the warm-up)")
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="facefl-overhead-") as tmp:
        cfg = SimulationConfig(
            devices=args.devices, rounds=args.rounds, model="small", ids_per_device=args.ids_per_device,
            images_per_id=args.images_per_id, heldout_ids=10, workers=args.workers,
            local_epochs=args.local_epochs, batch_size=16, work_dir=tmp, progress=True, overlap=args.overlap,
        )  # fmt: skip
        result = simulate(cfg, log=lambda m: print(m, file=sys.stderr))
    workers = min(args.workers, args.devices)
    rows: list[dict[str, Any]] = []
    for r in result.rounds:
        ideal = lpt_makespan(r.device_train_s, workers)
        phases = r.job_seconds
        rows.append(
            {
                "round": r.round, "status": r.status, "reports": r.reports, "wall_s": r.wall_s,
                "ideal_train_makespan_s": ideal, "overhead": r.wall_s / ideal if ideal else float("nan"),
                "longest_device_train_s": max(r.device_train_s, default=0.0),
                "sum_device_train_s": sum(r.device_train_s),
                "jobs_done_s": r.jobs_done_s, "close_wait_s": r.wall_s - r.jobs_done_s,
                "mean_phase_s": phases, "peak_trainings": r.peak_trainings, "warm": r.round > 1,
            }
        )  # fmt: skip
    warm = [row for row in rows if row["warm"]]
    summary = {
        "overhead_warm_rounds": sum(r["wall_s"] for r in warm)
        / sum(r["ideal_train_makespan_s"] for r in warm),
        "goal": 1.10,
    }
    meta = {
        "devices": args.devices, "workers": workers, "overlap": args.overlap,
        "local_epochs": args.local_epochs,
        "images_per_device": args.ids_per_device * args.images_per_id, "model": "small",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"), "git_commit": git_commit(),
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "wall_s": time.perf_counter() - t0,
    }  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "rounds": rows, "summary": summary}, indent=2) + "\n")
    print(
        f"round overhead: {args.devices} devices x {meta['images_per_device']} generated faces, "
        f"{args.local_epochs} local epochs, small model, {workers} workers x {args.overlap} processes, "
        f"{os.cpu_count()} CPUs"
    )
    print(
        "| round | wall s | ideal s (training, LPT on W) | overhead | check-in s | download s | train s "
        "(incl. set-up) | wait for a training slot s | upload s | close wait s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        ph = row["mean_phase_s"]
        print(
            f"| {row['round']}{'' if row['warm'] else ' (warm-up)'} | {row['wall_s']:.2f} | "
            f"{row['ideal_train_makespan_s']:.2f} | {row['overhead']:.3f} | {ph.get('checkin', 0):.3f} | "
            f"{ph.get('download', 0):.3f} | {ph.get('train', 0):.3f} | {ph.get('train_wait', 0):.3f} | "
            f"{ph.get('upload', 0):.3f} | "
            f"{row['close_wait_s']:.2f} |"
        )
    print(f"\noverhead over the warm rounds: {summary['overhead_warm_rounds']:.3f} (goal <= 1.10)")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
