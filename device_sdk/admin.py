"""A typed client of the server's admin API: tasks, model versions, and waiting for rounds and evaluations.

What an operator's script, the simulator, the tests and the benchmarks do with the admin token::

    with AdminClient("http://127.0.0.1:8000", token=admin_token) as admin:
        version = admin.import_model("pretrained.safetensors").version
        task = admin.create_task("faces", algorithm=algorithm_name, hyperparams={"local_epochs": 2},
                                 policy={"target_reports": 20}, initial_version=version)
        closed = admin.wait_for_round(task.current_round.id, timeout_s=600)
        report = admin.wait_for_evaluation(closed.result_version, timeout_s=600)

It shares the device client's layers: requests go through a :class:`~device_sdk.transport.Connection`
(finite timeouts, an injectable transport, retries of idempotent calls), answers become the records of
:mod:`device_sdk.records`, and every error status raises the SDK's typed errors with the server's detail
(401/403 :class:`AuthError`, 404 :class:`NotFound`, 400/413/422 :class:`InvalidRequest`, ...). A wait
that runs out of time raises :class:`WaitTimeout`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from pydantic import BaseModel

from facefl import codec
from facefl.data.public import PublicSet, decode_pack

from .cache import fetch_immutable
from .errors import ProtocolError, WaitTimeout
from .records import ModelVersion, RoundInfo, TaskInfo, TransferStats
from .transport import DEFAULT_TIMEOUT, Connection

__all__ = ["AdminClient"]


class AdminClient:
    """The admin token's connection to a facefl server. Use it as a context manager (or call
    :meth:`close`).

    Args:
        base_url: the server root, e.g. ``http://127.0.0.1:8000``.
        token: the server's admin token (``FACEFL_ADMIN_TOKEN``).
        timeout: per-request timeouts (finite: 30 s, 5 s to connect by default).
        transport: an ``httpx.BaseTransport`` to route, record or share traffic.
        max_retries: retries of a failed idempotent request (reads), and of a request the server cannot
            have seen (connection refused); task creation and model import are never sent twice otherwise.
        backoff_base_s, backoff_cap_s, rng, sleep: the jittered backoff between retries.
        clock: the monotonic clock of the ``wait_for_*`` methods (injectable, as ``sleep``).
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
        max_retries: int = 3,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 30.0,
        rng: random.Random | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not token:
            raise ValueError("an admin token is required")
        self._conn = Connection(
            base_url,
            token=token,
            timeout=timeout,
            transport=transport,
            max_retries=max_retries,
            backoff_base_s=backoff_base_s,
            backoff_cap_s=backoff_cap_s,
            rng=rng,
            sleep=sleep,
        )
        self.base_url = self._conn.base_url
        self._clock = clock

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def stats(self) -> TransferStats:
        return self._conn.stats

    @property
    def timeout(self) -> httpx.Timeout:
        return self._conn.http.timeout

    # ---------------------------------------------------------------------------------------- tasks

    def create_task(
        self,
        name: str,
        *,
        algorithm: str | None = None,
        architecture: str | None = None,
        embedding_dim: int | None = None,
        seed: int | None = None,
        rounds: int | None = None,
        initial_version: int | None = None,
        eval_set: str | None = None,
        trainable: Sequence[str] | None = None,
        hyperparams: Mapping[str, Any] | BaseModel | None = None,
        policy: Mapping[str, Any] | None = None,
    ) -> TaskInfo:
        """``POST /v1/tasks``: create a task; the server builds its first model version and opens round 1.

        Options left as None take the server's defaults. ``hyperparams`` (a mapping, or the algorithm's
        own pydantic model from :mod:`facefl.algorithms`) and ``policy`` are validated by the server: a
        refused field raises :class:`~device_sdk.errors.InvalidRequest` whose ``detail`` names it, and
        the refused request creates nothing.
        """
        options = {
            "algorithm": algorithm,
            "architecture": architecture,
            "embedding_dim": embedding_dim,
            "seed": seed,
            "rounds": rounds,
            "initial_version": initial_version,
            "eval_set": eval_set,
        }
        # an option left out takes the server's default
        body: dict[str, Any] = {"name": name} | {k: v for k, v in options.items() if v is not None}
        if trainable is not None:
            body["trainable"] = list(trainable)
        if hyperparams is not None:
            if isinstance(hyperparams, BaseModel):
                body["hyperparams"] = hyperparams.model_dump(mode="json")
            else:
                body["hyperparams"] = dict(hyperparams)
        if policy is not None:
            body["policy"] = dict(policy)
        resp = self._conn.request("POST", "/v1/tasks", json_body=body, idempotent=False, expect=(201,))
        return TaskInfo.from_json(self._conn.json(resp))

    def get_task(self, task_id: int) -> TaskInfo:
        """``GET /v1/tasks/{id}``: status, served version and current round."""
        return TaskInfo.from_json(self._conn.get_json(f"/v1/tasks/{int(task_id)}"))

    def list_tasks(self) -> list[TaskInfo]:
        """``GET /v1/tasks``."""
        return [TaskInfo.from_json(t) for t in self._list("/v1/tasks")]

    def task_rounds(self, task_id: int) -> list[RoundInfo]:
        """``GET /v1/tasks/{id}/rounds``: the task's rounds, oldest first."""
        return [RoundInfo.from_json(r) for r in self._list(f"/v1/tasks/{int(task_id)}/rounds")]

    def get_round(self, round_id: int) -> RoundInfo:
        """``GET /v1/rounds/{id}``."""
        return RoundInfo.from_json(self._conn.get_json(f"/v1/rounds/{int(round_id)}"))

    # --------------------------------------------------------------------------------------- models

    def import_model(
        self,
        weights: bytes | str | Path,
        *,
        architecture: str | None = None,
        embedding_dim: int | None = None,
    ) -> ModelVersion:
        """``POST /v1/models``: import safetensors weights (bytes, or a file such as a ``facefl pretrain``
        checkpoint) as a root model version; a task starts from it with ``initial_version``."""
        body = weights if isinstance(weights, bytes) else Path(weights).read_bytes()
        params: dict[str, Any] = {}
        if architecture is not None:
            params["architecture"] = architecture
        if embedding_dim is not None:
            params["embedding_dim"] = int(embedding_dim)
        resp = self._conn.request(
            "POST",
            "/v1/models",
            content=body,
            params=params,
            headers={"Content-Type": "application/octet-stream"},
            idempotent=False,
            expect=(201,),
        )
        return ModelVersion.from_json(self._conn.json(resp))

    def model_info(self, version: int) -> ModelVersion:
        """``GET /v1/models/{version}/info``: lineage, digest, served or held back, evaluation metrics."""
        return ModelVersion.from_json(self._conn.get_json(f"/v1/models/{int(version)}/info"))

    def list_models(self, task_id: int | None = None) -> list[ModelVersion]:
        """``GET /v1/models``: every model version (of one task when ``task_id`` is given)."""
        params = {"task_id": int(task_id)} if task_id is not None else None
        return [ModelVersion.from_json(m) for m in self._list("/v1/models", params)]

    def download_model_bytes(self, version: int) -> bytes:
        """The safetensors body of a model version (checked against its SHA-256 ETag); the admin may
        fetch a version the release gate held back."""
        return fetch_immutable(self._conn, f"/v1/models/{int(version)}", _check_safetensors)

    def download_model(self, version: int) -> dict[str, np.ndarray]:
        """A model version's weights as NumPy arrays (:meth:`download_model_bytes`, decoded)."""
        return fetch_immutable(self._conn, f"/v1/models/{int(version)}", codec.decode)

    def download_public_pack(self, task_id: int) -> PublicSet:
        """FedFR: the task's public pack (images and identity labels)."""
        return fetch_immutable(self._conn, f"/v1/tasks/{int(task_id)}/public-pack", decode_pack)

    def download_public_bank(self, version: int) -> dict[str, np.ndarray]:
        """FedFR: a model version's public feature bank (``embeddings`` and ``labels``)."""
        return fetch_immutable(self._conn, f"/v1/models/{int(version)}/public-bank", codec.decode)

    # -------------------------------------------------------------------------------------- waiting

    def wait_for_round(self, round_id: int, *, timeout_s: float = 600.0, poll_s: float = 0.2) -> RoundInfo:
        """Poll the round until it is closed (aggregated or abandoned); WaitTimeout after ``timeout_s``."""
        deadline = self._clock() + timeout_s
        while True:
            info = self.get_round(round_id)
            if info.closed:
                return info
            self._pause(deadline, poll_s, f"round {round_id} still {info.status} after {timeout_s:g} s")

    def wait_for_open_round(
        self,
        task_id: int,
        *,
        exclude: Sequence[int] | set[int] = (),
        timeout_s: float = 600.0,
        poll_s: float = 0.1,
    ) -> RoundInfo | None:
        """The task's open round whose id is not in ``exclude``; None once the task has completed.
        WaitTimeout after ``timeout_s``."""
        skip = set(exclude)
        deadline = self._clock() + timeout_s
        while True:
            task = self.get_task(task_id)
            current = task.current_round
            if current is not None and current.status == "open" and current.id not in skip:
                return current
            if task.status in ("completed", "budget_exhausted"):  # final: no round opens again
                return None  # a paused task (an operator's pause) is waited for, as a running one
            self._pause(deadline, poll_s, f"task {task_id}: no new open round within {timeout_s:g} s")

    def wait_for_evaluation(
        self, version: int, *, timeout_s: float = 600.0, poll_s: float = 0.2
    ) -> dict[str, float]:
        """The server's evaluation of a model version on its task's eval set (it runs after the version
        is created): the numeric entries of ``metrics["eval"]``. WaitTimeout after ``timeout_s``."""
        deadline = self._clock() + timeout_s
        while True:
            report = self.model_info(version).evaluation
            if report is not None:
                return report
            self._pause(deadline, poll_s, f"model version {version} has no evaluation after {timeout_s:g} s")

    # ------------------------------------------------------------------------------------ internals

    def _pause(self, deadline: float, poll_s: float, message: str) -> None:
        remaining = deadline - self._clock()
        if remaining <= 0:
            raise WaitTimeout(message)
        self._conn.sleep(min(poll_s, remaining))

    def _list(self, path: str, params: Mapping[str, Any] | None = None) -> list[Mapping[str, Any]]:
        data = self._conn.get_json(path, params)
        if not isinstance(data, list) or not all(isinstance(item, Mapping) for item in data):
            raise ProtocolError(f"GET {path}: expected a JSON list of objects")
        return data


def _check_safetensors(body: bytes) -> bytes:
    codec.read_header(body)  # ValueError (CodecError) when the body is not safetensors
    return body
