"""Devices for end-to-end tests: FederatedClient threads that upload tiny random deltas until the task
completes, recording every update the server acknowledged (202)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sqlalchemy as sa

from device_sdk import FederatedClient
from device_sdk.errors import RoundClosed, ServerError, TaskCompleted, TransportError
from server_api.db import normalize_url
from tests.conftest import SECRET


@dataclass(frozen=True)
class Ack:
    round_id: int
    update_id: int
    device_id: str


@dataclass
class Fleet:
    """``n`` registered devices driven by one thread each."""

    base_url: str
    n: int
    task_id: int = 1
    acks: list[Ack] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    in_flight: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Fleet:
        creds = []
        for i in range(self.n):
            with FederatedClient(self.base_url) as c:
                creds.append(c.register(SECRET, name=f"dev{i}"))
        for i, cr in enumerate(creds):
            t = threading.Thread(target=self._device, args=(cr.device_id, cr.token, i), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def join(self, timeout: float) -> None:
        for t in self._threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in self._threads), "devices still running"
        assert not self.errors, self.errors

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return len(self.acks), self.in_flight

    def _device(self, device_id: str, token: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        client = FederatedClient(
            self.base_url, token=token, device_id=device_id, max_retries=5, backoff_base_s=0.05,
            backoff_cap_s=0.5, timeout=30.0,
        )  # fmt: skip
        try:
            with client:
                while True:
                    try:
                        a = client.wait_for_assignment(self.task_id, timeout_s=90)
                    except TaskCompleted:
                        return
                    try:
                        base = client.download_model(a.base_version)
                        delta = {
                            k: (rng.standard_normal(v.shape) * 1e-3).astype(v.dtype) for k, v in base.items()
                        }
                        with self._lock:
                            self.in_flight += 1
                        try:
                            receipt = client.upload_update(a, delta, num_samples=int(rng.integers(1, 20)))
                        finally:
                            with self._lock:
                                self.in_flight -= 1
                    except (RoundClosed, TransportError, ServerError):
                        continue  # not acknowledged: nothing is claimed about it
                    with self._lock:
                        self.acks.append(Ack(a.round_id, int(receipt.update_id), device_id))
        except BaseException as exc:
            with self._lock:
                self.errors.append(exc)


@contextmanager
def database(url: str) -> Iterator[sa.Connection]:
    engine = sa.create_engine(normalize_url(url))
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def stored_updates(url: str) -> dict[int, tuple[int, str]]:
    """update id -> (round id, device id), read straight from the database."""
    with database(url) as conn:
        rows = conn.execute(sa.text("SELECT id, round_id, device_id FROM updates")).all()
    return {int(r[0]): (int(r[1]), str(r[2])) for r in rows}


def rounds_of(url: str, task_id: int = 1) -> list[dict[str, Any]]:
    with database(url) as conn:
        rows = conn.execute(
            sa.text(
                "SELECT r.id, r.status, r.reported, r.result_version, r.metrics,"
                " (SELECT count(*) FROM updates u WHERE u.round_id = r.id) AS n_updates"
                " FROM rounds r WHERE r.task_id = :t ORDER BY r.number"
            ),
            {"t": task_id},
        ).mappings()
        return [dict(r) for r in rows]


def check_every_ack_counted_once(url: str, acks: list[Ack], task_rounds: int) -> list[dict[str, Any]]:
    """The invariants: every acknowledged update is stored, in a round that aggregated it exactly once;
    exactly ``task_rounds`` aggregated rounds, each with its own new model version."""
    import json

    stored = stored_updates(url)
    for ack in acks:
        assert stored.get(ack.update_id) == (ack.round_id, ack.device_id), ack
    assert len({a.update_id for a in acks}) == len(acks)
    rounds = rounds_of(url)
    aggregated = [r for r in rounds if r["status"] == "aggregated"]
    assert len(aggregated) == task_rounds, rounds
    assert len({r["result_version"] for r in aggregated}) == task_rounds
    for r in aggregated:
        metrics = r["metrics"] if isinstance(r["metrics"], dict) else json.loads(r["metrics"])
        assert metrics["reports"] == r["n_updates"] == r["reported"], r
    by_id = {r["id"]: r for r in rounds}
    for ack in acks:  # an acknowledged update is never left in an abandoned round here (long deadlines)
        assert by_id[ack.round_id]["status"] == "aggregated", ack
    with database(url) as conn:
        versions = conn.execute(sa.text("SELECT count(*) FROM model_versions WHERE task_id = 1")).scalar()
    assert versions == task_rounds + 1  # the initial version + one per aggregated round
    return rounds
