"""The fixed-point code of secure aggregation: reals as integers modulo 2^32.

Masks only cancel in exact arithmetic, so a client sends q = round(p·x·2^f) mod 2^32 for its
weighted reply p·x (f = ``privacy.fixed_point_bits``) and the server reads the sum of the q as
a two's-complement 32-bit integer over 2^f.

- Quantization error: |q/2^f − p·x| ≤ 2^(−f−1) per coordinate, so the decoded sum of n inputs
  is within n·2^(−f−1) of Σ p_i·x_i.
- Overflow: the decoded sum is right while |Σ q_i| < 2^31. With weights summing to at most 1,
  |Σ q_i| ≤ 2^f·max|x| + n/2, so every client refuses to encode a reply with
  |x| ≥ (2^31 − n)/2^f (``value_limit``) instead of letting the sum wrap.
"""

from __future__ import annotations

import numpy as np

MODULUS = 2**32


class FixedPointError(ValueError):
    """A reply that the fixed-point code cannot carry (not finite, or out of range)."""


def value_limit(bits: int, summands: int) -> float:
    """The bound |x| must stay below so that ``summands`` weighted inputs cannot wrap."""
    return (2**31 - summands) / 2**bits


def quantization_error(bits: int, summands: int) -> float:
    """The largest per-coordinate error of a decoded sum of ``summands`` inputs."""
    return summands * 2.0 ** (-bits - 1)


def encode(values: np.ndarray, weight: float, bits: int, summands: int) -> np.ndarray:
    """round(weight·values·2^bits) mod 2^32 as uint32, for a weight in (0, 1]."""
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all():
        raise FixedPointError("the reply has NaN or infinite values: no fixed-point code")
    limit, largest = value_limit(bits, summands), float(np.abs(values).max(initial=0.0))
    if largest >= limit:
        raise FixedPointError(
            f"a reply value of magnitude {largest:.6g} is outside ±{limit:.6g}, the range of "
            f"privacy.fixed_point_bits = {bits} for {summands} summands (the sum would wrap "
            "modulo 2^32); lower fixed_point_bits"
        )
    scaled = np.rint(values * (weight * 2.0**bits)).astype(np.int64)
    return np.mod(scaled, MODULUS).astype(np.uint32)


def decode(total: np.ndarray, bits: int) -> np.ndarray:
    """A sum of codes (uint32, mod 2^32) -> the real sum, as float64."""
    return total.astype(np.uint32).view(np.int32).astype(np.float64) / 2.0**bits
