"""The server's services without HTTP: task creation, check-in and intake feed a round, then
``aggregation.aggregate_round`` orchestrates the mean -> the algorithm's server step -> the new version ->
the next round. The algorithms' server state (FedAvgM's momentum, FedAdam's moments, FedFace's class
embeddings) goes through a real SQLite database and blob store and survives a new ServiceContext (a
restart)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from facefl import codec
from facefl.algorithms.fedavgm import is_statistic
from facefl.algorithms.fedface import CLASS_EMBEDDING_KEY, CLASS_EMBEDDINGS
from server_api.orm import ModelVersion, Round, Task
from server_api.schemas import CheckinIn, RegisterIn, TrainAction
from server_api.services import aggregation, devices, rounds, server_state, tasks, updates
from server_api.services.context import ServiceContext
from server_api.settings import Settings
from server_api.task_schemas import TaskIn
from tests.conftest import SECRET

POLICY = {"target_reports": 3, "min_reports": 1}  # three: intake never starts an aggregation itself


@contextmanager
def _restarted(settings: Settings) -> Iterator[ServiceContext]:
    """A new ServiceContext on the same database and blob store, as a restarted server has."""
    context = ServiceContext.from_settings(settings)
    try:
        yield context
    finally:
        context.close()


def _create(
    ctx: ServiceContext,
    algorithm: str,
    hyperparams: dict[str, Any],
    rounds_: int = 3,
    architecture: str = "tiny",
) -> int:
    body = TaskIn.model_validate(
        {
            "name": algorithm,
            "algorithm": algorithm,
            "architecture": architecture,
            "embedding_dim": 8,
            "rounds": rounds_,
            "hyperparams": hyperparams,
            "policy": POLICY,
        }
    )
    return tasks.create(ctx, body).id


def _weights(ctx: ServiceContext, version: int) -> dict[str, np.ndarray]:
    with ctx.db.read() as s:
        mv = s.get(ModelVersion, version)
        assert mv is not None
        key = mv.blob_key
    return dict(codec.load_file(ctx.blobs.path(key)))


def _report(
    ctx: ServiceContext,
    tmp: Path,
    value: float,
    num_samples: int,
    extras: dict[str, np.ndarray] | None = None,
    device_id: str | None = None,
) -> tuple[str, int]:
    """A device (new unless given) checks in and reports ``base + value`` everywhere; (device, round)."""
    if device_id is None:
        token = devices.register(ctx, RegisterIn(enrollment_secret=SECRET)).token
        device_id = devices.authenticate(ctx, token)
    action = rounds.checkin(ctx, device_id, CheckinIn())
    assert isinstance(action, TrainAction), action
    a = action.assignment
    delta = {k: np.full_like(v, value) for k, v in _weights(ctx, a.base_version).items()}
    # the route's three steps: preflight, the body streamed into a validating staging file, accept
    target, staged = updates.open_upload(ctx, a.round_id, device_id, a.upload_token)
    try:
        staged.write(codec.encode({**delta, **(extras or {})}))
        accepted = updates.accept(
            ctx, target, staged, num_samples=num_samples, metrics={"train_loss": value * 100}
        )
    finally:
        staged.discard()
    assert accepted.round_id == a.round_id
    return device_id, a.round_id


def _state(ctx: ServiceContext, version: int) -> Any:
    with ctx.db.read() as s:
        mv = s.get(ModelVersion, version)
        assert mv is not None
        key = mv.server_state_key
    return server_state.read(ctx, key)


def test_aggregation_orchestrates_mean_version_and_next_round(ctx: ServiceContext, tmp_path: Path) -> None:
    task_id = _create(ctx, "fedavg", {}, rounds_=2)
    _, round_id = _report(ctx, tmp_path, 0.01, 10)
    _report(ctx, tmp_path, 0.04, 30)
    v1 = _weights(ctx, 1)

    assert aggregation.aggregate_round(ctx, round_id) == 2
    assert aggregation.aggregate_round(ctx, round_id) is None  # exactly once: the round is taken

    # the sample-weighted mean (0.01 * 10 + 0.04 * 30) / 40, applied to the base; FedAvg keeps no state
    v2 = _weights(ctx, 2)
    for name, value in v1.items():
        np.testing.assert_allclose(v2[name] - value, 0.0325, atol=1e-6, err_msg=name)
    assert _state(ctx, 2) is None
    with ctx.db.read() as s:
        rnd = s.get(Round, round_id)
        task = s.get(Task, task_id)
        assert rnd is not None and task is not None
        assert (rnd.status, rnd.result_version, rnd.served_version) == ("aggregated", 2, 2)
        assert rnd.metrics["reports"] == 2 and rnd.metrics["samples"] == 40
        assert rnd.metrics["train_train_loss"] == pytest.approx((1.0 * 10 + 4.0 * 30) / 40)
        assert (task.current_version, task.aggregated_rounds, task.status) == (2, 1, "running")
        nxt = s.scalars(select(Round).where(Round.task_id == task_id, Round.number == 2)).one()
        assert (nxt.status, nxt.base_version) == ("open", 2)

    # the last round completes the task: no round opens after it
    _, round2 = _report(ctx, tmp_path, 0.02, 5)
    assert aggregation.aggregate_round(ctx, round2) == 3
    with ctx.db.read() as s:
        task = s.get(Task, task_id)
        assert task is not None and (task.status, task.aggregated_rounds, task.current_version) == (
            "completed",
            2,
            3,
        )
        assert s.scalars(select(Round).where(Round.task_id == task_id, Round.number == 3)).first() is None


def test_fedavgm_momentum_lives_with_the_version(
    ctx: ServiceContext, settings: Settings, tmp_path: Path
) -> None:
    hp = {"server_lr": 0.5, "server_momentum": 0.8}
    _create(ctx, "fedavgm", hp, architecture="small")  # "small" has BatchNorm statistics
    _, r1 = _report(ctx, tmp_path, 0.02, 10)
    assert aggregation.aggregate_round(ctx, r1) == 2
    v1, v2 = _weights(ctx, 1), _weights(ctx, 2)
    name = next(k for k in v1 if not is_statistic(k))
    # m1 = d1 = 0.02; step = lr * m1
    np.testing.assert_allclose(v2[name] - v1[name], 0.5 * 0.02, atol=1e-7)
    state = _state(ctx, 2)
    assert state.metadata["algorithm"] == "fedavgm"
    np.testing.assert_allclose(state.tensors[f"m/{name}"], 0.02, atol=1e-7)
    assert not any(is_statistic(k.split("/", 1)[1]) for k in state.tensors)  # statistics: no momentum
    stat = next(k for k in v1 if is_statistic(k))  # running statistics take the plain mean
    np.testing.assert_allclose(v2[stat] - v1[stat], 0.02, atol=1e-6)

    # a new context on the same database and blobs (a restarted server) continues from the stored m
    with _restarted(settings) as again:
        _, r2 = _report(again, tmp_path, -0.01, 10)
        assert aggregation.aggregate_round(again, r2) == 3
        v3 = _weights(again, 3)
    m2 = 0.8 * 0.02 - 0.01
    np.testing.assert_allclose(v3[name] - v2[name], 0.5 * m2, atol=1e-7)


def test_fedadam_moments_hand_computed(ctx: ServiceContext, tmp_path: Path) -> None:
    hp = {"server_lr": 0.1, "beta1": 0.5, "beta2": 0.5, "tau": 0.5}
    _create(ctx, "fedadam", hp)
    _, r1 = _report(ctx, tmp_path, 0.01, 10)
    assert aggregation.aggregate_round(ctx, r1) == 2
    _, r2 = _report(ctx, tmp_path, -0.01, 10)
    assert aggregation.aggregate_round(ctx, r2) == 3
    v1, v2, v3 = (_weights(ctx, v) for v in (1, 2, 3))
    name = next(k for k in v1 if not is_statistic(k))
    # m1 = 0.5 * 0.01; v1 = 0.5 * tau^2 + 0.5 * 1e-4; step = lr * m / (sqrt(v) + tau)
    m1, var1 = 0.005, 0.5 * 0.25 + 0.5 * 1e-4
    m2, var2 = 0.5 * m1 - 0.005, 0.5 * var1 + 0.5 * 1e-4
    np.testing.assert_allclose(v2[name] - v1[name], 0.1 * m1 / (math.sqrt(var1) + 0.5), rtol=1e-3)
    np.testing.assert_allclose(v3[name] - v2[name], 0.1 * m2 / (math.sqrt(var2) + 0.5), rtol=1e-3, atol=1e-8)
    state = _state(ctx, 3)
    assert state.metadata["algorithm"] == "fedadam"
    np.testing.assert_allclose(state.tensors[f"m/{name}"], m2, atol=1e-7)
    np.testing.assert_allclose(state.tensors[f"v/{name}"], var2, rtol=1e-5)


def test_fedface_class_embeddings_are_spread_kept_and_served_per_device(
    ctx: ServiceContext, tmp_path: Path
) -> None:
    _create(ctx, "fedface", {"spreadout_steps": 5})
    close = np.array([1.0, 0.1, 0, 0, 0, 0, 0, 0], np.float32)
    other = np.array([1.0, -0.1, 0, 0, 0, 0, 0, 0], np.float32)
    rows = [close / np.linalg.norm(close), other / np.linalg.norm(other)]
    d1, r1 = _report(ctx, tmp_path, 0.01, 10, {CLASS_EMBEDDING_KEY: rows[0]})
    d2, _ = _report(ctx, tmp_path, 0.01, 10, {CLASS_EMBEDDING_KEY: rows[1]})
    assert aggregation.aggregate_round(ctx, r1) == 2
    # the class embeddings are not averaged into the model: the new version has the backbone only
    assert CLASS_EMBEDDING_KEY not in _weights(ctx, 2)
    state = _state(ctx, 2)
    spread = state.tensors[CLASS_EMBEDDINGS]
    assert spread.shape == (2, 8)
    np.testing.assert_allclose(np.linalg.norm(spread, axis=1), 1.0, rtol=1e-5)
    before = float(rows[0] @ rows[1])
    assert float(spread[0] @ spread[1]) < before  # pushed apart
    # each device downloads its own row only
    own = {d: codec.decode(server_state.device_state_of(ctx, 2, d))[CLASS_EMBEDDING_KEY] for d in (d1, d2)}
    devices_in_state = sorted((d1, d2))
    for d in (d1, d2):
        np.testing.assert_array_equal(own[d], spread[devices_in_state.index(d)])
    # a device that never reported has no row
    stranger = devices.authenticate(ctx, devices.register(ctx, RegisterIn(enrollment_secret=SECRET)).token)
    with pytest.raises(Exception, match="no class embedding"):
        server_state.device_state_of(ctx, 2, stranger)

    # next round: one device reports again; the other device's row is kept from the stored state
    _, r2 = _report(ctx, tmp_path, 0.0, 10, {CLASS_EMBEDDING_KEY: spread[devices_in_state.index(d1)]}, d1)
    assert aggregation.aggregate_round(ctx, r2) == 3
    state3 = _state(ctx, 3)
    assert state3.tensors[CLASS_EMBEDDINGS].shape == (2, 8)
