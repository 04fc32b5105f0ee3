"""FedAdam (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2).

With the round's weighted mean ``delta`` (mean of ``local - base``, the pseudo-gradient's negative)::

    m_t = beta1 * m_{t-1} + (1 - beta1) * delta_t
    v_t = beta2 * v_{t-1} + (1 - beta2) * delta_t^2
    x_{t+1} = x_t + server_lr * m_t / (sqrt(v_t) + tau)

with ``m_{-1} = 0`` and ``v_{-1} = tau^2`` as in the paper (no bias correction). ``tau`` bounds the
adaptivity. Devices run FedAvg's local update; ``m`` and ``v`` live with the model version (see
:class:`~facefl.algorithms.fedavgm.ServerOptimizer`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import numpy as np
from pydantic import Field

from facefl.algorithms.fedavg import FedAvgHyperparams
from facefl.algorithms.fedavgm import ServerOptimizer

__all__ = ["AdaptiveHyperparams", "FedAdam", "adaptive_step"]

TensorDict = dict[str, np.ndarray]


def adam_second_moment(v: np.ndarray, d2: np.ndarray, beta2: float) -> np.ndarray:
    return beta2 * v + (1.0 - beta2) * d2


def adaptive_step(
    delta: Mapping[str, np.ndarray],
    m: Mapping[str, np.ndarray],
    v: Mapping[str, np.ndarray],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    tau: float,
    second_moment: Any = adam_second_moment,
) -> tuple[TensorDict, TensorDict, TensorDict]:
    """One adaptive server step: (applied delta, new m, new v); ``second_moment(v, delta^2, beta2)``
    is Adam's or Yogi's update of v."""
    step: TensorDict = {}
    new_m: TensorDict = {}
    new_v: TensorDict = {}
    for name, d in delta.items():
        d64 = np.asarray(d, np.float64)
        m_prev = np.asarray(m[name], np.float64) if name in m else np.zeros_like(d64)
        v_prev = np.asarray(v[name], np.float64) if name in v else np.full_like(d64, tau * tau)
        m_t = beta1 * m_prev + (1.0 - beta1) * d64
        v_t = second_moment(v_prev, d64 * d64, beta2)
        step[name] = (lr * m_t / (np.sqrt(v_t) + tau)).astype(np.float32)
        new_m[name] = m_t.astype(np.float32)
        new_v[name] = v_t.astype(np.float32)
    return step, new_m, new_v


class AdaptiveHyperparams(FedAvgHyperparams):
    server_lr: Annotated[float, Field(gt=0, le=10)] = 0.01
    beta1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    beta2: Annotated[float, Field(ge=0, lt=1)] = 0.99
    tau: Annotated[float, Field(gt=0, le=1)] = 1e-3


class FedAdam(ServerOptimizer):
    name = "fedadam"
    title = "FedAdam (Reddi et al., 2021): Adam on the server"
    hyperparams = AdaptiveHyperparams
    slots = ("m", "v")

    @staticmethod
    def second_moment(v: np.ndarray, d2: np.ndarray, beta2: float) -> np.ndarray:
        return adam_second_moment(v, d2, beta2)

    def optimize(
        self, delta: TensorDict, moments: dict[str, TensorDict], hp: Any
    ) -> tuple[TensorDict, dict[str, TensorDict]]:
        step, m, v = adaptive_step(
            delta,
            moments["m"],
            moments["v"],
            lr=hp.server_lr,
            beta1=hp.beta1,
            beta2=hp.beta2,
            tau=hp.tau,
            second_moment=self.second_moment,
        )
        return step, {"m": m, "v": v}
