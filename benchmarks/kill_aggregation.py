"""kill -9 of the server while it aggregates: how fast a restarted server takes the round over, and that
the round yields exactly one model version.

    python benchmarks/kill_aggregation.py [--db postgresql://...] [--trials 3] [--json PATH]

Each trial starts a real server (uvicorn, SQLite in a temporary folder or a fresh database on --db), creates
a ``dlib-resnet`` task (22 MB models) with a release gate on a generated LFW-layout eval set, so that
aggregation takes seconds (a weighted mean of two 22 MB updates, then two evaluations), uploads the two
reports, waits until the round is ``aggregating``, and SIGKILLs the server. It then restarts the server on
the same database and blob store and measures the time until the round is ``aggregated``. The heartbeat
lease (FACEFL_AGGREGATION_LEASE_S, 15 s by default) bounds it; before the heartbeat the fixed lease was
600 s. Prints a table and writes JSON. Only 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from facefl import codec  # noqa: E402
from facefl.data import write_synthetic_lfw  # noqa: E402
from server_api.db import scratch_database  # noqa: E402
from simulator.server import LocalServer  # noqa: E402

ADMIN = "kill-admin-token"
SECRET = "kill-enrollment-secret"


def _wait(predicate: Any, timeout: float, step: float = 0.02) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic() - t0
        time.sleep(step)
    raise TimeoutError(f"condition not met within {timeout} s")


def trial(work: Path, db_url: str | None, lfw: Path) -> dict[str, Any]:
    env = {"FACEFL_EVAL_SETS": json.dumps({"synth": str(lfw)})}
    server = LocalServer(
        work, database_url=db_url, admin_token=ADMIN, enrollment_secret=SECRET, extra_env=env
    )
    admin = {"Authorization": f"Bearer {ADMIN}"}
    with server:
        with httpx.Client(base_url=server.base_url, timeout=120) as c:
            gate = {"metric": "auc", "max_drop": 1.0}  # always served: the gate only adds two evaluations
            policy = {"target_reports": 2, "min_reports": 2, "gate": gate}
            task = {
                "name": "kill",
                "architecture": "dlib-resnet",
                "rounds": 2,
                "eval_set": "synth",
                "policy": policy,
            }
            r = c.post("/v1/tasks", json=task, headers=admin)
            if r.status_code != 201:
                raise RuntimeError(f"task refused: {r.status_code} {r.text}")
            task_id = r.json()["id"]
            devices = []
            for i in range(2):
                r = c.post("/v1/devices", json={"enrollment_secret": SECRET, "name": f"d{i}"})
                r.raise_for_status()
                devices.append({"Authorization": f"Bearer {r.json()['token']}"})
            assignments = [c.post("/v1/checkin", json={}, headers=h).json()["assignment"] for h in devices]
            base = codec.decode(c.get(f"/v1/models/{assignments[0]['base_version']}", headers=admin).content)
            body = codec.encode({k: np.full_like(v, 1e-4) for k, v in base.items()})
            round_id = assignments[0]["round_id"]

            def status() -> str:
                return str(c.get(f"/v1/rounds/{round_id}", headers=admin).json()["status"])

            for h, a in zip(devices, assignments, strict=True):
                r = c.post(f"/v1/rounds/{round_id}/updates?num_samples=10", content=body,
                           headers={**h, "X-Upload-Token": a["upload_token"]})  # fmt: skip
                r.raise_for_status()
            _wait(lambda: status() == "aggregating", 60)
        server.kill()
        killed_at = time.monotonic()
        server.restart()
        restarted = time.monotonic() - killed_at
        with httpx.Client(base_url=server.base_url, timeout=120) as c:
            status_now = str(c.get(f"/v1/rounds/{round_id}", headers=admin).json()["status"])
            _wait(
                lambda: c.get(f"/v1/rounds/{round_id}", headers=admin).json()["status"] == "aggregated",
                120,
                0.1,
            )
            recovered = time.monotonic() - killed_at
            rounds = c.get(f"/v1/tasks/{task_id}/rounds", headers=admin).json()
            versions = c.get("/v1/models", headers=admin).json()
    from_round = [v for v in versions if v.get("round_id") == round_id]
    return {
        "status_after_restart": status_now,
        "restart_s": restarted,
        "recovered_s": recovered,
        "versions_from_round": len(from_round),
        "rounds": [(r["number"], r["status"]) for r in rounds],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", help="a PostgreSQL server URL (a fresh database per trial); default SQLite")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "kill_aggregation.json")
    args = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="facefl-kill-") as tmp:
        lfw = write_synthetic_lfw(Path(tmp) / "lfw", identities_per_fold=3, images_per_identity=3)
        for k in range(args.trials):
            with contextlib.ExitStack() as stack:
                db_url = stack.enter_context(scratch_database(args.db, "facefl_kill")) if args.db else None
                results.append(trial(Path(tmp) / f"trial{k}", db_url, lfw))
            print(f"trial {k}: {results[-1]}", file=sys.stderr)
    rec = [r["recovered_s"] for r in results]
    print(
        "| trials | status after restart | recovered after kill, s (mean +- std, max) | versions per round |"
    )
    print("|---:|---|---|---|")
    print(f"| {len(results)} | {', '.join(sorted({r['status_after_restart'] for r in results}))} | "
          f"{statistics.mean(rec):.1f} +- {statistics.pstdev(rec):.1f}, max {max(rec):.1f} | "
          f"{sorted({r['versions_from_round'] for r in results})} |")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"db": "postgresql" if args.db else "sqlite", "trials": results}, indent=2)
    )
    ok = all(r["versions_from_round"] == 1 for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
