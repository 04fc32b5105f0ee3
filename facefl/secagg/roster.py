"""What both ends of secure aggregation agree on once the key stage closes: the round's cohort (every
device that advertised its two public keys), the neighbour graph and the thresholds, and the layout of an
encrypted share."""

from __future__ import annotations

import functools
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from facefl.secagg import graph, keys, shamir

SHARE_PLAINTEXT_BYTES = 2 * shamir.SHARE_BYTES
SHARE_CIPHERTEXT_BYTES = keys.NONCE_BYTES + SHARE_PLAINTEXT_BYTES + keys.TAG_BYTES

__all__ = ["SHARE_CIPHERTEXT_BYTES", "Advertisement", "Roster", "share_associated_data"]


@dataclass(frozen=True)
class Advertisement:
    """A device's public keys for one round: ``c`` encrypts its shares, ``s`` derives its pairwise masks."""

    device_id: str
    c_public: bytes
    s_public: bytes


@dataclass(frozen=True)
class Roster:
    round_id: int
    advertisements: tuple[Advertisement, ...]
    graph_seed: int
    max_degree: int

    def __post_init__(self) -> None:
        ids = [a.device_id for a in self.advertisements]
        if ids != sorted(set(ids)):
            raise ValueError("a roster lists distinct devices in sorted order")
        public = [k for a in self.advertisements for k in (a.c_public, a.s_public)]
        if len(set(public)) != len(public) or any(len(k) != keys.PUBLIC_KEY_BYTES for k in public):
            raise ValueError("public keys must be distinct and 32 bytes each")

    @classmethod
    def build(
        cls, round_id: int, ads: Sequence[Advertisement], *, graph_seed: int, max_degree: int
    ) -> Roster:
        ordered = tuple(sorted(ads, key=lambda a: a.device_id))
        return cls(round_id=round_id, advertisements=ordered, graph_seed=graph_seed, max_degree=max_degree)

    @property
    def members(self) -> tuple[str, ...]:
        return tuple(a.device_id for a in self.advertisements)

    def advertisement(self, device_id: str) -> Advertisement:
        return self._by_id[device_id]

    @functools.cached_property
    def _by_id(self) -> dict[str, Advertisement]:
        return {a.device_id: a for a in self.advertisements}

    @functools.cached_property
    def graph(self) -> dict[str, frozenset[str]]:
        return graph.neighbours(self.members, seed=self.graph_seed, max_degree=self.max_degree)

    def neighbours(self, device_id: str) -> tuple[str, ...]:
        """Sorted: a neighbour's 1-based position here is the x of the shares it holds of this device."""
        return tuple(sorted(self.graph[device_id]))

    def threshold(self, device_id: str) -> int:
        return graph.threshold_for(len(self.graph[device_id]))

    def share_point(self, owner: str, holder: str) -> int:
        return self.neighbours(owner).index(holder) + 1


def share_associated_data(round_id: int, sender: str, recipient: str) -> bytes:
    """Authenticated with each encrypted share: a share moved to another round or pair fails to decrypt."""
    s, r = sender.encode(), recipient.encode()
    return struct.pack(">QH", round_id, len(s)) + s + struct.pack(">H", len(r)) + r
