"""Federated algorithms: one module per algorithm, listed in :mod:`facefl.algorithms.registry`.

Each module holds the algorithm's pure math (tested on tiny tensors) and its :class:`Algorithm`
subclass (:mod:`facefl.algorithms.base` says what it declares); :mod:`facefl.algorithms.local` is the
device's shared local-training loop.
"""

from facefl.algorithms.base import Algorithm, Hyperparams
from facefl.algorithms.fedavg import WeightedMean, fedavg
from facefl.algorithms.registry import ALGORITHMS, NAMES, get

__all__ = ["ALGORITHMS", "NAMES", "Algorithm", "Hyperparams", "WeightedMean", "fedavg", "get"]
