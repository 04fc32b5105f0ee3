"""The trivial FedAvg task through facefl: a real server, real HTTP, a real database, device SDK clients.

Each client "trains" by returning small noise as its delta (no real training), so what is measured is the
federated round machinery: check-in, model download, upload (validated, written, committed before 202),
round closing and streaming aggregation. ``run_facefl`` starts a server (``facefl serve --workers N`` on
the given database), creates a task with a round target of every client, registers the clients, then
runs ``warmup + rounds`` rounds with ``procs`` client processes of ``threads`` threads each (every thread
drives its share of the devices one after the other, through one ``device_sdk.FederatedClient`` each,
with its own token; the clients of a process share one connection pool, ``device_sdk.SharedTransport``,
as the simulator's workers do: a pool per device would cost an SSL context each and a new connection per
device and round).

Timing: start-up = from launching the server until the warm-up round has aggregated (server start,
migrations, registration, client processes, first connections); the timed rounds run from there until
the last round has aggregated; updates/s = clients x timed rounds / that time.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import multiprocessing
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from device_sdk import AdminClient
from simulator.server import LocalServer

ADMIN = "bench-admin-token-0123456789"
SECRET = "bench-enrollment-secret-0123456789"


class ServeProcess(LocalServer):
    """``python -m facefl serve --workers N`` (the documented way to run several workers)."""

    def __init__(self, work_dir: Path, workers: int, **kwargs: Any) -> None:
        super().__init__(work_dir, startup_timeout_s=120.0, **kwargs)
        self.workers = workers

    def _spawn(self, env: dict[str, str]) -> None:
        import subprocess

        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "facefl", "serve", "--host", self.host, "--port", str(self.port),
               "--workers", str(self.workers), "--log-level", "warning"]  # fmt: skip
        self._proc = subprocess.Popen(
            cmd, env=env, stdout=self._log_file, stderr=subprocess.STDOUT, cwd=self.work_dir
        )


@dataclass
class FaceflRun:
    clients: int
    rounds: int
    workers: int
    database: str
    floats_per_update: int
    startup_s: float
    timed_s: float
    updates_per_s: float
    round_s: list[float]
    server_cpu_s: float | None
    client_errors: list[str] = field(default_factory=list)
    # CPU seconds of the client processes over the timed rounds (from the moment each saw the first timed
    # round open until its last upload): they run on the same cores as the server
    client_cpu_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _client_process(
    base_url: str,
    tokens: list[str],
    task_id: int,
    rounds: int,
    threads: int,
    seed: int,
    out: Any,
    warmup: int = 1,
) -> None:
    """Drive ``tokens`` (one device each) through ``rounds`` rounds; put (updates, errors, CPU seconds
    after the warm-up rounds) on ``out``."""
    from device_sdk import Assignment, FederatedClient, SharedTransport

    pool = SharedTransport()  # one connection pool for the process's devices
    cpu_at_timed: list[float] = []

    done = [0] * threads
    errors: list[str] = []
    # Pace steering tells a device that has taken part to come back at the round's deadline (up to a
    # minute); a benchmark client instead waits until the next round is open (one watcher per process
    # polls the task), as Flower's clients are sent work as soon as the server has it.
    opened = threading.Condition()
    current = [0]
    stop = threading.Event()

    def watch() -> None:
        with FederatedClient(
            base_url, token=tokens[0], timeout=60.0, max_retries=5, transport=pool
        ) as reader:
            while not stop.is_set():
                info = reader.get_task(task_id)
                number = (
                    info.current_round.number
                    if info.current_round and info.current_round.status == "open"
                    else 0
                )
                with opened:
                    if number > warmup and not cpu_at_timed:
                        cpu_at_timed.append(time.process_time())
                    if number != current[0]:
                        current[0] = number
                        opened.notify_all()
                # one watcher per client process; polling faster than ~4/s costs the server more CPU
                # (a task read per poll) than it saves in round start latency
                time.sleep(0.25)

    def wait_open(round_number: int) -> None:
        with opened:
            opened.wait_for(lambda: current[0] >= round_number)

    threading.Thread(target=watch, daemon=True).start()
    template: dict[str, np.ndarray] | None = None
    lock = threading.Lock()

    def thread_main(t: int) -> None:
        nonlocal template
        rng = np.random.default_rng(seed * 1000 + t)
        mine = tokens[t::threads]
        clients = [
            FederatedClient(base_url, token=tok, timeout=120.0, max_retries=5, transport=pool) for tok in mine
        ]
        last_round = [0] * len(mine)
        try:
            for r in range(1, rounds + 1):
                wait_open(r)
                for i, client in enumerate(clients):
                    while True:
                        answer = client.checkin(task_id)
                        if isinstance(answer, Assignment) and answer.round_number > last_round[i]:
                            break
                        time.sleep(0.05)
                    last_round[i] = answer.round_number
                    base = client.download_model(answer.base_version)
                    with lock:
                        if template is None:  # noise shared by the process; one offset per update below
                            template = {k: (rng.standard_normal(v.shape) * 1e-3).astype(np.float32)
                                        for k, v in base.items()}  # fmt: skip
                    delta = dict(template)
                    first = next(iter(delta))
                    delta[first] = template[first] + np.float32(rng.standard_normal() * 1e-6)  # distinct
                    client.upload_update(answer, delta, num_samples=1)
                    done[t] += 1
        except Exception as exc:  # reported to the parent, which fails the run
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            for c in clients:
                c.close()

    workers = [threading.Thread(target=thread_main, args=(t,), daemon=True) for t in range(threads)]
    for th in workers:
        th.start()
    for th in workers:
        th.join()
    cpu_end = time.process_time()
    stop.set()
    pool.close_pool()
    out.put((sum(done), errors, cpu_end - cpu_at_timed[0] if cpu_at_timed else None))


def _register(base_url: str, count: int, concurrency: int = 16) -> list[str]:
    tokens: list[str] = []
    lock = threading.Lock()
    body = {
        "enrollment_secret": SECRET,
        "name": None,
        "capabilities": {"accelerator": "cpu", "num_samples": 1},
    }

    def work(n: int) -> None:
        with httpx.Client(base_url=base_url, timeout=60) as http:
            for _ in range(n):
                resp = http.post("/v1/devices", json=body)
                resp.raise_for_status()
                with lock:
                    tokens.append(resp.json()["token"])

    per = [count // concurrency + (1 if i < count % concurrency else 0) for i in range(concurrency)]
    threads = [threading.Thread(target=work, args=(n,)) for n in per if n]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if len(tokens) != count:
        raise RuntimeError(f"registered {len(tokens)} of {count} devices")
    return tokens


def run_facefl(
    work_dir: Path,
    *,
    clients: int,
    rounds: int,
    warmup: int = 1,
    workers: int = 1,
    database_url: str | None = None,
    procs: int = 2,
    threads: int = 16,
    embedding_dim: int = 20,
    architecture: str = "tiny",
    log: Any = print,
) -> FaceflRun:
    """One run of the trivial task (see the module docstring); raises ServerStartError if serve refuses."""
    from benchmarks.server_throughput import process_cpu_s

    t0 = time.perf_counter()
    server = ServeProcess(
        work_dir, workers, database_url=database_url, admin_token=ADMIN, enrollment_secret=SECRET,
        min_retry_after_s=0.05, extra_env={"FACEFL_DEV_MODE": "0"},
    )  # fmt: skip
    with contextlib.ExitStack() as stack:
        server.start()
        stack.callback(server.stop)
        admin = stack.enter_context(AdminClient(server.base_url, ADMIN, timeout=120))
        task = admin.create_task(
            "trivial-fedavg", algorithm="fedavg", architecture=architecture, embedding_dim=embedding_dim,
            rounds=warmup + rounds,
            policy={"target_reports": clients, "over_selection": 1.0, "min_reports": clients,
                    "round_timeout_s": 3600.0},
        )  # fmt: skip
        assert task.current_version is not None
        weights = admin.download_model(task.current_version)
        floats = sum(int(v.size) for v in weights.values())
        log(f"facefl: registering {clients} devices (workers={workers}, {server.database_url.split(':')[0]})")
        tokens = _register(server.base_url, clients)
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        shares = [tokens[p::procs] for p in range(procs)]
        children = [
            ctx.Process(
                target=_client_process,
                args=(server.base_url, share, task.id, warmup + rounds, threads, p, out, warmup),
                daemon=True,
            )
            for p, share in enumerate(shares)
        ]
        for ch in children:
            ch.start()
        stack.callback(lambda: [ch.kill() for ch in children if ch.is_alive()])
        # watch the task: the time at which each round aggregated
        aggregated_at: list[float] = []
        reports: list[tuple[int, list[str], float | None]] = []  # (updates, errors, CPU s) per child
        cpu_at_warm: float | None = None
        deadline = time.monotonic() + 3600
        while len(aggregated_at) < warmup + rounds:
            task_now = admin.get_task(task.id)
            while len(aggregated_at) < task_now.aggregated_rounds:
                aggregated_at.append(time.perf_counter())
                log(f"facefl: round {len(aggregated_at)} aggregated at {aggregated_at[-1] - t0:.1f} s")
                if len(aggregated_at) == warmup and server.pid is not None:
                    cpu_at_warm = _tree_cpu_s(server.pid, process_cpu_s)
            if any(not ch.is_alive() for ch in children) and not out.empty():
                reports.append(out.get())
                if reports[-1][1]:
                    raise RuntimeError(f"client errors: {reports[-1][1][:3]}")
            if time.monotonic() > deadline:
                raise RuntimeError("the trivial task did not finish in an hour")
            time.sleep(0.02)
        cpu_end = _tree_cpu_s(server.pid, process_cpu_s) if server.pid is not None else None
        for ch in children:
            ch.join(timeout=60)
        while len(reports) < len(children):
            try:
                reports.append(out.get(timeout=10))
            except queue.Empty:
                break
    errors = [e for _done, errs, _cpu in reports for e in errs]
    client_cpus = [cpu for _done, _errs, cpu in reports]
    client_cpu = (
        float(sum(c for c in client_cpus if c is not None))
        if len(client_cpus) == len(children) and None not in client_cpus
        else None
    )
    start = aggregated_at[warmup - 1]
    timed = aggregated_at[-1] - start
    edges = aggregated_at[warmup - 1 :]
    return FaceflRun(
        clients=clients, rounds=rounds, workers=workers,
        database=(database_url or "sqlite").split(":")[0], floats_per_update=floats,
        startup_s=start - t0, timed_s=timed, updates_per_s=clients * rounds / timed,
        round_s=[b - a for a, b in itertools.pairwise(edges)],
        server_cpu_s=None if cpu_at_warm is None or cpu_end is None else cpu_end - cpu_at_warm,
        client_errors=errors, client_cpu_s=client_cpu,
    )  # fmt: skip


def _tree_cpu_s(pid: int, cpu: Any) -> float | None:
    """CPU seconds of a process and its children (uvicorn workers), from /proc."""
    total = cpu(pid)
    if total is None:
        return None
    with contextlib.suppress(OSError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            total += _tree_cpu_s(int(child), cpu) or 0.0
    return float(total)


if __name__ == "__main__":  # quick manual check: python -m benchmarks._trivial_fedavg 100
    import tempfile

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(run_facefl(Path(tmp), clients=n, rounds=3).to_json(), indent=2))
