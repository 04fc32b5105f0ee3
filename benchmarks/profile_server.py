#!/usr/bin/env python
"""Where the facefl server spends its CPU under the throughput benchmark's load (py-spy, sampling).

    python benchmarks/profile_server.py [--devices 400] [--uploads 12] [--top 25] [--out DIR]

Starts the facefl server (uvicorn, 1 worker, SQLite in a temporary directory, or with ``--db URL`` a fresh
database on that PostgreSQL server, dropped afterwards) as
benchmarks/server_throughput.py does, attaches ``py-spy record`` (``pip install py-spy``; it needs
ptrace rights) to it, and drives one phase at a time: check-ins that get a new assignment, check-ins
that rotate the upload token, then uploads of a real mobilefacenet delta. For each phase it prints the
functions with the most samples on their own (self) and under them (inclusive), and writes py-spy's
collapsed stacks to ``DIR/<phase>.txt`` (flamegraph input). Nothing is asserted: this is a diagnostic.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for entry in (REPO, REPO / "benchmarks"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

import server_throughput as bench  # noqa: E402


@contextlib.contextmanager
def sampled(pid: int, out: Path, rate: int) -> Iterator[None]:
    """py-spy samples ``pid`` (the thread holding the GIL) while the block runs."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    # --gil: only the thread holding the GIL is sampled, so the samples are where Python spends CPU
    # (threads waiting on a lock, a queue or the database are not counted)
    cmd = [exe, "record", "--pid", str(pid), "--rate", str(rate), "--gil", "--full-filenames"]
    cmd += ["--format", "raw", "-o", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # py-spy attaches
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _frame_name(frame: str) -> tuple[str, bool]:
    """``fn (path/to/file.py:123)`` -> (``fn (dir/file.py)``, whether it is this repository's code)."""
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rstrip(")")
    parts = Path(file).parts
    short = "/".join(parts[-2:]) if len(parts) >= 2 else file
    ours = file.startswith(str(REPO)) and "site-packages" not in file
    return f"{name} ({short})", ours


def top_entries(collapsed: Path, top: int) -> tuple[int, list[tuple[str, int]], list[tuple[str, int]]]:
    """(total samples, top self, top inclusive among this repository's functions) from py-spy's raw
    (collapsed) output; lines within a function are merged."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";") if "(" in f]
        if not frames:
            continue
        total += count
        own[frames[-1][0]] += count
        for name in {name for name, ours in frames if ours}:
            inclusive[name] += count
    return total, own.most_common(top), inclusive.most_common(top)


def report(phase: str, collapsed: Path, top: int) -> str:
    total, own, inclusive = top_entries(collapsed, top)
    lines = [f"## {phase}: {total} samples"]
    for title, rows in (("self", own), ("inclusive (facefl code)", inclusive)):
        lines.append(f"### top {len(rows)} by {title} samples")
        lines += [f"{100 * n / max(total, 1):5.1f}%  {name}" for name, n in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--devices", type=int, default=400, help="check-ins per phase")
    p.add_argument("--uploads", type=int, default=12)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", type=Path, default=None, help="folder for the collapsed stacks")
    p.add_argument("--db", default=None, help="a PostgreSQL server URL (default: SQLite in a temp dir)")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    reports: list[str] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="facefl-profile-")))
        db_url = stack.enter_context(bench.fresh_postgres(args.db)) if args.db else None
        out = args.out or tmp / "stacks"
        out.mkdir(parents=True, exist_ok=True)
        server = bench.ServerProcess(
            "facefl",
            tmp / "facefl",
            database_url=db_url,
            admin_token=bench.ADMIN,
            enrollment_secret=bench.SECRET,
            min_retry_after_s=1.0,
            extra_env={"FACEFL_DEV_MODE": "0"},
        )
        server.start()
        try:
            assert server.pid is not None
            run: Callable[[list[bench.Req]], bench.LoadResult] = lambda reqs: bench.run_load(  # noqa: E731
                server, reqs, args.concurrency
            )
            with bench.admin_client(server) as admin:
                task = admin.create_task(
                    "profile-checkin",
                    architecture="small",
                    rounds=1,
                    policy={"target_reports": 100_000, "over_selection": 1.0, "min_reports": 1,
                            "round_timeout_s": 86_400.0},
                )  # fmt: skip
            tokens, _ = bench.register_devices(server, args.devices, args.concurrency)
            warm, _ = bench.register_devices(server, 50, args.concurrency)
            run(bench.checkin_reqs(warm, task.id))
            for phase in ("checkin_new", "checkin_rotate"):
                log(f"{phase}: {args.devices} check-ins")
                with sampled(server.pid, out / f"{phase}.txt", args.rate):
                    result = run(bench.checkin_reqs(tokens, task.id))
                log(f"{phase}: {len(result.latencies_s) / result.seconds:.0f} req/s")
                reports.append(report(phase, out / f"{phase}.txt", args.top))

            n = args.uploads + 2
            with bench.admin_client(server) as admin:
                task = admin.create_task(
                    "profile-upload",
                    architecture="mobilefacenet",
                    rounds=1,
                    policy={"target_reports": n, "over_selection": 1.0, "min_reports": n,
                            "round_timeout_s": 86_400.0},
                )  # fmt: skip
                assert task.current_version is not None
                base = admin.download_model(task.current_version)
            up_tokens, _ = bench.register_devices(server, n, 4)
            assignments = bench.assignments_of(run(bench.checkin_reqs(up_tokens, task.id)))
            payloads = bench.make_deltas(base, n)
            reqs = bench.upload_reqs(up_tokens, assignments, payloads)
            bench.run_load(server, reqs[:2], 2)  # warm-up
            log(f"upload: {args.uploads} x {len(payloads[0]) / 1e6:.2f} MB (the last one aggregates)")
            with sampled(server.pid, out / "upload.txt", args.rate):
                result = bench.run_load(server, reqs[2:], 4)
                time.sleep(3.0)  # the round aggregates after the last 202
            log(f"upload: {len(result.latencies_s) / result.seconds:.1f} uploads/s")
            reports.append(report("upload (and the round's aggregation)", out / "upload.txt", args.top))
        finally:
            server.stop()
        print("\n\n".join(reports))
        if args.out is None:
            log("collapsed stacks were in a temporary folder (pass --out DIR to keep them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
