"""The device's side of secure aggregation as a state machine, without transport.

    client = SecAggClient(device_id, round_id)
    ad = client.advertise()                      # stage 1: two public keys
    outbox = client.share(roster)                # stage 2: {neighbour: encrypted share}
    masked = client.mask(inbox, quantized)       # stage 3: the masked upload
    reveal = client.unmask(dropped, survivors)   # stage 4: shares of the dropped's mask keys and of the
                                                 #          survivors' self-mask seeds, never both for one
Each step runs once, in order; anything out of order or inconsistent raises :class:`ProtocolError`
and reveals nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from facefl.secagg import keys, masks, shamir
from facefl.secagg.roster import SHARE_CIPHERTEXT_BYTES, Advertisement, Roster, share_associated_data

__all__ = ["ProtocolError", "Reveal", "SecAggClient"]


class ProtocolError(RuntimeError):
    """The server asked for something the protocol forbids, or sent something inconsistent."""


@dataclass(frozen=True)
class Reveal:
    """Shares this device holds, by owner: mask-key shares of dropped devices, self-seed shares of
    survivors."""

    mask_key_shares: dict[str, bytes]
    self_seed_shares: dict[str, bytes]


class SecAggClient:
    def __init__(self, device_id: str, round_id: int) -> None:
        self.device_id = device_id
        self.round_id = round_id
        self._c = keys.KeyPair.generate()
        self._s = keys.KeyPair.generate()
        self._self_seed = os.urandom(masks.SEED_BYTES)
        self._stage = "advertise"
        self._roster: Roster | None = None
        self._held: dict[str, tuple[bytes, bytes]] = {}  # owner -> (mask-key share, self-seed share)

    def _advance(self, expected: str, following: str) -> None:
        if self._stage != expected:
            raise ProtocolError(f"stage {expected!r} requested, but this device is at {self._stage!r}")
        self._stage = following

    def advertise(self) -> Advertisement:
        self._advance("advertise", "share")
        return Advertisement(self.device_id, self._c.public, self._s.public)

    def share(self, roster: Roster) -> dict[str, bytes]:
        """Encrypted shares of the mask key and the self-mask seed, one per neighbour."""
        if roster.round_id != self.round_id:
            raise ProtocolError("roster of another round")
        if self.device_id not in roster.members:
            raise ProtocolError("this device is not in the roster")
        if roster.advertisement(self.device_id) != Advertisement(
            self.device_id, self._c.public, self._s.public
        ):
            raise ProtocolError("the roster carries other keys for this device")
        self._advance("share", "mask")
        self._roster = roster
        peers = roster.neighbours(self.device_id)
        t = roster.threshold(self.device_id)
        key_shares = shamir.split_bytes(self._s.private, n=len(peers), threshold=t)
        seed_shares = shamir.split_bytes(self._self_seed, n=len(peers), threshold=t)
        outbox = {}
        for peer, ks, ss in zip(peers, key_shares, seed_shares, strict=True):
            key = keys.derive_key(
                self._c.private, roster.advertisement(peer).c_public, round_id=self.round_id, purpose=b"share"
            )
            aad = share_associated_data(self.round_id, self.device_id, peer)
            outbox[peer] = keys.encrypt(key, ks.y_bytes() + ss.y_bytes(), associated=aad)
        return outbox

    def mask(self, inbox: Mapping[str, bytes], vector: np.ndarray) -> np.ndarray:
        """``vector`` (uint32) plus the pairwise masks with every neighbour whose share arrived, plus the self
        mask.

        ``inbox`` holds the shares sent to this device by the neighbours that completed the share stage;
        those are exactly the neighbours the server expects this device to have masked with."""
        roster = self._require_roster("mask")
        peers = set(roster.neighbours(self.device_id))
        if not set(inbox) <= peers:
            raise ProtocolError("shares from devices that are not this device's neighbours")
        if len(inbox) < roster.threshold(self.device_id):
            raise ProtocolError("fewer neighbours than the threshold completed the share stage")
        held = {}
        for sender, ciphertext in inbox.items():
            if len(ciphertext) != SHARE_CIPHERTEXT_BYTES:
                raise ProtocolError(f"share from {sender} has the wrong length")
            key = keys.derive_key(
                self._c.private,
                roster.advertisement(sender).c_public,
                round_id=self.round_id,
                purpose=b"share",
            )
            aad = share_associated_data(self.round_id, sender, self.device_id)
            try:
                plain = keys.decrypt(key, ciphertext, associated=aad)
            except keys.KeyError_ as exc:
                raise ProtocolError(f"share from {sender} does not decrypt") from exc
            half = shamir.SHARE_BYTES
            held[sender] = (plain[:half], plain[half:])
        values = np.asarray(vector)
        if values.dtype != np.uint32 or values.ndim != 1:
            raise ProtocolError("the vector to mask is a 1-D uint32 array")
        self._advance("mask", "unmask")
        self._held = held
        out = values + masks.self_mask(self._self_seed, len(values))
        for peer in sorted(held):
            seed = masks.pairwise_seed(
                self._s.private, roster.advertisement(peer).s_public, round_id=self.round_id
            )
            out += masks.signed_pairwise_mask(self.device_id, peer, seed, len(values))
        return out

    def unmask(self, dropped: Iterable[str], survivors: Iterable[str]) -> Reveal:
        """Reveal, among the neighbours that shared, mask-key shares of ``dropped`` and self-seed shares of
        ``survivors`` (the devices whose masked upload the server holds)."""
        roster = self._require_roster("unmask")
        dropped_set, survivor_set = set(dropped), set(survivors)
        if dropped_set & survivor_set:
            raise ProtocolError("a device cannot be both dropped and a survivor")
        if self.device_id not in survivor_set:
            raise ProtocolError("this device uploaded, so it is a survivor")
        sharers = set(self._held)
        if not sharers <= dropped_set | survivor_set:
            raise ProtocolError("every neighbour that shared must be named dropped or survivor")
        living_peers = survivor_set & set(roster.neighbours(self.device_id))
        if len(living_peers) < roster.threshold(self.device_id):
            raise ProtocolError("fewer survivors than the threshold: revealing would not help and is refused")
        self._advance("unmask", "done")
        return Reveal(
            mask_key_shares={o: self._held[o][0] for o in sorted(dropped_set & sharers)},
            self_seed_shares={o: self._held[o][1] for o in sorted(survivor_set & sharers)},
        )

    def _require_roster(self, step: str) -> Roster:
        if self._roster is None:
            raise ProtocolError(f"{step} before the share stage")
        return self._roster
