"""Masks modulo 2^32 from a pseudo-random generator (ChaCha20 keystream, ``cryptography``).

A device ``u`` adds, for each neighbour ``v`` that took part in sharing, ``+PRG(s_uv)`` when ``u`` sorts
before ``v`` and ``-PRG(s_uv)`` otherwise, where ``s_uv`` is derived from the X25519 agreement of their
mask keys and the round id (both ends derive the same value); so in the sum over devices every pair cancels.
It also adds ``PRG(b_u)`` for its own self-mask seed ``b_u``, which the server removes once it has
reconstructed ``b_u`` from the survivors' shares.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from facefl.secagg import keys

SEED_BYTES = 32
_PAIRWISE_NONCE = b"facefl-pairwise\0"  # 16 bytes: ChaCha20's counter + nonce block
_SELF_NONCE = b"facefl-selfmask\0"

__all__ = ["SEED_BYTES", "pairwise_mask", "pairwise_seed", "prg", "self_mask", "signed_pairwise_mask"]


def prg(seed: bytes, length: int, *, nonce: bytes = _PAIRWISE_NONCE) -> np.ndarray:
    """``length`` pseudo-random uint32 values expanded from a 32-byte seed."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a PRG seed is {SEED_BYTES} bytes")
    if length < 0:
        raise ValueError("length must be non-negative")
    encryptor = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor()
    stream = encryptor.update(bytes(4 * length))
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32)


def pairwise_seed(own_private: bytes, peer_public: bytes, *, round_id: int) -> bytes:
    return keys.derive_key(own_private, peer_public, round_id=round_id, purpose=b"pairwise-mask")


def pairwise_mask(seed: bytes, length: int) -> np.ndarray:
    return prg(seed, length, nonce=_PAIRWISE_NONCE)


def signed_pairwise_mask(own_id: str, peer_id: str, seed: bytes, length: int) -> np.ndarray:
    """What ``own_id`` adds for the pair: the mask, or its negation modulo 2^32 (the later id)."""
    mask = pairwise_mask(seed, length)
    return mask if own_id < peer_id else (np.uint32(0) - mask).astype(np.uint32)


def self_mask(seed: bytes, length: int) -> np.ndarray:
    return prg(seed, length, nonce=_SELF_NONCE)
