"""Refused requests counted by round and by device, in this process, for the console.

The server stores no refusal (a flood of refused requests must cost no database write); Prometheus
counts them by reason only (GET /metrics). This tally adds the round (uploads name it in their path)
and the authenticated device. It lives in memory, per worker process, from the process's start, and
keeps at most ``max_keys`` rounds and devices (the least recently refused are forgotten): the console
labels it as such.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Hashable

Reasons = dict[str, int]  # "410 round_closed" -> count


class _Bounded:
    def __init__(self, max_keys: int) -> None:
        self.max_keys = max_keys
        self.counts: OrderedDict[Hashable, Counter[str]] = OrderedDict()

    def add(self, key: Hashable, reason: str) -> None:
        counter = self.counts.get(key)
        if counter is None:
            counter = self.counts[key] = Counter()
            if len(self.counts) > self.max_keys:
                self.counts.popitem(last=False)
        else:
            self.counts.move_to_end(key)
        counter[reason] += 1


class RefusalTally:
    """Thread-safe counts of refusals (``"STATUS code"``) in all, by round id and by device id."""

    def __init__(self, max_keys: int = 10_000) -> None:
        self._lock = threading.Lock()
        self._total: Counter[str] = Counter()
        self._rounds = _Bounded(max_keys)
        self._devices = _Bounded(max_keys)

    def record(self, status: int, code: str, round_id: int | None, device_id: str | None) -> None:
        reason = f"{status} {code}"
        with self._lock:
            self._total[reason] += 1
            if round_id is not None:
                self._rounds.add(round_id, reason)
            if device_id is not None:
                self._devices.add(device_id, reason)

    def total(self) -> Reasons:
        with self._lock:
            return dict(self._total.most_common())

    def of_rounds(self, round_ids: list[int]) -> dict[int, Reasons]:
        with self._lock:
            return {
                r: dict(self._rounds.counts[r].most_common()) for r in round_ids if r in self._rounds.counts
            }

    def of_devices(self, device_ids: list[str]) -> dict[str, Reasons]:
        with self._lock:
            return {
                d: dict(self._devices.counts[d].most_common())
                for d in device_ids
                if d in self._devices.counts
            }
