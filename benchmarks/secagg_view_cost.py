"""What the ``submitted`` digests add to a secure-aggregation poll (``GET /v1/rounds/{id}/secagg``).

Every waiting device polls that view about once a second, and the polls are most of a secure round's
server CPU (README, "What secure aggregation costs"). Since the resend work the view also lists the
digests of the device's own recorded requests (server_api.services.secagg_resend), which costs a few
primary-key reads. This measures the view of one device that has sent all four requests (the worst case),
in the unmask stage of an N-device round: without the digests (``secagg_resend.submitted`` replaced by
an empty answer: the view as it was before), with them served from the per-process cache (every poll
after the first), and with the cache off (every poll reads them), alternating blocks of calls in one
process so that load from other jobs hits all three alike. Service level (``secagg.view``) and full
request (in-process ASGI through ``TestClient``).

    python benchmarks/secagg_view_cost.py [--devices 20] [--calls 2000] [--database-url postgresql://...]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import SecretStr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastapi.testclient import TestClient

from benchmarks.server_throughput import git_commit
from facefl import codec
from facefl.secagg.client import SecAggClient
from facefl.secagg.roster import Advertisement, Roster
from server_api.app import create_app
from server_api.db import scratch_database
from server_api.services import secagg, secagg_resend
from server_api.settings import Settings

ADMIN, SECRET = "bench-admin", "bench-secret"


def _drive(c: TestClient, n: int) -> tuple[int, str, dict[str, str]]:
    """An N-device secure round in its unmask stage; device 0 has revealed. (round id, device id, headers)."""
    admin = {"Authorization": f"Bearer {ADMIN}"}
    policy = {
        "target_reports": n, "min_reports": 2, "over_selection": 1.0, "round_timeout_s": 3600,
        "secure_aggregation": {"clip_norm": 5.0, "stage_timeout_s": 3600},
    }  # fmt: skip
    r = c.post("/v1/tasks", json={"name": "bench", "architecture": "tiny", "rounds": 1, "policy": policy},
               headers=admin)  # fmt: skip
    assert r.status_code == 201, r.text
    devs: list[dict[str, Any]] = []
    for _ in range(n):
        reg = c.post("/v1/devices", json={"enrollment_secret": SECRET}).json()
        auth = {"Authorization": f"Bearer {reg['token']}"}
        a = c.post("/v1/checkin", json={}, headers=auth).json()["assignment"]
        h = {**auth, "X-Upload-Token": a["upload_token"]}
        devs.append({"id": reg["device_id"], "h": h, "m": SecAggClient(reg["device_id"], a["round_id"])})
    rid = int(a["round_id"])
    path = f"/v1/rounds/{rid}/secagg"
    for d in devs:
        ad = d["m"].advertise()
        keys = {
            "c_public": base64.b64encode(ad.c_public).decode(),
            "s_public": base64.b64encode(ad.s_public).decode(),
        }
        assert c.post(f"{path}/keys", json=keys, headers=d["h"]).status_code == 200
    v = c.get(path, headers=devs[0]["h"]).json()
    ads = [Advertisement(m["device_id"], base64.b64decode(m["c_public"]), base64.b64decode(m["s_public"]))
           for m in v["roster"]]  # fmt: skip
    roster = Roster.build(rid, ads, graph_seed=v["graph_seed"], max_degree=32)
    for d in devs:
        out = d["m"].share(roster)
        body = b"".join(out[p] for p in roster.neighbours(d["id"]))
        assert c.post(f"{path}/shares", content=body, headers=d["h"]).status_code == 200
    for d in devs:
        v = c.get(path, headers=d["h"]).json()
        inbox = {k: base64.b64decode(x) for k, x in v["inbox"].items()}
        vector = np.zeros(v["vector_length"], np.uint32)
        vector[-1] = 1
        body = codec.encode({"masked": d["m"].mask(inbox, vector)})
        assert c.post(f"{path}/masked-update", content=body, headers=d["h"]).status_code == 202
    v = c.get(path, headers=devs[0]["h"]).json()
    reveal = devs[0]["m"].unmask(set(), set(v["uploaders"]))
    shares = b"".join(reveal.self_seed_shares[o] for o in sorted(reveal.self_seed_shares))
    assert c.post(f"{path}/reveal", content=shares, headers=devs[0]["h"]).status_code == 200
    v = c.get(path, headers=devs[0]["h"]).json()
    assert v["stage"] == "unmask" and len(v["submitted"]) == 4, v
    return rid, devs[0]["id"], devs[0]["h"]


def _per_call_us(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--calls", type=int, default=2000, help="per variant and level, in 10 blocks")
    ap.add_argument(
        "--database-url", default=None, help="a PostgreSQL server (a scratch database is made on it)"
    )
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/secagg_view_cost.json"))
    args = ap.parse_args(argv)
    real_submitted = secagg_resend.submitted
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        if args.database_url:  # a fresh database on that server, dropped afterwards
            url = stack.enter_context(scratch_database(args.database_url, "facefl_bench"))
        settings = Settings(
            database_url=url,
            data_dir=Path(tmp) / "data", admin_token=SecretStr(ADMIN), enrollment_secret=SecretStr(SECRET),
            min_retry_after_s=0.05, tick_interval_s=1.0, rate_limit_per_s=0,
        )  # fmt: skip
        with TestClient(create_app(settings)) as c:
            rid, device_id, headers = _drive(c, args.devices)
            ctx = c.app.state.ctx  # type: ignore[attr-defined]
            token = headers["X-Upload-Token"]
            levels: dict[str, Callable[[], object]] = {
                "service": lambda: secagg.view(ctx, rid, device_id, token),
                "request": lambda: c.get(f"/v1/rounds/{rid}/secagg", headers=headers),
            }
            block = max(1, args.calls // 10)
            cache = ctx.secagg_submitted
            variants = ("without", "cached", "uncached")
            samples = {lv: {v: [] for v in variants} for lv in levels}  # type: dict[str, dict[str, list[float]]]
            load_before = os.getloadavg()
            for lv, fn in levels.items():
                _per_call_us(fn, block)  # warm-up (the cohort cache, connections)
                for _ in range(10):
                    for variant in variants:
                        # without: the view as before the digests; uncached: every poll reads them
                        secagg_resend.submitted = (  # type: ignore[assignment]
                            (lambda *a: {}) if variant == "without" else real_submitted
                        )
                        cache.max_entries = 0 if variant == "uncached" else 65536
                        samples[lv][variant].append(_per_call_us(fn, block))
            secagg_resend.submitted = real_submitted  # type: ignore[assignment]
            load_after = os.getloadavg()
    result: dict[str, Any] = {
        "benchmark": "secagg_view_cost",
        "command": "python benchmarks/secagg_view_cost.py " + " ".join(argv or sys.argv[1:]),
        "commit": git_commit(),
        "database": "postgresql" if args.database_url else "sqlite",
        "devices": args.devices,
        "calls_per_block": block,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "levels": {},
    }
    for lv, s in samples.items():
        med = {v: statistics.median(s[v]) for v in s}
        result["levels"][lv] = {
            **{f"median_us_{v}": round(med[v], 1) for v in med},
            "ratio_cached": round(med["cached"] / med["without"], 3),
            "ratio_uncached": round(med["uncached"] / med["without"], 3),
            **{f"blocks_us_{v}": [round(x, 1) for x in s[v]] for v in s},
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(args.out.read_text()) if args.out.exists() else []
    existing = [r for r in existing if r.get("database") != result["database"]] + [result]
    args.out.write_text(json.dumps(existing, indent=2) + "\n")
    for lv, r in result["levels"].items():
        print(f"{result['database']} {lv}: without digests {r['median_us_without']} us, with (cached) "
              f"{r['median_us_cached']} us ({r['ratio_cached']}x), with (uncached) "
              f"{r['median_us_uncached']} us ({r['ratio_uncached']}x)")  # fmt: skip
    print(f"load average before {load_before}, after {load_after}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
