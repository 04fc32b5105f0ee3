"""Shamir secret sharing over the prime field of the Mersenne prime 2^521 - 1.

The field is larger than every secret it shares (32-byte X25519 private keys and 32-byte seeds), so a
secret is one field element. A share is ``(x, y)`` with ``x`` in 1..n (the holder's 1-based position) and
``y`` the polynomial's value there. Any ``threshold`` shares determine the secret by Lagrange
interpolation at 0; fewer reveal nothing about it (every secret is equally consistent with them).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8): one field element, big-endian
SECRET_BYTES = 32

__all__ = [
    "PRIME",
    "SECRET_BYTES",
    "SHARE_BYTES",
    "ShamirError",
    "Share",
    "reconstruct",
    "reconstruct_bytes",
    "split",
    "split_bytes",
]


class ShamirError(ValueError):
    """Too few shares, duplicate or out-of-range points, or shares that do not lie on one polynomial."""


@dataclass(frozen=True)
class Share:
    x: int
    y: int

    def y_bytes(self) -> bytes:
        return self.y.to_bytes(SHARE_BYTES, "big")

    @classmethod
    def from_bytes(cls, x: int, data: bytes) -> Share:
        if len(data) != SHARE_BYTES:
            raise ShamirError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
        y = int.from_bytes(data, "big")
        if y >= PRIME:
            raise ShamirError("share value outside the field")
        return cls(x, y)


def _eval(coefficients: Sequence[int], x: int) -> int:
    acc = 0
    for c in reversed(coefficients):  # Horner
        acc = (acc * x + c) % PRIME
    return acc


def split(secret: int, *, n: int, threshold: int) -> list[Share]:
    """``n`` shares at x = 1..n of which any ``threshold`` reconstruct ``secret``."""
    if not 0 <= secret < PRIME:
        raise ShamirError("secret outside the field")
    if not 1 <= threshold <= n:
        raise ShamirError(f"need 1 <= threshold <= n, got threshold={threshold}, n={n}")
    coefficients = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return [Share(x, _eval(coefficients, x)) for x in range(1, n + 1)]


def _lagrange_at(points: Sequence[Share], at: int) -> int:
    total = 0
    for i, pi in enumerate(points):
        num, den = 1, 1
        for j, pj in enumerate(points):
            if i != j:
                num = num * (at - pj.x) % PRIME
                den = den * (pi.x - pj.x) % PRIME
        total = (total + pi.y * num * pow(den, -1, PRIME)) % PRIME
    return total


def reconstruct(shares: Sequence[Share], *, threshold: int) -> int:
    """The secret from at least ``threshold`` shares. Every share beyond the first ``threshold`` must lie
    on the same polynomial (a wrong share among them is detected, not silently used)."""
    if threshold < 1:
        raise ShamirError("threshold must be at least 1")
    if len(shares) < threshold:
        raise ShamirError(f"need {threshold} shares, got {len(shares)}")
    xs = [s.x for s in shares]
    if len(set(xs)) != len(xs):
        raise ShamirError("duplicate share points")
    if any(not 0 < x < PRIME for x in xs) or any(not 0 <= s.y < PRIME for s in shares):
        raise ShamirError("share outside the field")
    basis = list(shares[:threshold])
    for extra in shares[threshold:]:
        if _lagrange_at(basis, extra.x) != extra.y:
            raise ShamirError("shares are inconsistent (not on one polynomial of the threshold's degree)")
    return _lagrange_at(basis, 0)


def split_bytes(secret: bytes, *, n: int, threshold: int) -> list[Share]:
    if len(secret) != SECRET_BYTES:
        raise ShamirError(f"a secret is {SECRET_BYTES} bytes")
    return split(int.from_bytes(secret, "big"), n=n, threshold=threshold)


def reconstruct_bytes(shares: Sequence[Share], *, threshold: int) -> bytes:
    value = reconstruct(shares, threshold=threshold)
    if value >= 1 << (8 * SECRET_BYTES):
        raise ShamirError("reconstructed value is not a secret of this protocol")
    return value.to_bytes(SECRET_BYTES, "big")
