"""Where device jobs run: local worker processes (the default) or Ray tasks (``--backend ray``).

A backend maps the device-job function over a round's jobs and yields the results as they complete.
Both run the same :func:`simulator.worker.run_device_job`, which needs nothing but its picklable
:class:`~simulator.worker.DeviceJob` and the device's directory (credentials, local state). With Ray on
an existing cluster (``--ray-address``), every node must therefore reach the server URL and see the
simulator's work directory at the same path (a shared filesystem), and have facefl installed.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Protocol, TypeVar

from .worker import init_worker, warm_up

__all__ = ["BACKENDS", "Backend", "LocalProcessBackend", "RayBackend", "make_backend", "ray_available"]

J = TypeVar("J")
R = TypeVar("R")

BACKENDS = ("local", "ray")


class Backend(Protocol):
    """Runs jobs in parallel; ``map_unordered`` yields one result per job, in completion order."""

    name: str
    parallelism: int

    def map_unordered(self, fn: Callable[[J], R], jobs: Sequence[J]) -> Iterator[R]: ...

    def wait_ready(self, timeout: float) -> bool: ...

    def close(self) -> None: ...


class LocalProcessBackend:
    """A pool of spawned worker processes on this machine (one torch thread each).

    ``overlap`` processes per worker: with more than one, the pool holds ``workers * overlap`` processes
    but only ``workers`` training slots, so at most ``workers`` devices train at once (one per core)
    while the other processes' devices check in, download or upload: the HTTP round trips and the
    server's work on them hide behind the trainings instead of leaving a core idle between two.
    """

    name = "local"

    def __init__(self, workers: int, overlap: int = 1) -> None:
        if overlap < 1:
            raise ValueError("overlap must be >= 1")
        self.parallelism = max(1, workers) * overlap
        context = multiprocessing.get_context("spawn")
        self._ready = context.Semaphore(0)  # released once by each worker after its initializer
        slots = context.Semaphore(max(1, workers)) if overlap > 1 else None
        self._pool = ProcessPoolExecutor(
            max_workers=self.parallelism,
            mp_context=context,
            initializer=init_worker,
            initargs=(self._ready, slots),
        )
        for _ in range(self.parallelism):  # one job each: the pool starts every process (and its imports) now
            self._pool.submit(warm_up)

    def wait_ready(self, timeout: float) -> bool:
        """Block until every worker process has started and warmed up (False: not within ``timeout``)."""
        deadline = time.monotonic() + timeout
        for _ in range(self.parallelism):
            if not self._ready.acquire(timeout=max(0.0, deadline - time.monotonic())):
                return False
        return True

    def map_unordered(self, fn: Callable[[J], R], jobs: Sequence[J]) -> Iterator[R]:
        futures = [self._pool.submit(fn, job) for job in jobs]
        for fut in as_completed(futures):
            yield fut.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None


def _ray_call(fn: Callable[[Any], Any], job: Any) -> Any:
    init_worker()  # a Ray worker process may run many jobs: one torch thread, as in the local pool
    return fn(job)


class RayBackend:
    """Each device job is a Ray task (1 CPU). ``address`` joins an existing cluster; without it a local
    Ray instance with ``workers`` CPUs is started and shut down at :meth:`close`."""

    name = "ray"

    def __init__(self, workers: int, address: str | None = None) -> None:
        import ray

        self._ray = ray
        self._owns = not ray.is_initialized()
        if self._owns:
            # workers must import this checkout's packages, as the local pool's spawned processes do
            env = {"PYTHONPATH": os.environ.get("PYTHONPATH", "")} if os.environ.get("PYTHONPATH") else {}
            kwargs: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": False,
                "runtime_env": {"env_vars": env} if env else None,
            }
            if address is None:
                ray.init(num_cpus=max(1, workers), **kwargs)
            else:
                ray.init(address=address, **kwargs)
        cpus = int(ray.cluster_resources().get("CPU", workers))
        self.parallelism = max(1, min(workers, cpus) if address is None else cpus)
        self._remote = ray.remote(num_cpus=1)(_ray_call)

    def wait_ready(self, timeout: float) -> bool:
        """Ray starts a worker per task on demand; there is no pool to wait for."""
        return True

    def map_unordered(self, fn: Callable[[J], R], jobs: Sequence[J]) -> Iterator[R]:
        pending = [self._remote.remote(fn, job) for job in jobs]
        while pending:
            done, pending = self._ray.wait(pending, num_returns=1)
            for ref in done:
                yield self._ray.get(ref)

    def close(self) -> None:
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()


def make_backend(name: str, workers: int, ray_address: str | None = None, overlap: int = 1) -> Backend:
    if name == "local":
        return LocalProcessBackend(workers, overlap)
    if overlap != 1:
        raise ValueError("overlap applies to the local backend only (Ray schedules its tasks itself)")
    if name == "ray":
        if not ray_available():
            raise ValueError("--backend ray needs Ray: pip install 'facefl[ray]'")
        return RayBackend(workers, ray_address)
    raise ValueError(f"--backend must be one of {', '.join(BACKENDS)} (got {name!r})")
