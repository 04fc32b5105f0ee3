"""The per-process cache of the digests of devices' recorded secure-aggregation requests: per round and
device, never handed out by reference, bounded (what the view answers from it: test_secagg_refusals)."""

from __future__ import annotations

from server_api.services.secagg_resend import RecordedDigests


def test_entries_are_per_round_and_device_and_copied() -> None:
    cache = RecordedDigests()
    cache.put(1, "a", {"keys": "k1"})
    cache.put(2, "a", {"keys": "k2"})
    got = cache.get(1, "a")
    got["shares"] = "tampered"
    assert cache.get(1, "a") == {"keys": "k1"} and cache.get(2, "a") == {"keys": "k2"}
    assert cache.get(1, "b") == {}


def test_the_oldest_entry_is_evicted_beyond_the_bound() -> None:
    cache = RecordedDigests(max_entries=2)
    cache.put(1, "a", {"keys": "x"})
    cache.put(1, "b", {"keys": "y"})
    cache.put(1, "a", {"keys": "x", "shares": "z"})  # a grown entry counts as the newest
    cache.put(1, "c", {"keys": "w"})
    assert len(cache) == 2
    assert cache.get(1, "b") == {} and cache.get(1, "a") == {"keys": "x", "shares": "z"}
