"""The ideal-round definition of benchmarks/round_overhead.py (LPT makespan); speed is not asserted."""

from __future__ import annotations

import pytest

from benchmarks.round_overhead import lpt_makespan


@pytest.mark.parametrize(
    ("durations", "workers", "expected"),
    [
        ([], 2, 0.0),
        ([3.0], 4, 3.0),  # one job: its own length, whatever the parallelism
        ([1.0, 1.0, 1.0, 1.0], 2, 2.0),
        ([5.0, 1.0, 1.0, 1.0], 2, 5.0),  # the longest job bounds the round
        ([3.0, 3.0, 2.0, 2.0, 2.0], 2, 7.0),  # LPT: {3, 2, 2} and {3, 2}
        ([2.0, 2.0, 2.0], 1, 6.0),  # one worker: the sum
    ],
)
def test_lpt_makespan(durations: list[float], workers: int, expected: float) -> None:
    assert lpt_makespan(durations, workers) == pytest.approx(expected)
