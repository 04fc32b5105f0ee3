"""A per-process cache of what a secure-aggregation round no longer changes once a stage is reached.

Every device polls the round's state while it waits for a stage, and each poll (and each share or
reveal request) used to read the whole cohort and rebuild its neighbour graph: O(cohort) work per
request, O(cohort^2) per round. But the cohort is fixed from the share stage on (no key is accepted
after the advertise stage), U2 (the sharers) from the upload stage on and U3 (the uploaders) from the
unmask stage on, and a round's stage only moves forward. So the parts read in a transaction that saw
the round at a stage are final and can be served from memory, by any worker process and on any
database: a stale entry cannot exist. At most ``max_entries`` (the oldest insert is evicted first).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from facefl.secagg.roster import Roster

__all__ = ["FrozenCohort", "FrozenCohorts"]


@dataclass(frozen=True)
class FrozenCohort:
    """A round's cohort as of ``stage``: ``sharers`` from the upload stage on, ``uploaders`` from the
    unmask stage on (None before)."""

    stage: str
    roster: Roster
    sharers: frozenset[str] | None = None
    uploaders: frozenset[str] | None = None


class FrozenCohorts:
    def __init__(self, max_entries: int = 256) -> None:
        self.max_entries = max_entries
        self._entries: dict[tuple[int, str], FrozenCohort] = {}
        self._lock = threading.Lock()  # inserts only; a dict read is atomic

    def get(self, round_id: int, stage: str) -> FrozenCohort | None:
        return self._entries.get((round_id, stage))

    def put(self, round_id: int, cohort: FrozenCohort) -> None:
        with self._lock:
            self._entries[(round_id, cohort.stage)] = cohort
            while len(self._entries) > self.max_entries:
                del self._entries[next(iter(self._entries))]

    def __len__(self) -> int:
        return len(self._entries)
