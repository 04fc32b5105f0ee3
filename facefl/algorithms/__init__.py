"""Federated algorithms: one file per algorithm, pure math shared by the server and the SDK."""

from facefl.algorithms.fedavg import WeightedMean, fedavg

ALGORITHMS = ("fedavg", "fedprox")

__all__ = ["ALGORITHMS", "WeightedMean", "fedavg"]
