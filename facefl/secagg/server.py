"""The server's side of secure aggregation, without transport or storage: which secrets it needs, and
the unmasking of a masked sum once the survivors revealed their shares.

Sets, in the paper's notation: ``U1`` the roster (advertised keys), ``U2`` the sharers (completed the
share stage), ``U3`` the uploaders (masked upload stored; a subset of U2). Every uploader masked with its
neighbours in U2, so the sum over U3 still holds, for each pair (v in U3, u in U2 - U3), v's mask for u,
and each uploader's self mask. The server removes the first with u's reconstructed mask key and the
second with v's reconstructed self-mask seed.
"""

from __future__ import annotations

from collections.abc import Mapping, Set

import numpy as np

from facefl.secagg import keys, masks, shamir
from facefl.secagg.roster import Roster

__all__ = ["UnmaskError", "missing_secrets", "unmask_sum"]

SharesByOwner = Mapping[str, Mapping[str, bytes]]  # owner -> holder -> share value (y) bytes


class UnmaskError(ValueError):
    """Too few or inconsistent shares, or a reconstructed key that does not match its advertisement."""


def missing_secrets(
    roster: Roster, *, sharers: Set[str], uploaders: Set[str], revealers: Set[str]
) -> list[str]:
    """Devices whose needed secret fewer than their threshold of neighbours have revealed (empty:
    recoverable)."""
    missing = []
    for owner in sorted(sharers):
        holders = set(roster.neighbours(owner)) & revealers & uploaders
        if len(holders) < roster.threshold(owner):
            missing.append(owner)
    return missing


def _secret(roster: Roster, owner: str, shares: Mapping[str, bytes]) -> bytes:
    try:
        points = [
            shamir.Share.from_bytes(roster.share_point(owner, holder), y)
            for holder, y in sorted(shares.items())
        ]
        return shamir.reconstruct_bytes(points, threshold=roster.threshold(owner))
    except (shamir.ShamirError, ValueError) as exc:
        raise UnmaskError(f"secret of {owner}: {exc}") from exc


def unmask_sum(
    masked_sum: np.ndarray,
    roster: Roster,
    *,
    sharers: Set[str],
    uploaders: Set[str],
    mask_key_shares: SharesByOwner,
    self_seed_shares: SharesByOwner,
) -> np.ndarray:
    """The sum of the uploaders' unmasked vectors modulo 2^32 (uint32), from the sum of their masked ones.

    ``mask_key_shares[u]`` must hold the shares of every dropped sharer u (in ``sharers - uploaders``),
    ``self_seed_shares[v]`` those of every uploader v; only holders that are v's or u's neighbours count.
    """
    if not uploaders <= sharers <= set(roster.members):
        raise UnmaskError("uploaders must be sharers and sharers roster members")
    total = np.array(masked_sum, dtype=np.uint32, copy=True)
    length = len(total)
    for owner in sorted(sharers - uploaders):
        shares = {h: y for h, y in mask_key_shares.get(owner, {}).items() if h in roster.graph[owner]}
        private = _secret(roster, owner, shares)
        if keys.public_from_private(private) != roster.advertisement(owner).s_public:
            raise UnmaskError(f"reconstructed mask key of {owner} does not match its advertised key")
        for peer in sorted(roster.graph[owner] & uploaders):
            seed = masks.pairwise_seed(private, roster.advertisement(peer).s_public, round_id=roster.round_id)
            total -= masks.signed_pairwise_mask(peer, owner, seed, length)
    for owner in sorted(uploaders):
        shares = {h: y for h, y in self_seed_shares.get(owner, {}).items() if h in roster.graph[owner]}
        total -= masks.self_mask(_secret(roster, owner, shares), length)
    return total
