"""Key agreement and authenticated encryption for secure aggregation (``cryptography``'s primitives).

Every device holds two X25519 key pairs per round: ``c`` encrypts the shares it sends to its neighbours,
``s`` derives the pairwise masks. From an X25519 shared secret, HKDF-SHA256 derives a key bound to the
round and the purpose (``info``), so a key of one round or purpose is useless for another.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

PUBLIC_KEY_BYTES = 32
PRIVATE_KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16

__all__ = [
    "PUBLIC_KEY_BYTES",
    "KeyError_",
    "KeyPair",
    "decrypt",
    "derive_key",
    "encrypt",
    "load_public",
    "public_from_private",
]


class KeyError_(ValueError):
    """A malformed public key or a ciphertext that does not authenticate."""


@dataclass(frozen=True)
class KeyPair:
    private: bytes
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        key = X25519PrivateKey.generate()
        raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
        return cls(private=raw, public=public_from_private(raw))


def public_from_private(private: bytes) -> bytes:
    if len(private) != PRIVATE_KEY_BYTES:
        raise KeyError_(f"an X25519 private key is {PRIVATE_KEY_BYTES} bytes")
    key = X25519PrivateKey.from_private_bytes(private)
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def load_public(public: bytes) -> X25519PublicKey:
    if len(public) != PUBLIC_KEY_BYTES:
        raise KeyError_(f"an X25519 public key is {PUBLIC_KEY_BYTES} bytes, got {len(public)}")
    return X25519PublicKey.from_public_bytes(public)


def derive_key(private: bytes, peer_public: bytes, *, round_id: int, purpose: bytes) -> bytes:
    """32 bytes shared by the two ends of an X25519 agreement, bound to the round and the purpose."""
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(load_public(peer_public))
    except ValueError as exc:  # an all-zero shared secret (a low-order point): a hostile key
        raise KeyError_(f"key agreement failed: {exc}") from exc
    info = b"facefl-secagg/" + purpose + struct.pack(">Q", round_id)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def encrypt(key: bytes, plaintext: bytes, *, associated: bytes) -> bytes:
    """nonce || AES-256-GCM(plaintext); ``associated`` is authenticated, not sent."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def decrypt(key: bytes, ciphertext: bytes, *, associated: bytes) -> bytes:
    if len(ciphertext) < NONCE_BYTES + TAG_BYTES:
        raise KeyError_("ciphertext too short")
    try:
        return AESGCM(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], associated)
    except InvalidTag as exc:
        raise KeyError_("ciphertext does not authenticate") from exc
