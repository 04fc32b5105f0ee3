"""FedYogi (Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2).

FedAdam with Yogi's second moment, which grows or shrinks ``v`` by at most ``(1 - beta2) delta^2``::

    v_t = v_{t-1} - (1 - beta2) * delta_t^2 * sign(v_{t-1} - delta_t^2)
"""

from __future__ import annotations

import numpy as np

from facefl.algorithms.fedadam import FedAdam

__all__ = ["FedYogi", "yogi_second_moment"]


def yogi_second_moment(v: np.ndarray, d2: np.ndarray, beta2: float) -> np.ndarray:
    return v - (1.0 - beta2) * d2 * np.sign(v - d2)


class FedYogi(FedAdam):
    name = "fedyogi"
    title = "FedYogi (Reddi et al., 2021): Yogi on the server"

    @staticmethod
    def second_moment(v: np.ndarray, d2: np.ndarray, beta2: float) -> np.ndarray:
        return yogi_second_moment(v, d2, beta2)
