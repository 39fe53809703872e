"""Shamir's t-of-n secret sharing over the prime field GF(p), p = 2^521 − 1.

A secret s is the constant term of a random polynomial f of degree t − 1; share x is f(x).
Any t shares determine f, hence s = f(0), by Lagrange interpolation; any t − 1 shares are
uniformly distributed whatever s is, so they say nothing about it. The Mersenne prime 2^521 − 1
is large enough that a 32-byte secret (an X25519 private key, an AES-256 seed) is one field
element, which keeps the code to one polynomial per secret.
"""

from __future__ import annotations

import secrets
from collections.abc import Collection, Mapping, Sequence

PRIME = 2**521 - 1
SHARE_BYTES = (PRIME.bit_length() + 7) // 8  # a field element on the wire: 66 bytes


def evaluate(coefficients: Sequence[int], x: int) -> int:
    """f(x) mod p for f = Σ_k coefficients[k]·x^k (Horner)."""
    value = 0
    for coefficient in reversed(coefficients):
        value = (value * x + coefficient) % PRIME
    return value


def split(secret: int, points: Sequence[int], threshold: int) -> dict[int, int]:
    """The shares {x: f(x)} of ``secret`` at the distinct nonzero ``points``, for a fresh random
    f of degree ``threshold`` − 1 (coefficients from the OS's cryptographic generator)."""
    if not 0 <= secret < PRIME:
        raise ValueError("the secret must be an element of the field: 0 <= secret < 2^521 - 1")
    if not 1 <= threshold <= len(points):
        raise ValueError(f"threshold {threshold} must be between 1 and the {len(points)} shares")
    if len(set(points)) != len(points) or any(x % PRIME == 0 for x in points):
        raise ValueError("share points must be distinct and nonzero")
    coefficients = [secret, *(secrets.randbelow(PRIME) for _ in range(threshold - 1))]
    return {x: evaluate(coefficients, x) for x in points}


def lagrange_at_zero(points: Collection[int]) -> dict[int, int]:
    """The weights λ_x with f(0) = Σ_x λ_x·f(x) for every f of degree < len(points)."""
    weights = {}
    for x_i in points:
        numerator, denominator = 1, 1
        for x_j in points:
            if x_j != x_i:
                numerator = numerator * -x_j % PRIME
                denominator = denominator * (x_i - x_j) % PRIME
        weights[x_i] = numerator * pow(denominator, -1, PRIME) % PRIME
    return weights


def reconstruct(shares: Mapping[int, int], weights: Mapping[int, int] | None = None) -> int:
    """f(0) of the polynomial of lowest degree through the points {x: y} (Lagrange): the secret
    given at least ``threshold`` shares of it, an unrelated field element given fewer.
    ``weights``: ``lagrange_at_zero`` of the same points, for many secrets shared at them."""
    weights = lagrange_at_zero(list(shares)) if weights is None else weights
    return sum(weights[x] * y for x, y in shares.items()) % PRIME


def to_bytes(element: int) -> bytes:
    return element.to_bytes(SHARE_BYTES, "big")


def from_bytes(data: bytes) -> int:
    """A field element from its ``SHARE_BYTES`` big-endian bytes (ValueError if out of range)."""
    element = int.from_bytes(data, "big")
    if len(data) != SHARE_BYTES or element >= PRIME:
        raise ValueError(f"a share must be {SHARE_BYTES} bytes encoding a number below 2^521 - 1")
    return element
