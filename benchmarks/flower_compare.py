#!/usr/bin/env python
"""Flower against facefl on the same trivial FedAvg task, in one run, side by side.

    python benchmarks/flower_compare.py [--clients 500] [--rounds 3] [--flower-python PATH] [--json PATH]
        [--procs 2] [--threads 16] [--server-workers 1] [--facefl-only]

The task: every client, every round, returns the weights it received plus small noise (no training);
500 clients, 3 timed rounds after one warm-up round, all clients per round. Reported: client updates per
second over the timed rounds, and start-up (until the warm-up round has aggregated) separately.

- Flower: its simulation engine (``flwr.simulation.run_simulation``, Ray backend, Message API, FedAvg),
  pinned ``flwr[simulation]==1.41.0`` (the ``bench`` extra). Flower pins its own fastapi/uvicorn/protobuf,
  so it lives in its own environment: ``--flower-python`` (default ``.venv-flower/bin/python``).
  It runs twice: with the task's 1,000-float model, and with as many floats as facefl's update.
- facefl: a real server (``facefl serve``, SQLite unless ``--db``), real HTTP, device SDK clients
  (``benchmarks/_trivial_fedavg.py``) on the ``tiny`` architecture (one linear layer, 980 floats: the
  task's ~1,000-float model). ``--server-workers``: ``facefl serve --workers N``. ``--facefl-only``: no
  Flower run (where no Flower environment is installed); the JSON then has the facefl row alone.

Markdown table on stdout, JSON under benchmarks/results/. Speed is measured, not asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
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

DEFAULT_JSON = REPO / "benchmarks" / "results" / "flower_compare.json"
DEFAULT_FLOWER_PYTHON = REPO / ".venv-flower" / "bin" / "python"


def run_flower(
    python: str, clients: int, rounds: int, floats: int, num_cpus: float, log: Any
) -> dict[str, Any]:
    log(f"flower: {clients} clients, {rounds} rounds (+1 warm-up), {floats:,} floats, {num_cpus} CPU/client")
    cmd = [python, str(REPO / "benchmarks" / "_flower_side.py"), "--clients", str(clients),
           "--rounds", str(rounds), "--floats", str(floats), "--num-cpus", str(num_cpus)]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="flower-") as tmp:  # Ray and Flower write into the cwd/home
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"flower run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    log(f"flower: {out['updates_per_s']:.1f} updates/s, start-up {out['startup_s']:.1f} s")
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| system | model floats / update | updates/s (timed rounds) | s per round | start-up s | notes |"
    lines = [head, "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        rounds = ", ".join(f"{s:.2f}" for s in r["round_s"])
        lines.append(
            f"| {r['system']} | {r['floats_per_update']:,} | {r['updates_per_s']:.1f} | {rounds} | "
            f"{r['startup_s']:.1f} | {r.get('notes', '')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--clients", type=int, default=500)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--flower-python", default=str(DEFAULT_FLOWER_PYTHON), help="interpreter with flwr installed"
    )
    p.add_argument("--flower-cpus", type=float, default=1.0, help="Ray CPUs per Flower client (1)")
    p.add_argument("--db", default=None, help="database URL for facefl (default SQLite in a temp dir)")
    p.add_argument("--procs", type=int, default=2, help="facefl client processes (2)")
    p.add_argument("--threads", type=int, default=16, help="threads per facefl client process (16)")
    p.add_argument("--server-workers", type=int, default=1, help="facefl serve --workers (1)")
    p.add_argument("--facefl-only", action="store_true", help="measure facefl alone (no Flower run)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = p.parse_args(argv)
    if args.clients < 2 or args.rounds < 1:
        p.error("--clients must be >= 2 and --rounds >= 1")
    if args.procs < 1 or args.threads < 1 or args.server_workers < 1:
        p.error("--procs, --threads and --server-workers must be >= 1")
    # absolute (Flower runs in a temporary directory), without resolving the venv's interpreter symlink
    args.flower_python = os.path.abspath(args.flower_python)
    if not args.facefl_only and not Path(args.flower_python).exists():
        p.error(
            f"--flower-python {args.flower_python} does not exist (pip install 'flwr[simulation]==1.41.0')"
        )
    t_start = time.perf_counter()
    load_before = os.getloadavg()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="facefl-compare-") as tmp:
        facefl = run_facefl(
            Path(tmp), clients=args.clients, rounds=args.rounds, database_url=args.db, procs=args.procs,
            threads=args.threads, workers=args.server_workers, log=log,
        ).to_json()  # fmt: skip
    log(f"facefl: {facefl['updates_per_s']:.1f} updates/s, start-up {facefl['startup_s']:.1f} s")
    updates = args.clients * args.rounds
    cpu, client_cpu = facefl["server_cpu_s"], facefl.get("client_cpu_s")
    notes = [f"server CPU {1000 * cpu / updates:.1f} ms/update"] if cpu else []
    if client_cpu:
        notes.append(f"client CPU {1000 * client_cpu / updates:.1f} ms/update")
    workers = facefl["workers"]
    rows = [
        {
            "system": f"facefl (HTTP, {facefl['database']}, {workers} worker{'s' if workers > 1 else ''})",
            **facefl,
            "notes": ", ".join(notes),
        }
    ]
    ratios: dict[str, float] = {}
    if not args.facefl_only:
        flower_small = run_flower(args.flower_python, args.clients, args.rounds, 1000, args.flower_cpus, log)
        flower_same = run_flower(
            args.flower_python, args.clients, args.rounds, facefl["floats_per_update"], args.flower_cpus, log
        )
        rows[:0] = [
            {
                "system": f"Flower {flower_small['flwr']} (simulation, Ray)",
                **flower_small,
                "notes": "the task's model",
            },
            {
                "system": f"Flower {flower_same['flwr']} (simulation, Ray)",
                **flower_same,
                "notes": "facefl's update size",
            },
        ]
        ratios = {
            "facefl_over_flower_1000_floats": facefl["updates_per_s"] / flower_small["updates_per_s"],
            "facefl_over_flower_same_size": facefl["updates_per_s"] / flower_same["updates_per_s"],
        }
    result = {
        "meta": {
            "clients": args.clients, "rounds": args.rounds, "warmup_rounds": 1,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"), "git_commit": git_commit(),
            "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "facefl_clients": f"{args.procs} processes x {args.threads} threads, device_sdk.FederatedClient",
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
            "wall_s": time.perf_counter() - t_start,
        },
        "rows": rows,
        "ratios": ratios,
    }  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"trivial FedAvg, {args.clients} clients, {args.rounds} timed rounds, {os.cpu_count()} CPUs")
    print(markdown(rows))
    if ratios:
        print(
            "\nfacefl / Flower updates/s: "
            f"{ratios['facefl_over_flower_1000_floats']:.2f}x (Flower with 1,000 floats), "
            f"{ratios['facefl_over_flower_same_size']:.2f}x (same update size); goal >= 1x (long goal 5x)"
        )
    else:
        print("\nFlower was not run (--facefl-only): no ratio")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
