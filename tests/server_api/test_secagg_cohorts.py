"""The per-process cache of frozen secure-aggregation cohorts: keyed by round and stage, bounded."""

from __future__ import annotations

from facefl.secagg.roster import Advertisement, Roster
from server_api.services.secagg_cohorts import FrozenCohort, FrozenCohorts


def _cohort(stage: str, round_id: int = 1) -> FrozenCohort:
    ads = [Advertisement(f"d{i}", bytes([i]) * 32, bytes([100 + i]) * 32) for i in range(3)]
    return FrozenCohort(stage, Roster.build(round_id, ads, graph_seed=7, max_degree=32))


def test_entries_are_per_round_and_stage() -> None:
    cache = FrozenCohorts()
    share, upload = _cohort("share"), _cohort("upload")
    cache.put(1, share)
    cache.put(1, upload)
    assert cache.get(1, "share") is share and cache.get(1, "upload") is upload
    assert cache.get(1, "unmask") is None and cache.get(2, "share") is None


def test_the_oldest_entry_is_evicted_beyond_the_bound() -> None:
    cache = FrozenCohorts(max_entries=2)
    for round_id in (1, 2, 3):
        cache.put(round_id, _cohort("share", round_id))
    assert len(cache) == 2
    assert cache.get(1, "share") is None
    assert cache.get(2, "share") is not None and cache.get(3, "share") is not None
