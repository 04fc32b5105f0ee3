#!/usr/bin/env python
"""Server throughput of facefl, side by side with bare baselines, in one run.

    python benchmarks/server_throughput.py [--quick] [--json PATH] [--db URL]

1. Check-ins/s: `POST /v1/checkin` by registered devices (a new assignment each, then a re-check-in that
   rotates the upload token) against a bare FastAPI `POST /checkin` that parses a small JSON body and
   answers a small JSON (benchmarks/_bare_app.py), both served by the same uvicorn command line (with
   httptools and uvloop, server_api/serving.py; the JSON records whether each server really loaded them).
2. Uploads/s of a real, valid ~4 MB delta (mobilefacenet) to `POST /v1/rounds/{id}/updates` against a bare
   endpoint that streams the body to a file (with and without fsync).
3. FedAvg aggregation in GB/s: the server's mean of update blob files (`facefl.update_files.mean_of_files`:
   memory-mapped, one pass) and `WeightedMean` over in-memory arrays, against in-place
   `numpy.add(acc, x, out=acc)` over the same arrays (the memory-bandwidth floor); and the server's real
   end-to-end aggregation of the upload round (last 202 -> `aggregated`).

The load generator is threads with one keep-alive `http.client` connection each: httpx costs ~0.5 ms of
client CPU per request, which on a 2-core machine caps the bare baseline well below what it can serve.
Both servers run as subprocesses on 127.0.0.1 (SQLite in a temporary directory unless --db is given; for a
PostgreSQL URL a fresh database is created and dropped unless --no-fresh-db) and are stopped at the end.
Speed is measured, not asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    # first: an installed (editable) facefl elsewhere must not shadow this checkout, whose server_api the
    # server subprocess runs (LocalServer puts its own checkout on the server's PYTHONPATH)
    sys.path.insert(0, str(REPO))

from device_sdk import AdminClient  # noqa: E402
from facefl import codec, update_files  # noqa: E402
from facefl.algorithms.fedavg import WeightedMean  # noqa: E402
from server_api.serving import uvicorn_options  # noqa: E402
from simulator.server import LocalServer  # noqa: E402

ADMIN = "bench-admin-token-0123456789"
SECRET = "bench-enrollment-secret-0123456789"
DEFAULT_JSON = REPO / "benchmarks" / "results" / "server_throughput.json"


@dataclass(frozen=True)
class Sizes:
    devices: int  # check-ins per phase and repetition (one per device)
    checkin_concurrency: int
    uploads: int  # timed uploads per variant and repetition
    upload_warmup: int  # untimed uploads before the timed ones (they count into the facefl round)
    upload_concurrency: int
    repeats: int  # facefl and baseline phases alternate this many times; req/s is the median
    agg_updates: int  # K of the in-process aggregation benchmark
    agg_repeats: int  # best of


FULL = Sizes(devices=1000, checkin_concurrency=8, uploads=15, upload_warmup=2, upload_concurrency=4,
             repeats=3, agg_updates=20, agg_repeats=5)  # fmt: skip
QUICK = Sizes(devices=100, checkin_concurrency=8, uploads=3, upload_warmup=1, upload_concurrency=4,
              repeats=2, agg_updates=5, agg_repeats=2)  # fmt: skip


# ------------------------------------------------------------------------------------------- servers


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux /proc), or None where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class ServerProcess(LocalServer):
    """The simulator's LocalServer (uvicorn --factory, 1 worker, log level warning), named, with CPU time."""

    def __init__(self, name: str, work_dir: Path, **kwargs: Any) -> None:
        super().__init__(work_dir, log_name=f"{name}.log", startup_timeout_s=120.0, **kwargs)
        self.name = name

    def cpu_s(self) -> float | None:
        return process_cpu_s(self.pid) if self.pid is not None else None

    def native_modules(self) -> dict[str, bool] | None:
        """Whether the running server has loaded httptools' parser and uvloop's loop (their extension
        modules in /proc/PID/maps): what it really runs on, not what its command line asked for."""
        if self.pid is None:
            return None
        try:
            maps = Path(f"/proc/{self.pid}/maps").read_text()
        except OSError:
            return None
        return {"httptools": "/httptools/parser/" in maps, "uvloop": "/uvloop/loop." in maps}


def fresh_postgres(url: str) -> contextlib.AbstractContextManager[str]:
    """A uniquely named database on the server of `url`, dropped afterwards."""
    from server_api.db import scratch_database

    return scratch_database(url, "facefl_bench")


# -------------------------------------------------------------------------------------- load generator


@dataclass(frozen=True)
class Req:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes | None
    expect: int


@dataclass
class LoadResult:
    seconds: float
    latencies_s: list[float]
    done_at: list[float]  # perf_counter when each response was fully read
    bodies: list[bytes]
    server_cpu_s: float | None
    payload_bytes: int = 0


def summarize(runs: list[LoadResult]) -> dict[str, Any]:
    """Repetitions of one phase: req/s is the median repetition's; latency percentiles are pooled."""
    lat = np.concatenate([np.asarray(r.latencies_s) for r in runs]) * 1000.0
    rates = [len(r.latencies_s) / r.seconds for r in runs]
    cpu = [r.server_cpu_s for r in runs]
    payload = sum(r.payload_bytes for r in runs)
    out: dict[str, Any] = {
        "requests": int(lat.size),
        "repeats": len(runs),
        "seconds": sum(r.seconds for r in runs),
        "req_per_s": float(np.median(rates)),
        "req_per_s_each": rates,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "mean_ms": float(lat.mean()),
        "max_ms": float(lat.max()),
        "server_cpu_ms_per_req": None if None in cpu else 1000.0 * sum(cpu) / lat.size,  # type: ignore[arg-type]
    }
    if payload:
        out["bytes_per_req"] = payload // lat.size
        out["mb_per_s"] = out["req_per_s"] * out["bytes_per_req"] / 1e6
    return out


def run_load(server: ServerProcess, reqs: list[Req], concurrency: int, timeout: float = 120.0) -> LoadResult:
    """Send exactly `reqs` (a bounded list) over `concurrency` keep-alive connections; fail on any error."""
    n = len(reqs)
    latencies = [0.0] * n
    done_at = [0.0] * n
    bodies = [b""] * n
    errors: list[str] = []
    lock = threading.Lock()
    cursor = iter(range(n))
    start = threading.Barrier(concurrency + 1, timeout=60)

    def worker() -> None:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
        try:
            start.wait()
            while True:
                with lock:
                    i = next(cursor, None)
                if i is None:
                    return
                r = reqs[i]
                t0 = time.perf_counter()
                try:
                    conn.request(r.method, r.path, body=r.body, headers=r.headers)
                    resp = conn.getresponse()
                    data = resp.read()
                except (OSError, http.client.HTTPException) as exc:
                    conn.close()  # never retried: a POST may have taken effect
                    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
                    with lock:
                        errors.append(f"{r.method} {r.path}: {exc!r}")
                    continue
                t1 = time.perf_counter()
                latencies[i], done_at[i], bodies[i] = t1 - t0, t1, data
                if resp.status != r.expect:
                    with lock:
                        errors.append(f"{r.method} {r.path}: {resp.status} {data[:300]!r}")
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    cpu0 = server.cpu_s()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    cpu1 = server.cpu_s()
    if errors:
        raise RuntimeError(
            f"{len(errors)} of {n} requests to {server.name} failed, e.g.:\n" + "\n".join(errors[:5])
        )
    return LoadResult(
        seconds=seconds,
        latencies_s=latencies,
        done_at=done_at,
        bodies=bodies,
        server_cpu_s=None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
        payload_bytes=sum(len(r.body or b"") for r in reqs),
    )


# ------------------------------------------------------------------------------------------ facefl setup


def admin_client(server: ServerProcess) -> AdminClient:
    return AdminClient(server.base_url, ADMIN, timeout=120)


def json_req(path: str, body: dict[str, Any], token: str, expect: int) -> Req:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    return Req("POST", path, headers, json.dumps(body).encode(), expect)


def register_devices(server: ServerProcess, count: int, concurrency: int) -> tuple[list[str], LoadResult]:
    body = {
        "enrollment_secret": SECRET,
        "name": None,
        "capabilities": {"accelerator": "cpu", "num_samples": 100},
    }
    reqs = [json_req("/v1/devices", body, "none", 201) for _ in range(count)]
    result = run_load(server, reqs, concurrency)
    return [json.loads(b)["token"] for b in result.bodies], result


def checkin_reqs(tokens: list[str], task_id: int, path: str = "/v1/checkin") -> list[Req]:
    """The same small body for facefl and the bare baseline (which ignores the bearer token)."""
    body = {"task_id": task_id, "capabilities": {"accelerator": "cpu", "num_samples": 100}}
    return [json_req(path, body, tok, 200) for tok in tokens]


def assignments_of(result: LoadResult) -> list[dict[str, Any]]:
    out = []
    for raw in result.bodies:
        answer = json.loads(raw)
        if answer.get("action") != "train":
            raise RuntimeError(f"check-in did not get an assignment: {answer}")
        out.append(answer["assignment"])
    return out


# ------------------------------------------------------------------------------------------ benchmarks


def bench_checkin(
    facefl: ServerProcess, bare: ServerProcess, sizes: Sizes, log: Callable[[str], None]
) -> dict:
    n, c, reps = sizes.devices, sizes.checkin_concurrency, sizes.repeats
    with admin_client(facefl) as admin:
        task = admin.create_task(
            "bench-checkin",
            architecture="small",
            rounds=1,
            policy={
                "target_reports": 100_000,
                "over_selection": 1.0,
                "min_reports": 1,
                "round_timeout_s": 86_400.0,
            },
        )
    tid = task.id
    # warm-up (untimed): connections, code paths, caches, on both servers
    warm_tokens, _ = register_devices(facefl, max(20, n // 20), c)
    run_load(facefl, checkin_reqs(warm_tokens, tid), c)
    run_load(bare, checkin_reqs(warm_tokens, tid, "/checkin"), c)

    phases: dict[str, list[LoadResult]] = {"register": [], "baseline": [], "new": [], "rotate": []}
    for rep in range(reps):
        log(f"check-in {rep + 1}/{reps}: {n} registrations, then {n} requests x 3 phases, concurrency {c}")
        tokens, reg = register_devices(facefl, n, c)
        baseline = run_load(bare, checkin_reqs(tokens, tid, "/checkin"), c)
        new = run_load(facefl, checkin_reqs(tokens, tid), c)
        rotate = run_load(facefl, checkin_reqs(tokens, tid), c)
        first, second = assignments_of(new), assignments_of(rotate)
        if any(a["upload_token"] == b["upload_token"] for a, b in zip(first, second, strict=True)):
            raise RuntimeError("a re-check-in did not rotate the upload token")
        for key, run in (("register", reg), ("baseline", baseline), ("new", new), ("rotate", rotate)):
            phases[key].append(run)
    return {
        "devices_per_repeat": n,
        "repeats": reps,
        "concurrency": c,
        "task_id": tid,
        "facefl_new_assignment": summarize(phases["new"]),
        "facefl_rotate_token": summarize(phases["rotate"]),
        "facefl_register_device": summarize(phases["register"]),
        "baseline": summarize(phases["baseline"]),
    }


def make_deltas(base: dict[str, np.ndarray], count: int, seed: int = 0) -> list[bytes]:
    """`count` distinct, valid, small deltas for every tensor of `base` (distinct bytes: the store dedups)."""
    rng = np.random.default_rng(seed)
    template = {k: (rng.standard_normal(v.shape) * 1e-3).astype(np.float32) for k, v in base.items()}
    first = next(iter(template))
    payloads = []
    for i in range(count):
        tensors = dict(template)
        tensors[first] = template[first] + np.float32(1e-6 * (i + 1))
        payloads.append(codec.encode(tensors))
    return payloads


def upload_reqs(tokens: list[str], assignments: list[dict[str, Any]], payloads: list[bytes]) -> list[Req]:
    """One upload request per device: its token, its assignment's upload token, its own payload."""
    reqs = []
    for i, (token, a) in enumerate(zip(tokens, assignments, strict=True)):
        headers = {
            "Authorization": f"Bearer {token}",
            "X-Upload-Token": a["upload_token"],
            "Content-Type": "application/octet-stream",
            "X-Metrics": '{"loss": 1.0}',
        }
        path = f"/v1/rounds/{a['round_id']}/updates?num_samples={50 + i}"
        reqs.append(Req("POST", path, headers, payloads[i], 202))
    return reqs


def bench_upload(
    facefl: ServerProcess, bare: ServerProcess, sizes: Sizes, log: Callable[[str], None]
) -> tuple[dict, dict[str, np.ndarray]]:
    u, w, c, reps = sizes.uploads, sizes.upload_warmup, sizes.upload_concurrency, sizes.repeats
    total = w + u * reps
    with admin_client(facefl) as admin:
        task = admin.create_task(
            "bench-upload",
            architecture="mobilefacenet",
            rounds=1,
            policy={
                "target_reports": total,
                "over_selection": 1.0,
                "min_reports": total,
                "round_timeout_s": 86_400.0,
            },
        )
        assert task.current_version is not None and task.current_round is not None
        base_version = task.current_version
        info = admin.model_info(base_version)
        base = admin.download_model(base_version)
        round_id = task.current_round.id

        log(f"upload: preparing {total} devices, assignments and deltas")
        tokens, _ = register_devices(facefl, total, c)
        assignments = assignments_of(run_load(facefl, checkin_reqs(tokens, task.id), c))
        payloads = make_deltas(base, total)

        uploads = upload_reqs(tokens, assignments, payloads)

        def ours(lo: int, hi: int) -> list[Req]:
            return uploads[lo:hi]

        def bare_reqs(fsync: int, lo: int, hi: int) -> list[Req]:
            headers = {"Content-Type": "application/octet-stream"}
            return [Req("POST", f"/upload?fsync={fsync}", headers, payloads[i], 202) for i in range(lo, hi)]

        run_load(bare, bare_reqs(1, 0, w), c)  # warm-up (untimed)
        run_load(facefl, ours(0, w), c)
        phases: dict[str, list[LoadResult]] = {"facefl": [], "fsync": [], "no_fsync": []}
        for rep in range(reps):
            lo, hi = w + rep * u, w + (rep + 1) * u
            log(
                f"upload {rep + 1}/{reps}: {u} x {len(payloads[0]) / 1e6:.2f} MB per variant, concurrency {c}"
            )
            phases["fsync"].append(run_load(bare, bare_reqs(1, lo, hi), c))
            phases["no_fsync"].append(run_load(bare, bare_reqs(0, lo, hi), c))
            phases["facefl"].append(run_load(facefl, ours(lo, hi), c))
        last_202 = max(phases["facefl"][-1].done_at)

        # end-to-end aggregation: the round's last 202 submits it; poll the round until it is aggregated
        rnd = admin.wait_for_round(round_id, timeout_s=300, poll_s=0.005)
        e2e = time.perf_counter() - last_202
        if rnd.status != "aggregated":
            raise RuntimeError(f"round {round_id} did not aggregate: {rnd}")
    update_bytes = sum(v.nbytes for v in base.values())
    section = {
        "model": "mobilefacenet",
        "model_size_bytes": info.size_bytes,
        "payload_bytes": len(payloads[0]),
        "tensors": len(base),
        "uploads_per_repeat": u,
        "repeats": reps,
        "warmup_uploads": w,
        "concurrency": c,
        "facefl": summarize(phases["facefl"]),
        "baseline_fsync": summarize(phases["fsync"]),
        "baseline_no_fsync": summarize(phases["no_fsync"]),
        "round_aggregation": {
            "round_id": round_id,
            "reports": total,
            "update_bytes": update_bytes,
            "end_to_end_s": e2e,
            "server_aggregation_s": float(rnd.metrics.get("aggregation_s", float("nan"))),
            "end_to_end_gb_per_s": total * update_bytes / e2e / 1e9,
            "result_version": rnd.result_version,
        },
    }
    return section, base


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_aggregation(
    base: dict[str, np.ndarray], sizes: Sizes, workdir: Path, log: Callable[[str], None]
) -> dict:
    k = sizes.agg_updates
    log(f"aggregation: K={k} updates, best of {sizes.agg_repeats}")
    rng = np.random.default_rng(1)
    arrays = [
        {n: (rng.standard_normal(v.shape) * 1e-3).astype(np.float32) for n, v in base.items()}
        for _ in range(k)
    ]
    paths = []
    for i, tensors in enumerate(arrays):
        p = workdir / f"update-{i}.safetensors"
        p.write_bytes(codec.encode(tensors))
        paths.append(p)
    update_bytes = sum(v.nbytes for v in arrays[0].values())
    weights = [float(50 + i) for i in range(k)]

    def from_files() -> None:  # the server's path: each blob memory-mapped, accumulated in one pass
        update_files.mean_of_files(paths, weights)

    def in_memory() -> None:
        mean = WeightedMean()
        for tensors, wt in zip(arrays, weights, strict=True):
            mean.add(tensors, wt)

    def numpy_floor() -> None:
        acc = {n: np.zeros_like(v) for n, v in arrays[0].items()}
        for tensors in arrays:
            for n, x in tensors.items():
                np.add(acc[n], x, out=acc[n])

    def load_only() -> None:
        for p in paths:
            codec.load_file(p)

    def result_only() -> None:
        mean.result()

    from_files()  # warm the page cache and the allocator
    mean = WeightedMean()
    for tensors, wt in zip(arrays, weights, strict=True):
        mean.add(tensors, wt)
    r = sizes.agg_repeats
    seconds = {
        "weighted_mean_files": best_of(r, from_files),
        "weighted_mean_memory": best_of(r, in_memory),
        "numpy_add_floor": best_of(r, numpy_floor),
        "load_file_only": best_of(r, load_only),
    }
    total = k * update_bytes
    out: dict[str, Any] = {
        "updates": k,
        "update_bytes": update_bytes,
        "tensors": len(arrays[0]),
        "repeats": r,
    }
    for name, s in seconds.items():
        out[name] = {"seconds": s, "gb_per_s": total / s / 1e9}
    out["weighted_mean_result_s"] = best_of(r, result_only)
    return out


# ------------------------------------------------------------------------------------------ report


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def build_table(ck: dict, up: dict, agg: dict) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def row(metric: str, ours: float | None, base: float | None, baseline: str) -> None:
        rows.append(
            {
                "metric": metric,
                "facefl": ours,
                "baseline": base,
                "ratio": ratio(ours, base),
                "baseline_is": baseline,
            }
        )

    b = ck["baseline"]
    for key, label in (
        ("facefl_new_assignment", "check-in, new assignment"),
        ("facefl_rotate_token", "check-in, token rotation"),
        ("facefl_register_device", "device registration"),
    ):
        s = ck[key]
        row(f"{label}: req/s", s["req_per_s"], b["req_per_s"], "bare /checkin")
        row(f"{label}: p50 ms", s["p50_ms"], b["p50_ms"], "bare /checkin")
        row(f"{label}: p99 ms", s["p99_ms"], b["p99_ms"], "bare /checkin")
        row(
            f"{label}: server CPU ms/req",
            s["server_cpu_ms_per_req"],
            b["server_cpu_ms_per_req"],
            "bare /checkin",
        )
    mb = up["payload_bytes"] / 1e6
    f, bf, bn = up["facefl"], up["baseline_fsync"], up["baseline_no_fsync"]
    row(f"upload {mb:.2f} MB: uploads/s", f["req_per_s"], bf["req_per_s"], "bare stream+fsync")
    row(f"upload {mb:.2f} MB: uploads/s", f["req_per_s"], bn["req_per_s"], "bare stream, no fsync")
    row(f"upload {mb:.2f} MB: p50 ms", f["p50_ms"], bf["p50_ms"], "bare stream+fsync")
    row(f"upload {mb:.2f} MB: p99 ms", f["p99_ms"], bf["p99_ms"], "bare stream+fsync")
    row(
        f"upload {mb:.2f} MB: server CPU ms/req",
        f["server_cpu_ms_per_req"],
        bf["server_cpu_ms_per_req"],
        "bare stream+fsync",
    )
    floor = agg["numpy_add_floor"]["gb_per_s"]
    k = agg["updates"]
    row(
        f"FedAvg mean from blob files (K={k}): GB/s",
        agg["weighted_mean_files"]["gb_per_s"],
        floor,
        "numpy.add in place",
    )
    row(
        f"FedAvg WeightedMean in memory (K={k}): GB/s",
        agg["weighted_mean_memory"]["gb_per_s"],
        floor,
        "numpy.add in place",
    )
    row(f"codec.load_file only (K={k}): GB/s", agg["load_file_only"]["gb_per_s"], floor, "numpy.add in place")
    ra = up["round_aggregation"]
    row(
        f"server round aggregation e2e (K={ra['reports']}): GB/s",
        ra["end_to_end_gb_per_s"],
        floor,
        "numpy.add in place",
    )
    floor_s = ra["reports"] * ra["update_bytes"] / floor / 1e9
    row(
        f"server round aggregation e2e (K={ra['reports']}): s",
        ra["end_to_end_s"],
        floor_s,
        "numpy.add, same bytes",
    )
    row(
        f"server-reported aggregation_s (K={ra['reports']}): s",
        ra["server_aggregation_s"],
        floor_s,
        "numpy.add, same bytes",
    )
    return rows


def fmt(x: float | None) -> str:
    if x is None or x != x:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}" if abs(x) < 1 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def render_table(rows: list[dict[str, Any]]) -> str:
    head = ("metric", "facefl", "baseline", "ratio (facefl/baseline)", "baseline is")
    cells = [head] + [
        (
            r["metric"],
            fmt(r["facefl"]),
            fmt(r["baseline"]),
            "-" if r["ratio"] is None else f"{r['ratio']:.3f}x",
            r["baseline_is"],
        )
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = []
    for j, c in enumerate(cells):
        lines.append(
            " | ".join(
                s.ljust(w) if i in (0, 4) else s.rjust(w)
                for i, (s, w) in enumerate(zip(c, widths, strict=True))
            )
        )
        if j == 0:
            lines.append("-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def git_commit() -> str | None:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or None
    return None


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="small counts (< 60 s), as used by the test")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    p.add_argument(
        "--db", default=None, help="database URL for the facefl server (default: SQLite in a temp dir)"
    )
    p.add_argument("--no-fresh-db", action="store_true", help="use the --db PostgreSQL database as is")
    p.add_argument("--workdir", type=Path, default=None, help="parent of the temporary directory")
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for both servers, e.g. OPENBLAS_NUM_THREADS=1 (repeatable)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    extra_env = dict(kv.split("=", 1) for kv in args.server_env)
    sizes = QUICK if args.quick else FULL
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    # SIGTERM -> SystemExit, so that the finally blocks stop the servers
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    servers: list[ServerProcess] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="facefl-bench-", dir=args.workdir)))
        db_url = args.db or f"sqlite:///{tmp / 'facefl.db'}"
        backend = "sqlite" if db_url.startswith("sqlite") else db_url.split(":", 1)[0]
        if args.db and backend.startswith("postgres") and not args.no_fresh_db:
            db_url = stack.enter_context(fresh_postgres(args.db))
        stack.callback(lambda: [s.stop() for s in reversed(servers)])
        try:
            bare = ServerProcess(
                "bare",
                tmp / "bare",
                app="_bare_app:create_app",
                app_dir=REPO / "benchmarks",
                health_path="/health",
                extra_env={"FACEFL_BENCH_UPLOAD_DIR": str(tmp / "bare-uploads"), **extra_env},
            )
            servers.append(bare)
            log(f"starting servers (facefl on {backend})")
            bare.start()
            facefl = ServerProcess(
                "facefl",
                tmp / "facefl",
                database_url=db_url,
                admin_token=ADMIN,
                enrollment_secret=SECRET,
                min_retry_after_s=1.0,
                extra_env={"FACEFL_DEV_MODE": "0", **extra_env},
            )
            servers.append(facefl)
            facefl.start()
            native = {s.name: s.native_modules() for s in servers}
            ck = bench_checkin(facefl, bare, sizes, log)
            up, base = bench_upload(facefl, bare, sizes, log)
            agg = bench_aggregation(base, sizes, tmp, log)
        except BaseException:
            for s in servers:
                tail = s.log_tail()
                if tail.strip():
                    print(f"--- {s.name} server log (tail) ---\n{tail}", file=sys.stderr)
            raise

    table = build_table(ck, up, agg)
    result = {
        "meta": {
            "mode": "quick" if args.quick else "full",
            "sizes": sizes.__dict__,
            "database": backend,
            "fresh_database": bool(args.db) and backend.startswith("postgres") and not args.no_fresh_db,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "uvicorn": f"--factory --workers 1 --log-level warning {' '.join(uvicorn_options())} "
            "(same for both servers)",
            "native_modules_loaded": native,
            "server_env": extra_env,
            "client": "threads, one keep-alive http.client connection each",
            "wall_s": time.perf_counter() - t_start,
        },
        "checkin": ck,
        "upload": up,
        "aggregation": agg,
        "table": table,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"facefl server throughput ({result['meta']['mode']}, database {backend}, {os.cpu_count()} CPUs)")
    print(render_table(table))
    print(f"\nwrote {args.json} in {result['meta']['wall_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
