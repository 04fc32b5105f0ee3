"""FedAvgM: FedAvg with server momentum (Hsu et al., 2019; a baseline of Reddi et al., "Adaptive
Federated Optimization", ICLR 2021), and :class:`ServerOptimizer`, the base of the server optimizers.

The round's weighted mean ``delta`` (mean of ``local - base``) is treated as a pseudo-gradient step.
FedAvgM keeps a momentum buffer ``m`` per tensor::

    m_t = beta * m_{t-1} + delta_t
    x_{t+1} = x_t + server_lr * m_t

``server_lr = 1`` and ``server_momentum = 0`` is FedAvg. Devices run FedAvg's local update (the
assignment says ``fedavg``), so devices built before this algorithm existed take part.

The optimizer state lives with the model version (``ServerState``: one blob per version), so a restart
or a takeover of the aggregation continues from the base version's state. BatchNorm running statistics
are not gradients: they get the plain mean (see :func:`is_statistic`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar

import numpy as np
from pydantic import Field

from facefl.algorithms.base import ServerState, ServerStepInputs, ServerStepResult
from facefl.algorithms.fedavg import FedAvg, FedAvgHyperparams

__all__ = ["FedAvgM", "FedAvgMHyperparams", "ServerOptimizer", "is_statistic", "momentum_step"]

TensorDict = dict[str, np.ndarray]
_STATISTICS = ("running_mean", "running_var")


def is_statistic(name: str) -> bool:
    """A normalization layer's running statistic: averaged, never moved by a server optimizer."""
    return name.rsplit(".", 1)[-1] in _STATISTICS


def momentum_step(
    delta: Mapping[str, np.ndarray], m: Mapping[str, np.ndarray], *, lr: float, beta: float
) -> tuple[TensorDict, TensorDict]:
    """One FedAvgM step: (the applied delta ``lr * m_t``, the new momentum ``m_t = beta m + delta``)."""
    new_m: TensorDict = {}
    step: TensorDict = {}
    for name, d in delta.items():
        d64 = np.asarray(d, np.float64)
        prev = m.get(name)
        m_t = d64 if prev is None else beta * np.asarray(prev, np.float64) + d64
        new_m[name] = m_t.astype(np.float32)
        step[name] = (lr * m_t).astype(np.float32)
    return step, new_m


class ServerOptimizer(FedAvg):
    """FedAvg's local update with an optimizer on the server: subclasses implement :meth:`optimize`
    over the named moment buffers they keep (``slots``)."""

    slots: ClassVar[tuple[str, ...]] = ()
    device_algorithm = "fedavg"

    def optimize(
        self, delta: TensorDict, moments: dict[str, TensorDict], hp: Any
    ) -> tuple[TensorDict, dict[str, TensorDict]]:
        """(the delta to apply, the new moments) from the mean ``delta`` and the previous ``moments``
        (slot -> tensor name -> array; a tensor missing from a slot starts that buffer)."""
        raise NotImplementedError

    def server_step(self, inputs: ServerStepInputs) -> ServerStepResult:
        optimized = {k: v for k, v in inputs.delta.items() if not is_statistic(k)}
        moments = self.read_moments(inputs.state, optimized)
        step, new_moments = self.optimize(optimized, moments, inputs.hyperparams)
        delta = {k: step.get(k, v) for k, v in inputs.delta.items()}  # statistics: the plain mean
        return ServerStepResult(delta=delta, state=self.write_moments(new_moments))

    def read_moments(
        self, state: ServerState | None, delta: Mapping[str, np.ndarray]
    ) -> dict[str, TensorDict]:
        """The base version's buffers that still fit ``delta`` (same name and shape)."""
        moments: dict[str, TensorDict] = {slot: {} for slot in self.slots}
        if state is None or state.metadata.get("algorithm") != self.name:
            return moments
        for slot in self.slots:
            for name, d in delta.items():
                value = state.tensors.get(f"{slot}/{name}")
                if value is not None and value.shape == np.shape(d):
                    moments[slot][name] = value
        return moments

    def write_moments(self, moments: Mapping[str, TensorDict]) -> ServerState:
        tensors = {f"{slot}/{name}": v for slot, buf in moments.items() for name, v in buf.items()}
        return ServerState(tensors, {"algorithm": self.name})


class FedAvgMHyperparams(FedAvgHyperparams):
    server_lr: Annotated[float, Field(gt=0, le=10)] = 1.0
    server_momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9


class FedAvgM(ServerOptimizer):
    name = "fedavgm"
    title = "FedAvgM (Hsu et al., 2019): FedAvg with server momentum"
    hyperparams = FedAvgMHyperparams
    slots = ("m",)

    def optimize(
        self, delta: TensorDict, moments: dict[str, TensorDict], hp: Any
    ) -> tuple[TensorDict, dict[str, TensorDict]]:
        step, m = momentum_step(delta, moments["m"], lr=hp.server_lr, beta=hp.server_momentum)
        return step, {"m": m}
