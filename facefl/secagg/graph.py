"""Who shares with whom: the neighbour graph of a round's cohort (Bell et al., SecAgg+).

Small cohorts use the complete graph. Larger ones use a Harary graph H(k, n) over a random permutation of
the cohort: place the devices on a ring in the permuted order and join each to its k/2 nearest on either
side. That graph is k-regular, and the permutation, derived from the server's seed, makes the ring order
unpredictable to anyone who chose the cohort's device ids. Everybody computes the same graph from the
sorted cohort and the seed.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

__all__ = ["neighbours", "threshold_for"]


def threshold_for(degree: int) -> int:
    """Shares needed to reconstruct a secret shared among ``degree`` neighbours: a strict majority."""
    return degree // 2 + 1


def neighbours(cohort: Sequence[str], *, seed: int, max_degree: int) -> dict[str, frozenset[str]]:
    """Each cohort member's neighbours (itself excluded). ``max_degree`` is rounded down to even."""
    members = sorted(set(cohort))
    if len(members) != len(cohort):
        raise ValueError("cohort members must be distinct")
    n = len(members)
    if max_degree < 2:
        raise ValueError("max_degree must be at least 2")
    if n - 1 <= max_degree:
        return {m: frozenset(x for x in members if x != m) for m in members}
    half = max_degree // 2
    rng = random.Random(hashlib.sha256(b"facefl-secagg-graph" + seed.to_bytes(8, "big")).digest())
    ring = list(members)
    rng.shuffle(ring)
    graph: dict[str, set[str]] = {m: set() for m in members}
    for i, m in enumerate(ring):
        for step in range(1, half + 1):
            other = ring[(i + step) % n]
            graph[m].add(other)
            graph[other].add(m)
    return {m: frozenset(v) for m, v in graph.items()}
