"""Drive N simulated devices (device_sdk in worker processes) against a real facefl server.

Per run: start a server (or use ``--server``), create a task through the SDK's admin client, register the
devices, then for each round dispatch one job per device (check in, train, upload) to a pool of worker
processes, wait until the server closes the round (aggregated or abandoned), and measure rank-1
identification of the new global model on held-out identities that no device holds.

The run's parts have modules of their own: :mod:`simulator.config` (options and their checks),
:mod:`simulator.plan` (data, task and devices), :mod:`simulator.worker` (one device's round) and
:mod:`simulator.report` (results, table and JSON); this module runs the rounds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
from tqdm import tqdm

from device_sdk import AdminClient, FaceflError, RoundInfo, Trainer, WaitTimeout
from facefl.devmode import DEV_ADMIN_TOKEN, DEV_ENROLLMENT_SECRET
from facefl.models import ARCHITECTURES

from .backends import make_backend
from .config import SimulationConfig, SimulationError
from .evaluation import rank1_identification
from .plan import HELDOUT_OFFSET, create_task, plan_data, register_devices
from .report import (
    RoundResult,
    SimulationResult,
    fault_counts,
    job_outcomes,
    mean_phases,
    peak_trainings,
    secagg_counts,
)
from .server import LocalServer
from .worker import (
    CORRUPT_REFUSED,
    DROPPED,
    FAILED,
    NOT_SELECTED,
    ROUND_CLOSED,
    UPLOADED,
    DeviceBatch,
    DeviceJob,
    JobResult,
    run_device_batch,
)

__all__ = [
    "HELDOUT_OFFSET",
    "RoundResult",
    "SimulationConfig",
    "SimulationError",
    "SimulationResult",
    "simulate",
]

# how long to wait for the server's evaluation of a new model version (it runs after aggregation)
EVAL_TIMEOUT_S = 600.0


def simulate(config: SimulationConfig, *, log: Callable[[str], None] | None = None) -> SimulationResult:
    """Run the simulation described by ``config`` against a real server; see the module docstring."""
    cfg = config.validate()
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    started = time.perf_counter()
    arch = ARCHITECTURES[cfg.model]
    admin_token = cfg.admin_token or os.environ.get("FACEFL_ADMIN_TOKEN") or DEV_ADMIN_TOKEN
    secret = cfg.enrollment_secret or os.environ.get("FACEFL_ENROLLMENT_SECRET") or DEV_ENROLLMENT_SECRET
    plan = plan_data(cfg, arch.image_size)  # before anything is created: bad data fails fast
    if len(plan.device_specs) < cfg.devices:
        left_out = cfg.devices - len(plan.device_specs)
        kept = len(plan.device_specs)
        if kept == 0:
            raise ValueError("no device holds two training images; lower --test-fraction or add images")
        say(f"left out {left_out} device(s) with fewer than two training images; {kept} devices take part")
        cfg = replace(
            cfg,
            devices=kept,
            target_reports=min(cfg.target_reports or kept, kept),
            min_reports=min(cfg.min_reports or 1, kept),
        )
    chance = 1.0 / plan.heldout.num_identities

    with contextlib.ExitStack() as stack:
        if cfg.work_dir:  # kept: server DB and log, blobs, device credentials and local heads
            run_dir = Path(cfg.work_dir) / f"run-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
            run_dir.mkdir(parents=True, exist_ok=False)
        else:  # removed at the end (registered first, so it runs after the server has stopped)
            run_dir = Path(tempfile.mkdtemp(prefix="facefl-sim-"))
            stack.callback(shutil.rmtree, run_dir, ignore_errors=True)
        # worker processes first: they import torch while the server starts
        workers = min(cfg.workers or 1, cfg.devices)
        backend = make_backend(cfg.backend, workers, cfg.ray_address, cfg.overlap)
        stack.callback(backend.close)
        server: LocalServer | None = None
        if cfg.server is None:
            eval_env = {}
            if cfg.eval_set is not None:
                eval_env["FACEFL_EVAL_SETS"] = json.dumps({"generic": str(Path(cfg.eval_set).resolve())})
            if cfg.public_set is not None:
                eval_env["FACEFL_PUBLIC_SETS"] = json.dumps({"public": str(Path(cfg.public_set).resolve())})
            server = LocalServer(
                run_dir / "server",
                database_url=cfg.db,
                admin_token=admin_token,
                enrollment_secret=secret,
                min_retry_after_s=0.2,
                extra_env=eval_env,
            )
            say(f"starting server (log: {server.log_path})")
            stack.enter_context(server)
            base_url = server.base_url
        else:
            base_url = cfg.server.rstrip("/")
        say(f"server {base_url}; work dir {run_dir}")

        kill = cfg.kill_at()
        # a server being killed and restarted: the simulator's own reads retry for a while
        admin = AdminClient(
            base_url, admin_token, timeout=60.0, max_retries=12 if kill else 3, backoff_cap_s=2.0
        )
        stack.callback(admin.close)
        eval_name = None if cfg.eval_set is None else ("generic" if cfg.server is None else cfg.eval_set)
        initial_model = None
        if cfg.initial_model is not None:
            try:
                initial_model = admin.import_model(Path(cfg.initial_model)).version
            except FaceflError as exc:
                raise SimulationError(f"importing {cfg.initial_model} failed: {exc}") from exc
        # the task opens round 1 and starts its deadline: the workers must be up by then
        if not backend.wait_ready(timeout=300.0):
            say("warning: the worker processes were not ready after 300 s; starting anyway")
        try:
            task = create_task(admin, cfg, eval_name, initial_model)
        except FaceflError as exc:
            raise SimulationError(f"creating the task failed: {exc}") from exc
        task_id = task.id

        # in parallel when the device jobs run threads (thousands of devices)
        registration_started = time.perf_counter()
        device_dirs = register_devices(
            base_url, secret, run_dir, plan.device_specs, threads=min(8, cfg.device_threads)
        )
        say(f"registered {len(device_dirs)} devices in {time.perf_counter() - registration_started:.1f} s")

        trainer = Trainer(num_threads=1)  # evaluation: small batches, one thread is fastest
        accuracy_cache: dict[int, float] = {}

        def accuracy(version: int) -> float:
            if version not in accuracy_cache:
                weights = admin.download_model(version)
                emb = trainer.embed(weights, plan.heldout.images, architecture=cfg.model)
                accuracy_cache[version] = rank1_identification(emb, plan.heldout.labels)
            return accuracy_cache[version]

        if task.current_version is None:
            raise SimulationError(f"task {task_id} was created without a model version")
        initial_version = task.current_version
        initial_acc = accuracy(initial_version)
        result = SimulationResult(
            config=cfg,
            rounds=[],
            initial_heldout_accuracy=initial_acc,
            total_wall_s=0.0,
            task_id=task_id,
            chance_accuracy=chance,
            initial_generic=_evaluation(admin, initial_version) if eval_name else None,
        )

        bar = tqdm(
            total=cfg.rounds * cfg.devices,
            desc="simulate",
            unit="device",
            disable=not cfg.progress,
            file=sys.stderr,
        )
        stack.callback(bar.close)
        faults = cfg.faults()
        seen_rounds: set[int] = set()

        for r in range(1, cfg.rounds + 1):
            round_started = time.perf_counter()
            open_round = _open_round(admin, task_id, seen_rounds, timeout_s=cfg.round_wait_s() + 60)
            if open_round is None:
                stopped = admin.get_task(task_id).status
                if stopped == "budget_exhausted":  # the task's epsilon budget, not an error
                    result.stopped = "privacy_budget_exhausted"
                else:
                    result.errors.append(f"round {r}: the task has no open round (completed?)")
                break
            seen_rounds.add(open_round.id)
            bar.set_postfix_str(f"round {r}/{cfg.rounds}")
            jobs = [
                DeviceJob(
                    base_url=base_url,
                    task_id=task_id,
                    device_index=i,
                    device_dir=str(device_dirs[i]),
                    data=plan.device_specs[i],
                    expected_round_id=open_round.id,
                    seed=cfg.seed * 1_000_003 + r * 10_007 + i,
                    assignment_timeout_s=min(60.0, cfg.round_timeout_s),
                    fault=faults.decide(r, i),
                    outage_tolerance_s=min(120.0, cfg.round_timeout_s) if kill else 0.0,
                )
                for i in range(cfg.devices)
            ]
            killer = None
            if kill is not None and kill.round == r and server is not None:
                killer = _ServerKiller(server, kill.seconds, say)
            job_results: list[JobResult] = []
            batches = device_batches(jobs, cfg.device_threads)
            for batch_results in backend.map_unordered(run_device_batch, batches):
                job_results.extend(batch_results)
                bar.update(len(batch_results))
            jobs_done_s = round(time.perf_counter() - round_started, 3)
            if killer is not None:
                killer.join()
            job_results.sort(key=lambda jr: jr.device_index)
            for jr in job_results:
                expected = (
                    jr.fault == "straggler" and jr.status == ROUND_CLOSED
                ) or jr.status == CORRUPT_REFUSED
                if jr.status not in (UPLOADED, DROPPED, NOT_SELECTED) and not expected:
                    result.errors.append(f"round {r} device {jr.device_index}: {jr.status}: {jr.error}")
            if all(jr.status == FAILED for jr in job_results):
                raise SimulationError(f"round {r}: every device failed; first error: {job_results[0].error}")
            closed = _closed_round(admin, open_round.id, timeout_s=cfg.round_wait_s() + 60)
            wall_s = round(time.perf_counter() - round_started, 3)
            version = (
                closed.result_version if closed.status == "aggregated" and closed.result_version else None
            )
            model_version = version if version is not None else closed.base_version
            losses = [jr.metrics["train_loss"] for jr in job_results if "train_loss" in jr.metrics]
            result.rounds.append(
                RoundResult(
                    round=r,
                    round_id=closed.id,
                    status=closed.status,
                    reports=closed.reported,
                    assigned=closed.assigned,
                    dropped=closed.assigned - closed.reported,
                    model_version=model_version,
                    wall_s=wall_s,
                    mb_uploaded=round(sum(jr.bytes_sent for jr in job_results) / 1e6, 4),
                    heldout_accuracy=accuracy(model_version),
                    generic=_evaluation(admin, model_version) if eval_name else None,
                    train_loss=float(np.mean(losses)) if losses else None,
                    jobs=job_outcomes(job_results),
                    job_seconds=mean_phases(job_results),
                    **fault_counts(job_results),
                    server_kills=int(killer is not None and killer.killed),
                    device_train_s=[round(jr.train_seconds, 4) for jr in job_results if jr.train_seconds > 0],
                    jobs_done_s=jobs_done_s,
                    peak_trainings=peak_trainings(job_results),
                    served_version=closed.served_version if version is not None else None,
                    epsilon=closed.metrics.get("dp_epsilon"),
                    delta=closed.metrics.get("dp_delta"),
                    secagg=secagg_counts(job_results) if cfg.secure_aggregation else None,
                    abandoned_reason=closed.metrics.get("abandoned_reason"),
                )
            )
        bar.close()
        backend.close()

    result.total_wall_s = round(time.perf_counter() - started, 3)
    if cfg.json_path:
        path = Path(cfg.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
    return result


# with threads, a batch holds this many jobs per thread: enough that the threads stay busy, few enough that
# the batches spread evenly over the worker processes
JOBS_PER_THREAD = 4


def device_batches(jobs: list[DeviceJob], threads: int) -> list[DeviceBatch]:
    """The round's jobs as batches for the worker processes: one job each without threads (the processes
    share the round's jobs one by one), else ``JOBS_PER_THREAD * threads`` consecutive jobs each."""
    size = 1 if threads <= 1 else JOBS_PER_THREAD * threads
    return [DeviceBatch(tuple(jobs[i : i + size]), threads) for i in range(0, len(jobs), size)]


class _ServerKiller:
    """SIGKILL the started server ``seconds`` from now, then restart it on the same port, database and
    blob store (a thread; ``join()`` waits until the server is back)."""

    def __init__(self, server: LocalServer, seconds: float, say: Callable[[str], None]) -> None:
        self.server, self.seconds, self.say = server, seconds, say
        self.killed = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="facefl-server-killer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        time.sleep(self.seconds)
        try:
            self.say(f"killing the server (SIGKILL, pid {self.server.pid})")
            self.server.kill()
            self.killed = True
            started = time.perf_counter()
            self.server.restart()
            self.say(f"server restarted in {time.perf_counter() - started:.1f} s (pid {self.server.pid})")
        except BaseException as exc:  # reported by join() in the main thread
            self.error = exc

    def join(self) -> None:
        self._thread.join()
        if self.error is not None:
            raise SimulationError(f"restarting the killed server failed: {self.error}") from self.error


def _evaluation(admin: AdminClient, version: int) -> dict[str, float] | None:
    """The server's evaluation of a model version (computed after it is created), or None on timeout."""
    try:
        return admin.wait_for_evaluation(version, timeout_s=EVAL_TIMEOUT_S)
    except WaitTimeout:
        return None


def _open_round(admin: AdminClient, task_id: int, seen: set[int], *, timeout_s: float) -> RoundInfo | None:
    """The task's open round that has not been simulated yet; None when the task has completed."""
    try:
        return admin.wait_for_open_round(task_id, exclude=seen, timeout_s=timeout_s, poll_s=0.1)
    except WaitTimeout as exc:
        raise SimulationError(str(exc)) from exc


# how the simulator reads a round's status while it waits for the close: by then every job has ended and
# the server usually has only the aggregation left, and a round's wall time includes the time to notice
# that it closed (half the interval on average); so it reads often at first (a read costs the server
# about a millisecond), then less and less often, for a round that waits for its deadline
CLOSE_POLL_FIRST_S = 0.02
CLOSE_POLL_GROWTH = 1.2
CLOSE_POLL_MAX_S = 0.25


def _closed_round(admin: AdminClient, round_id: int, *, timeout_s: float) -> RoundInfo:
    deadline = time.monotonic() + timeout_s
    interval = CLOSE_POLL_FIRST_S
    while True:
        info = admin.get_round(round_id)
        if info.closed:
            return info
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SimulationError(f"round {round_id} still {info.status} after {timeout_s:g} s")
        time.sleep(min(interval, remaining))
        interval = min(CLOSE_POLL_MAX_S, interval * CLOSE_POLL_GROWTH)
