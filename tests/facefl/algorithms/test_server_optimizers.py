"""FedAvgM, FedAdam and FedYogi (Reddi et al., 2021): the server step on tiny tensors, hand-computed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from facefl.algorithms import registry
from facefl.algorithms.base import ServerState, ServerStepInputs
from facefl.algorithms.fedadam import adaptive_step
from facefl.algorithms.fedavgm import is_statistic, momentum_step
from facefl.algorithms.fedyogi import yogi_second_moment


def _step(name: str, delta: dict[str, np.ndarray], state: ServerState | None = None, **hp: float):  # type: ignore[no-untyped-def]
    algorithm = registry.get(name)
    inputs = ServerStepInputs(
        base={k: np.zeros_like(v) for k, v in delta.items()},
        delta=delta,
        extras={},
        state=state,
        hyperparams=algorithm.hyperparams(**hp),
    )
    return algorithm.server_step(inputs)


def test_momentum_step_by_hand() -> None:
    # m_1 = 0.5 * 2 + 1 = 2 ; step = 0.1 * 2 = 0.2
    step, m = momentum_step({"w": np.array([1.0], np.float32)}, {"w": np.array([2.0])}, lr=0.1, beta=0.5)
    assert step["w"] == pytest.approx([0.2]) and m["w"] == pytest.approx([2.0])
    # first round: m_0 = delta
    step, m = momentum_step({"w": np.array([3.0], np.float32)}, {}, lr=1.0, beta=0.9)
    assert step["w"] == pytest.approx([3.0]) and m["w"] == pytest.approx([3.0])


def test_fedavgm_two_rounds_carry_momentum_in_the_state() -> None:
    d = {"w": np.array([1.0, -2.0], np.float32)}
    first = _step("fedavgm", d, server_lr=1.0, server_momentum=0.5)
    np.testing.assert_allclose(first.delta["w"], [1.0, -2.0])
    assert first.state is not None
    # the state goes through its blob encoding, as between two versions
    state = ServerState.decode(first.state.encode())
    second = _step("fedavgm", d, state, server_lr=1.0, server_momentum=0.5)
    np.testing.assert_allclose(second.delta["w"], [1.5, -3.0])  # m = 0.5 * d + d


def test_fedavgm_without_momentum_at_lr_1_is_fedavg() -> None:
    d = {"w": np.array([0.25, -4.0], np.float32)}
    state = _step("fedavgm", d, server_lr=1.0, server_momentum=0.0).state
    out = _step("fedavgm", d, state, server_lr=1.0, server_momentum=0.0)
    np.testing.assert_array_equal(out.delta["w"], d["w"])


def test_adam_step_by_hand() -> None:
    # delta 0.5, beta1 0.9, beta2 0.99, tau 0.1, lr 0.01, first round (m=0, v=tau^2=0.01):
    # m = 0.1 * 0.5 = 0.05 ; v = 0.99 * 0.01 + 0.01 * 0.25 = 0.0124
    # step = 0.01 * 0.05 / (sqrt(0.0124) + 0.1)
    step, m, v = adaptive_step(
        {"w": np.array([0.5], np.float32)}, {}, {}, lr=0.01, beta1=0.9, beta2=0.99, tau=0.1
    )
    assert m["w"][0] == pytest.approx(0.05)
    assert v["w"][0] == pytest.approx(0.0124)
    assert step["w"][0] == pytest.approx(0.01 * 0.05 / (math.sqrt(0.0124) + 0.1), rel=1e-6)


def test_fedadam_second_round_uses_the_stored_moments() -> None:
    hp = {"server_lr": 1.0, "beta1": 0.5, "beta2": 0.5, "tau": 0.5}
    d = {"w": np.array([1.0], np.float32)}
    first = _step("fedadam", d, **hp)
    # m1 = 0.5 ; v1 = 0.5 * 0.25 + 0.5 * 1 = 0.625 ; step = 0.5 / (sqrt(0.625) + 0.5)
    assert first.delta["w"][0] == pytest.approx(0.5 / (math.sqrt(0.625) + 0.5), rel=1e-6)
    second = _step("fedadam", {"w": np.array([-1.0], np.float32)}, first.state, **hp)
    # m2 = 0.5 * 0.5 - 0.5 = -0.25 ; v2 = 0.5 * 0.625 + 0.5 = 0.8125
    assert second.state is not None
    assert second.state.tensors["m/w"][0] == pytest.approx(-0.25)
    assert second.state.tensors["v/w"][0] == pytest.approx(0.8125)
    assert second.delta["w"][0] == pytest.approx(-0.25 / (math.sqrt(0.8125) + 0.5), rel=1e-6)


def test_yogi_second_moment_by_hand() -> None:
    # v > d^2: v shrinks by (1 - beta2) d^2 ; v < d^2: grows by it
    np.testing.assert_allclose(yogi_second_moment(np.array([1.0]), np.array([0.25]), 0.9), [0.975])
    np.testing.assert_allclose(yogi_second_moment(np.array([0.01]), np.array([0.25]), 0.9), [0.035])


def test_fedyogi_differs_from_fedadam_only_in_v() -> None:
    hp = {"server_lr": 1.0, "beta1": 0.5, "beta2": 0.5, "tau": 0.5}
    d = {"w": np.array([1.0], np.float32)}
    first = _step("fedyogi", d, **hp)
    # v1 = tau^2 - 0.5 * 1 * sign(0.25 - 1) = 0.25 + 0.5 = 0.75 ; m1 = 0.5
    assert first.state is not None and first.state.tensors["v/w"][0] == pytest.approx(0.75)
    assert first.delta["w"][0] == pytest.approx(0.5 / (math.sqrt(0.75) + 0.5), rel=1e-6)


def test_statistics_get_the_plain_mean_and_no_state() -> None:
    assert is_statistic("features.0.bn.running_var") and is_statistic("bn.running_mean")
    assert not is_statistic("bn.weight")
    d = {"bn.weight": np.array([1.0], np.float32), "bn.running_mean": np.array([7.0], np.float32)}
    for name in ("fedavgm", "fedadam", "fedyogi"):
        out = _step(name, d)
        assert out.delta["bn.running_mean"][0] == 7.0
        assert out.state is not None and not any("running" in k for k in out.state.tensors)


def test_a_state_of_another_shape_or_algorithm_starts_fresh() -> None:
    d = {"w": np.array([1.0, 1.0], np.float32)}
    fresh = _step("fedadam", d)
    wrong_shape = ServerState(
        {"m/w": np.ones(3, np.float32), "v/w": np.ones(3, np.float32)}, {"algorithm": "fedadam"}
    )
    other = ServerState({"m/w": np.ones(2, np.float32)}, {"algorithm": "fedavgm"})
    for state in (wrong_shape, other):
        np.testing.assert_array_equal(_step("fedadam", d, state).delta["w"], fresh.delta["w"])


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi"])
def test_server_optimizers_run_fedavg_on_devices(name: str) -> None:
    algorithm = registry.get(name)
    assert algorithm.wire_name == "fedavg"
    assert name not in registry.local_update_names()


@pytest.mark.parametrize(
    ("name", "hp", "field"),
    [
        ("fedadam", {"beta1": 1.0}, "hyperparams.beta1"),
        ("fedyogi", {"tau": 0}, "hyperparams.tau"),
        ("fedavgm", {"server_lr": -1}, "hyperparams.server_lr"),
        ("fedavgm", {"beta2": 0.9}, "applies to fedadam and fedyogi only"),
        ("fedavg", {"server_momentum": 0.9}, "applies to fedavgm only"),
    ],
)
def test_hyperparams_are_validated_by_the_chosen_algorithm(
    name: str, hp: dict[str, float], field: str
) -> None:
    with pytest.raises(ValueError, match=field):
        registry.task_hyperparams(name, hp)
