#!/usr/bin/env python
"""What secure aggregation costs: one round with and without it, per stage, through a real server.

    python benchmarks/secagg_cost.py [--devices 10 50 200] [--models tiny small] [--json PATH]

For each model and cohort size N, two tasks on one ``facefl`` server (uvicorn, SQLite, its default 1 s
tick, which is also the devices' poll interval under secure aggregation): a plain FedAvg round (each
device uploads its float32 delta) and a secure one (``policy.secure_aggregation``, default
``max_neighbours`` 32: complete graph up to 33 devices, a 32-regular one above). N SDK devices run as
threads of this process, all at once, with a trivial delta (small Gaussian values of the model's
trainable tensors: no training, so that only the protocol is measured). The server's limit of uploads
in flight is raised to 1000, so that no device is refused with 503 when all upload at once.

Per stage (checkin, keys, shares, masked, reveal, aggregate; plain: checkin, upload, aggregate):
wall time (from the previous stage's last device to this one's; aggregate: last request to the round
reported aggregated, measured by polling every 50 ms), the server process's CPU seconds (user+system
from /proc, sampled every 50 ms and interpolated) per device, and per device the bytes sent and received
and its thread's CPU time (mean and max). The masked stage's device CPU includes decrypting the
shares, expanding the pairwise and self masks (ChaCha20) and encoding the upload.

Markdown on stdout, JSON under benchmarks/results/. Speed is measured, not asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.server_throughput import git_commit  # noqa: E402
from device_sdk import AdminClient, FederatedClient  # noqa: E402
from facefl.devmode import DEV_ENROLLMENT_SECRET  # noqa: E402
from facefl.models import resolve_trainable, trainable_names  # noqa: E402
from simulator.server import LocalServer  # noqa: E402

DEFAULT_JSON = REPO / "benchmarks" / "results" / "secagg_cost.json"
CLIP_NORM = 10.0
SECURE_STAGES = ("checkin", "keys", "shares", "masked", "reveal", "aggregate")
PLAIN_STAGES = ("checkin", "upload", "aggregate")
# device_sdk's step names -> the stage a step's acceptance ends
_STEP_STAGE = {
    "secagg_keys": "keys",
    "secagg_shares": "shares",
    "secagg_upload": "masked",
    "secagg_reveal": "reveal",
}


class CpuSampler:
    """The server process's CPU seconds (utime + stime, /proc/PID/stat) every ``period_s``."""

    def __init__(self, pid: int, period_s: float = 0.05) -> None:
        self._path = Path(f"/proc/{pid}/stat")
        self._tick = os.sysconf("SC_CLK_TCK")
        self._period = period_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def read(self) -> float:
        fields = self._path.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self._tick  # utime, stime (fields 14, 15)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self.read()))
            self._stop.wait(self._period)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.perf_counter(), self.read()))

    def at(self, t: float) -> float:
        ts = np.array([s[0] for s in self.samples])
        cpu = np.array([s[1] for s in self.samples])
        return float(np.interp(t, ts, cpu))


@dataclass
class Mark:
    """Where one device was at the end of a stage."""

    t: float
    cpu_s: float
    sent: int
    received: int


@dataclass
class Device:
    index: int
    device_id: str
    token: str
    marks: dict[str, Mark] = field(default_factory=dict)
    error: str | None = None


def _mark(client: FederatedClient) -> Mark:
    s = client.stats
    return Mark(time.perf_counter(), time.thread_time(), s.bytes_sent, s.bytes_received)


def _delta(names_shapes: list[tuple[str, tuple[int, ...]]], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: (rng.standard_normal(shape) * 1e-3).astype(np.float32) for n, shape in names_shapes}


def run_round(
    server: LocalServer, admin: AdminClient, model: str, n: int, *, secure: bool, log: Callable[[str], None]
) -> dict[str, Any]:
    """One round of ``n`` devices on a new task; the per-stage figures."""
    policy: dict[str, Any] = {
        "target_reports": n,
        "over_selection": 1.0,
        "min_reports": max(2, n // 2),
        "round_timeout_s": 180,
        "max_sample_weight": 100,
        "update_norm_bound": "off",
    }
    if secure:
        policy["secure_aggregation"] = {"clip_norm": CLIP_NORM, "stage_timeout_s": 60}
    name = f"secagg-cost-{model}-{n}-{'secure' if secure else 'plain'}"
    task = admin.create_task(name, architecture=model, rounds=1, seed=0, policy=policy)
    version = admin.get_task(task.id).current_version
    assert version is not None
    base = admin.download_model(version)
    names = trainable_names(base, resolve_trainable(model, None))
    layout = [(k, tuple(base[k].shape)) for k in sorted(names)]
    floats = sum(int(np.prod(s)) for _, s in layout)
    devices: list[Device] = []
    with FederatedClient(server.base_url, timeout=60.0) as reg:
        for i in range(n):
            cr = reg.register(DEV_ENROLLMENT_SECRET, name=f"bench-{i}")
            devices.append(Device(i, cr.device_id, cr.token))
    deltas = [_delta(layout, seed=i) for i in range(n)]
    start = threading.Barrier(n + 1)

    def device(d: Device) -> None:
        try:
            with FederatedClient(server.base_url, token=d.token, device_id=d.device_id, timeout=120.0) as c:
                start.wait()
                d.marks["start"] = _mark(c)
                a = c.wait_for_assignment(task.id, timeout_s=300)
                d.marks["checkin"] = _mark(c)
                if secure:

                    def step(name: str, fn: Callable[[], Any]) -> Any:
                        answer = fn()
                        d.marks[_STEP_STAGE[name]] = _mark(c)
                        return answer

                    c.upload_secure(a, deltas[d.index], 10, step=step)
                else:
                    c.upload_update(a, deltas[d.index], 10)
                    d.marks["upload"] = _mark(c)
        except Exception as exc:  # reported in the row: a benchmark does not hide failures
            d.error = f"{type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=device, args=(d,), daemon=True) for d in devices]
    for t in threads:
        t.start()
    assert server.pid is not None
    with CpuSampler(server.pid) as cpu:
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join(600)
        errors = [d.error for d in devices if d.error]
        if errors:
            log(f"{len(errors)} device errors, first: {errors[0]}")
        rnd = admin.task_rounds(task.id)[0]
        done = admin.wait_for_round(rnd.id, timeout_s=120, poll_s=0.05)
        t_end = time.perf_counter()
    stages = SECURE_STAGES if secure else PLAIN_STAGES
    ends: dict[str, float] = {}
    previous = t0
    rows: dict[str, dict[str, float]] = {}
    for stage in stages:
        if stage == "aggregate":
            end = t_end
        else:
            end = max((d.marks[stage].t for d in devices if stage in d.marks), default=previous)
        ends[stage] = end
        row = {
            "wall_s": round(end - previous, 3),
            "server_cpu_ms_per_device": round(1000 * (cpu.at(end) - cpu.at(previous)) / n, 2),
        }
        if stage != "aggregate":
            before = "start" if stage == "checkin" else stages[stages.index(stage) - 1]
            got = [
                (d.marks[before], d.marks[stage]) for d in devices if before in d.marks and stage in d.marks
            ]
            if got:
                sent = [b.sent - a.sent for a, b in got]
                received = [b.received - a.received for a, b in got]
                dev_cpu = [b.cpu_s - a.cpu_s for a, b in got]
                row |= {
                    "devices": len(got),
                    "up_bytes_per_device": round(float(np.mean(sent))),
                    "down_bytes_per_device": round(float(np.mean(received))),
                    "device_cpu_ms_mean": round(1000 * float(np.mean(dev_cpu)), 2),
                    "device_cpu_ms_max": round(1000 * float(np.max(dev_cpu)), 2),
                }
        rows[stage] = row
        previous = end
    total_cpu = cpu.at(t_end) - cpu.at(t0)
    result = {
        "model": model,
        "floats": floats,
        "devices": n,
        "secure": secure,
        "neighbours": min(n - 1, 32) if secure else None,
        "status": done.status,
        "reports": done.reported,
        "round_wall_s": round(t_end - t0, 3),
        "server_cpu_s": round(total_cpu, 3),
        "server_cpu_ms_per_device": round(1000 * total_cpu / n, 2),
        "stages": rows,
        "errors": errors[:5],
    }
    log(
        f"{model} n={n} {'secure' if secure else 'plain'}: {done.status}, {result['round_wall_s']:.1f} s, "
        f"server {result['server_cpu_ms_per_device']:.1f} ms CPU/device"
        + (f", {len(errors)} device errors: {errors[0]}" if errors else "")
    )
    return result


def _table(results: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | N | mode | status | round s | server CPU ms/device | up KB/device | down KB/device "
        "| device CPU ms (masked stage) | stages: wall s / server CPU ms per device |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        stages = r["stages"]
        up = sum(s.get("up_bytes_per_device", 0) for s in stages.values()) / 1e3
        down = sum(s.get("down_bytes_per_device", 0) for s in stages.values()) / 1e3
        masked = stages.get("masked", {}).get("device_cpu_ms_mean")
        detail = ", ".join(
            f"{k} {s['wall_s']:.2f}/{s['server_cpu_ms_per_device']:.1f}" for k, s in stages.items()
        )
        lines.append(
            f"| {r['model']} ({r['floats']:,} floats) | {r['devices']} | "
            f"{'secure' if r['secure'] else 'plain'} | {r['status']} | {r['round_wall_s']:.2f} | "
            f"{r['server_cpu_ms_per_device']:.1f} | {up:.1f} | {down:.1f} | "
            f"{'-' if masked is None else f'{masked:.1f}'} | {detail} |"
        )
    return lines


@contextlib.contextmanager
def _profiled(pid: int, svg: Path) -> Iterator[None]:
    """``py-spy record`` of the server while the block runs: a flame graph in ``svg``, or collapsed
    stacks when its name ends in ``.txt``."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    cmd = [exe, "record", "--pid", str(pid), "--rate", "50", "-o", str(svg)]
    cmd += ["--format", "raw"] if svg.suffix == ".txt" else []
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attaches
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--devices", type=int, nargs="+", default=[10, 50, 200])
    p.add_argument(
        "--models", nargs="+", default=["tiny", "small"], choices=["tiny", "small", "mobilefacenet"]
    )
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    p.add_argument(
        "--py-spy",
        type=Path,
        default=None,
        metavar="SVG",
        help="profile the server (py-spy record) into SVG (collapsed stacks: a .txt name)",
    )
    args = p.parse_args(argv)
    if min(args.devices) < 2:
        p.error("--devices must be >= 2 (secure aggregation needs two reports)")
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    results: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="facefl-secagg-cost-"))
        # every device uploads at once: no 503 "busy" (the SDK does not retry a refused upload)
        server = stack.enter_context(LocalServer(tmp, extra_env={"FACEFL_MAX_CONCURRENT_UPLOADS": "1000"}))
        log(f"server {server.base_url} (pid {server.pid})")
        if args.py_spy is not None:
            assert server.pid is not None
            stack.enter_context(_profiled(server.pid, args.py_spy))
        admin = stack.enter_context(AdminClient(server.base_url, server.admin_token, timeout=120.0))
        for model in args.models:
            for n in args.devices:
                for secure in (False, True):
                    results.append(run_round(server, admin, model, n, secure=secure, log=log))
    result = {
        "meta": {
            "devices": args.devices, "models": args.models, "clip_norm": CLIP_NORM,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"), "git_commit": git_commit(),
            "python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "database": "sqlite", "tick_interval_s": 1.0,
            "py_spy_attached": args.py_spy is not None,
            "wall_s": round(time.perf_counter() - t_start, 1),
        },
        "rows": results,
    }  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"one round, plain FedAvg vs secure aggregation, devices as threads, {os.cpu_count()} CPUs")
    print("\n".join(_table(results)))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
