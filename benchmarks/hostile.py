"""A hostile run against a real facefl server: bounded memory, descriptors and staging, and no 5xx.

    python benchmarks/hostile.py [--db postgresql://...] [--json PATH] [--quick]

Starts ``uvicorn server_api.app:create_app`` on 127.0.0.1 (SQLite in a temporary directory, or a fresh
database created on the ``--db`` server and dropped afterwards), then, phase by phase:

- ``json_oversized``: 4 concurrent 100 MB ``POST /v1/devices`` bodies (2 with Content-Length, 2 chunked);
- ``upload_oversized``: 2 uploads that declare more than FACEFL_MAX_UPLOAD_BYTES;
- ``upload_garbage``: 6 concurrent 128 MB garbage bodies on one assignment;
- ``stalled``: 100 uploads (one assignment each) trickling 100 B/s, until the server ends them (the
  body deadline is shortened to 20 s and the upload cap raised to 128 for this run, so that 408, not
  503, ends them and any 5xx is a failure);
- ``crafted``: safetensors headers (shape 2^70, nested 5,000 deep, F64, huge header length),
  X-Metrics (nested 2,000, 10^400), NUL in device and task names, metadata embedding_dim "²",
  num_samples " 5";
- ``registration_flood``: 1,500 registrations with the enrollment secret from 16 threads.

The server process's RSS is sampled every 20 ms (``/proc/PID/status``; psutil is not needed) and its
peak per phase reported with its open descriptors and staging files; status codes are counted per phase
("closed" = the server answered and closed before the client finished sending, or ended the connection).
Any 5xx makes the exit status 1. Every loop is bounded in count and time; only 127.0.0.1 is used.
Memory and speed are measured here, never asserted in the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import select
import socket
import struct
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from facefl import codec  # noqa: E402
from simulator.server import LocalServer  # noqa: E402

ADMIN = "hostile-admin-token"
SECRET = "hostile-enrollment-secret"
MB = 1024 * 1024


# --- the server process: RSS, descriptors, staging ---------------------------------------------


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class Watch:
    """Samples the server's RSS, open descriptors and staging files in a thread; peaks per phase."""

    def __init__(self, pid: int, staging: Path) -> None:
        self.pid = pid
        self.staging = staging
        self.peak_rss = self.peak_fds = self.peak_staged = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss_mb(self) -> float:
        return _status_kb(self.pid, "VmRSS") / 1024

    def _sample(self) -> None:
        with contextlib.suppress(OSError):
            self.peak_rss = max(self.peak_rss, _status_kb(self.pid, "VmRSS"))
            self.peak_fds = max(self.peak_fds, len(list(Path(f"/proc/{self.pid}/fd").iterdir())))
            self.peak_staged = max(self.peak_staged, len(list(self.staging.rglob("*.part"))))

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._sample()

    def reset(self) -> None:
        self._sample()
        self.peak_rss = _status_kb(self.pid, "VmRSS")
        self.peak_fds = len(list(Path(f"/proc/{self.pid}/fd").iterdir()))
        self.peak_staged = len(list(self.staging.rglob("*.part")))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# --- raw HTTP: a client that may stop sending, or be cut off ------------------------------------


def raw_request(
    port: int,
    head: str,
    body: Iterator[bytes],
    *,
    time_limit: float,
    source: str = "127.0.0.1",
) -> str:
    """Send ``head`` then the chunks of ``body``, watching for an early answer; the status or "closed"."""
    deadline = time.monotonic() + time_limit
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as sock:
        try:
            sock.sendall(head.encode())
            for chunk in body:
                if select.select([sock], [], [], 0)[0] or time.monotonic() > deadline:
                    break  # the server answered (or we give up): stop sending
                sock.sendall(chunk)
        except OSError:
            pass  # the server closed while we were sending; its answer may still be readable
        return _read_status(sock, max(1.0, deadline - time.monotonic()))


def _read_status(sock: socket.socket, timeout: float) -> str:
    sock.settimeout(timeout)
    try:
        data = sock.recv(4096)
    except OSError:
        return "closed"
    if not data.startswith(b"HTTP/1.1 "):
        return "closed"
    return data.split()[1].decode()


def _head(method: str, path: str, headers: dict[str, str]) -> str:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return "\r\n".join(lines) + "\r\n\r\n"


def _repeat(chunk: bytes, total: int) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        piece = chunk[: total - sent]
        sent += len(piece)
        yield piece


def _chunked(chunk: bytes, total: int) -> Iterator[bytes]:
    for piece in _repeat(chunk, total):
        yield f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    yield b"0\r\n\r\n"


def _trickle(rate_bps: int, total: int, time_limit: float) -> Iterator[bytes]:
    """``rate_bps`` bytes per second, 10 pieces a second, for at most ``time_limit`` seconds."""
    end = time.monotonic() + time_limit
    piece = b"\0" * max(1, rate_bps // 10)
    sent = 0
    while sent < total and time.monotonic() < end:
        yield piece
        sent += len(piece)
        time.sleep(0.1)


# --- the run ------------------------------------------------------------------------------------


class Run:
    def __init__(self, server: LocalServer, quick: bool) -> None:
        assert server.port is not None and server.pid is not None
        self.server = server
        self.port = server.port
        self.quick = quick
        self.http = httpx.Client(base_url=server.base_url, timeout=60)
        self.admin = {"Authorization": f"Bearer {ADMIN}"}
        self.watch = Watch(server.pid, server.data_dir / "blobs" / "staging")
        self.rows: list[dict[str, Any]] = []
        self._source = 0

    def source(self) -> str:
        """A fresh loopback source address (127.0.0.0/8 is all local): setup is not the flood."""
        self._source += 1
        return f"127.0.{10 + self._source // 200}.{1 + self._source % 200}"

    def device(self) -> dict[str, str]:
        transport = httpx.HTTPTransport(local_address=self.source())
        with httpx.Client(base_url=self.server.base_url, transport=transport, timeout=30) as c:
            for _ in range(50):  # bounded: the global bucket may make setup wait a little
                r = c.post("/v1/devices", json={"enrollment_secret": SECRET})
                if r.status_code == 201:
                    return {"Authorization": f"Bearer {r.json()['token']}"}
                assert r.status_code == 429, r.text
                time.sleep(float(r.headers.get("Retry-After", "1")))
        raise RuntimeError("could not register a setup device")

    def assignment(self, dev: dict[str, str]) -> dict[str, Any]:
        r = self.http.post("/v1/checkin", json={}, headers=dev)
        assert r.status_code == 200 and r.json()["action"] == "train", r.text
        return dict(r.json()["assignment"])

    def upload_head(self, dev: dict[str, str], a: dict[str, Any], length: int | None, **extra: str) -> str:
        headers = {**dev, "X-Upload-Token": a["upload_token"], "Content-Type": "application/octet-stream"}
        headers["Content-Length" if length is not None else "Transfer-Encoding"] = (
            str(length) if length is not None else "chunked"
        )
        return _head(
            "POST",
            f"/v1/rounds/{a['round_id']}/updates?{extra.pop('query', 'num_samples=5')}",
            {**headers, **extra},
        )

    def phase(self, name: str, description: str, jobs: list[Callable[[], str]], threads: int) -> None:
        self.watch.reset()
        before = self.watch.rss_mb()
        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=threads) as pool:
            codes = Counter(f.result() for f in [pool.submit(j) for j in jobs])
        took = time.monotonic() - start
        time.sleep(0.3)
        self.watch._sample()
        row = {
            "phase": name,
            "what": description,
            "requests": len(jobs),
            "codes": dict(sorted(codes.items())),
            "rss_before_mb": round(before, 1),
            "rss_peak_mb": round(self.watch.peak_rss / 1024, 1),
            "rss_after_mb": round(self.watch.rss_mb(), 1),
            "peak_fds": self.watch.peak_fds,
            "peak_staged_files": self.watch.peak_staged,
            "staged_after": len(list(self.watch.staging.rglob("*.part"))),
            "seconds": round(took, 1),
        }
        self.rows.append(row)
        print(f"  {name}: {row['codes']} peak RSS {row['rss_peak_mb']} MB, {took:.1f} s", flush=True)

    # the phases

    def json_oversized(self) -> None:
        size = (10 if self.quick else 100) * MB
        chunk = b" " * MB
        head_len = _head(
            "POST", "/v1/devices", {"Content-Type": "application/json", "Content-Length": str(size)}
        )
        head_chunked = _head(
            "POST", "/v1/devices", {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
        )
        jobs: list[Callable[[], str]] = [
            lambda: raw_request(self.port, head_len, _repeat(chunk, size), time_limit=60),
            lambda: raw_request(self.port, head_len, _repeat(chunk, size), time_limit=60),
            lambda: raw_request(self.port, head_chunked, _chunked(chunk, size), time_limit=60),
            lambda: raw_request(self.port, head_chunked, _chunked(chunk, size), time_limit=60),
        ]
        self.phase("json_oversized", f"4 concurrent {size // MB} MB POST /v1/devices", jobs, 4)

    def upload_oversized(self, dev: dict[str, str], a: dict[str, Any]) -> None:
        size = 300 * MB  # above the 256 MiB default
        head = self.upload_head(dev, a, size)
        jobs = [lambda: raw_request(self.port, head, _repeat(b"\0" * MB, size), time_limit=60)] * 2
        self.phase("upload_oversized", "2 uploads declaring 300 MB (limit 256 MiB)", jobs, 2)

    def upload_garbage(self, dev: dict[str, str], a: dict[str, Any]) -> None:
        size = (16 if self.quick else 128) * MB
        garbage = np.random.default_rng(0).integers(0, 256, MB, dtype=np.uint8).tobytes()
        head = self.upload_head(dev, a, size)
        jobs = [lambda: raw_request(self.port, head, _repeat(garbage, size), time_limit=120)] * 6
        self.phase("upload_garbage", f"6 concurrent {size // MB} MB garbage uploads, one assignment", jobs, 6)

    def stalled(self, pairs: list[tuple[dict[str, str], dict[str, Any]]], limit_s: float) -> None:
        jobs = [
            (
                lambda d=d, a=a: raw_request(
                    self.port,
                    self.upload_head(d, a, 10 * MB),
                    _trickle(100, 10 * MB, limit_s),
                    time_limit=limit_s + 30,
                )
            )
            for d, a in pairs
        ]
        self.phase("stalled", f"{len(pairs)} uploads trickling 100 B/s", jobs, len(pairs))

    def crafted(self, dev: dict[str, str], a: dict[str, Any]) -> None:
        base = codec.decode(self.http.get(f"/v1/models/{a['base_version']}", headers=self.admin).content)
        name = next(iter(base))

        def raw_header(text: str, body: bytes = b"") -> bytes:
            return struct.pack("<Q", len(text)) + text.encode() + body

        payloads = {
            "shape_2_70": raw_header(
                json.dumps({name: {"dtype": "F32", "shape": [2**70], "data_offsets": [0, 4]}}), b"\0" * 4
            ),
            "nested_5000": raw_header("[" * 5000 + "]" * 5000),
            "f64": codec.encode({k: np.zeros(v.shape, np.float64) for k, v in base.items()}),
            "huge_header_len": struct.pack("<Q", 2**63) + b"{}",
        }
        good = codec.encode({k: np.zeros_like(v) for k, v in base.items()})
        metrics = ["[" * 2000 + "]" * 2000, '{"loss": 1' + "0" * 400 + "}"]

        def upload(body: bytes, **extra: str) -> str:
            return raw_request(
                self.port, self.upload_head(dev, a, len(body), **extra), iter([body]), time_limit=30
            )

        model = codec.encode(
            {k: np.zeros(v.shape, np.float32) for k, v in base.items()},
            metadata={"architecture": "small", "embedding_dim": "²"},
        )
        jobs: list[Callable[[], str]] = [lambda b=b: upload(b) for b in payloads.values()]
        jobs += [lambda m=m: upload(good, **{"X-Metrics": m}) for m in metrics]
        jobs.append(lambda: upload(good, query="num_samples=%205"))
        jobs.append(lambda: str(self.http.post("/v1/models", content=model, headers=self.admin).status_code))
        jobs.append(
            lambda: str(
                self.http.post(
                    "/v1/devices", json={"enrollment_secret": SECRET, "name": "a\u0000b"}
                ).status_code
            )
        )
        jobs.append(
            lambda: str(self.http.post("/v1/tasks", json={"name": "t\u0000"}, headers=self.admin).status_code)
        )
        self.phase("crafted", "crafted headers, metrics, names, metadata, num_samples", jobs, 1)

    def registration_flood(self) -> None:
        n = 300 if self.quick else 1500
        end = time.monotonic() + 60

        def one() -> str:
            if time.monotonic() > end:
                return "not sent"
            r = self.http.post("/v1/devices", json={"enrollment_secret": SECRET})
            return str(r.status_code)

        self.phase("registration_flood", f"{n} registrations, 16 threads, one address", [one] * n, 16)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", help="PostgreSQL server URL: a fresh database is created there and dropped")
    p.add_argument("--json", default=str(ROOT / "benchmarks/results/hostile.json"))
    p.add_argument("--quick", action="store_true", help="smaller bodies, counts and timeouts (< 1 min)")
    p.add_argument("--stalled", type=int, default=100, help="stalled uploads (100)")
    args = p.parse_args(argv)

    with contextlib.ExitStack() as stack:
        url = None
        if args.db:
            from server_api.db import scratch_database

            url = stack.enter_context(scratch_database(args.db, "facefl_hostile"))
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="facefl-hostile-")))
        idle_s, deadline_s = (2.0, 6.0) if args.quick else (5.0, 20.0)
        env = {
            # the defaults of every limit, except the body timeouts (shortened so that the run ends)
            "FACEFL_DEV_MODE": "0",
            "FACEFL_BODY_IDLE_TIMEOUT_S": str(idle_s),
            "FACEFL_BODY_DEADLINE_S": str(deadline_s),
            # room for every stalled upload, so that the body timeouts (not the 503 cap, which
            # tests/server_api/test_limits.py covers) end them: any 5xx is then a failure
            "FACEFL_MAX_CONCURRENT_UPLOADS": "128",
            "FACEFL_REGISTER_RATE_PER_S": "1",
            "FACEFL_REGISTER_GLOBAL_RATE_PER_S": "10",
            "FACEFL_LOG_LEVEL": "WARNING",
        }
        server = LocalServer(
            tmp / "server", database_url=url, admin_token=ADMIN, enrollment_secret=SECRET, extra_env=env
        )
        stack.enter_context(server)
        run = Run(server, args.quick)
        stack.callback(run.watch.close)
        stack.callback(run.http.close)
        print(f"server {server.base_url} ({'PostgreSQL' if url else 'SQLite'}), pid {server.pid}", flush=True)

        task = {"name": "hostile", "architecture": "small", "embedding_dim": 128, "rounds": 1}
        task["policy"] = {
            "target_reports": 10_000,
            "min_reports": 1,
            "over_selection": 1.0,
            "round_timeout_s": 3600,
        }
        r = run.http.post("/v1/tasks", json=task, headers=run.admin)
        assert r.status_code == 201, r.text
        n_stalled = 20 if args.quick else args.stalled
        pairs = [(d, run.assignment(d)) for d in (run.device() for _ in range(n_stalled + 3))]
        rss_start = run.watch.rss_mb()
        print(f"setup done: {len(pairs)} devices with assignments, RSS {rss_start:.1f} MB", flush=True)

        run.json_oversized()
        run.upload_oversized(*pairs[0])
        run.upload_garbage(*pairs[1])
        run.stalled(pairs[3:], deadline_s + 10)
        run.crafted(*pairs[2])
        time.sleep(1.0)  # let the registration buckets refill a little: the flood starts from a full one
        run.registration_flood()
        health = run.http.get("/v1/health").status_code
        peak_total = _status_kb(run.watch.pid, "VmHWM") / 1024
        rss_end = run.watch.rss_mb()

    server_errors = sum(n for row in run.rows for code, n in row["codes"].items() if code.startswith("5"))
    result = {
        "database": "postgresql" if args.db else "sqlite",
        "quick": args.quick,
        "limits": {
            "body_idle_timeout_s": idle_s,
            "body_deadline_s": deadline_s,
            "max_concurrent_uploads": 128,
            "others": "defaults",
        },
        "rss_start_mb": round(rss_start, 1),
        "rss_end_mb": round(rss_end, 1),
        "rss_peak_whole_run_mb": round(peak_total, 1),
        "health_after": health,
        "server_errors": server_errors,
        "phases": run.rows,
    }
    _print_table(result)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 1 if server_errors or health != 200 else 0


def _print_table(result: dict[str, Any]) -> None:
    cols = [
        "phase",
        "requests",
        "codes",
        "rss_before_mb",
        "rss_peak_mb",
        "rss_after_mb",
        "peak_fds",
        "peak_staged_files",
        "staged_after",
        "seconds",
    ]
    rows = [
        [str(r[c]) if c != "codes" else " ".join(f"{k}:{v}" for k, v in r[c].items()) for c in cols]
        for r in result["phases"]
    ]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    print()
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
    print(
        f"\n{result['database']}: RSS {result['rss_start_mb']} MB after setup, "
        f"peak {result['rss_peak_whole_run_mb']} MB"
        f" (VmHWM, whole run), {result['rss_end_mb']} MB at the end; /v1/health {result['health_after']};"
        f" 5xx: {result['server_errors']}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
