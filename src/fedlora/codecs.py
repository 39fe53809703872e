"""Compression codecs the channel applies to what crosses a party boundary (our extension, §2.3).

A codec turns float tensors into *wire* tensors (what is serialised and counted by the ledger)
and back. ``StochasticQuantizer`` is the unbiased b-bit quantizer of §2.3: per tensor, scale
``m = max|X|``, ``L = 2^(b-1) - 1`` levels per sign, each entry rounded up or down to the grid
``m·{-1, …, -1/L, 0, 1/L, …, 1}`` with the probabilities that make ``E[Q(X)] = X``. Codes are
bit-packed into uint8 (4 per byte at b=2, 2 at b=4, 1 at b=8) next to one float32 scale, so
the ledger counts the packed bytes, not 4 bytes per value.

Randomness depends on (seed, round, sender) only: a sender's message is quantized the same way
for every neighbour (a broadcast), the sender can reproduce what its neighbours decoded (needed
by error feedback), and a resumed run quantizes identically.
"""

from __future__ import annotations

import math
import zlib
from typing import Protocol

import torch

from fedlora.channel import MessageError, TensorDict
from fedlora.training import derived_seed

CODES, SCALE, SHAPE = "#codes", "#scale", "#shape"


class Codec(Protocol):
    def encode(self, tensors: TensorDict, round_index: int, sender: str) -> TensorDict:
        """Float tensors -> the wire tensors actually sent."""
        ...

    def decode(self, wire: TensorDict) -> TensorDict:
        """Wire tensors -> float tensors; raises ``MessageError`` on anything malformed."""
        ...


class StochasticQuantizer:
    """``contractive``: send Q(X)/(1+ω) instead of Q(X), where ω||X||² is this draw's exact
    conditional variance Σ p(1−p)(m/L)². Biased, but E||Q/(1+ω) − X||² = ω/(1+ω)·||X||² < ||X||²:
    the δ-contraction error feedback (CHOCO) needs; plain unbiased Q can make it diverge. The
    factor is folded into the transmitted scale, so receivers decode it unchanged."""

    def __init__(self, bits: int, seed: int, contractive: bool = False) -> None:
        if bits not in (2, 4, 8):
            raise ValueError(f"quantizer bits must be 2, 4 or 8, got {bits}")
        self.bits = bits
        self.levels = 2 ** (bits - 1) - 1  # L per sign
        self.per_byte = 8 // bits
        self.seed = seed
        self.contractive = contractive

    # -- the quantizer on one tensor ----------------------------------------------------------
    def quantize(
        self, x: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (codes in [-L, L], scale m); E[m·codes/L] = x unless ``contractive``."""
        flat = x.detach().reshape(-1).to(torch.float64)
        scale = flat.abs().max() if flat.numel() else torch.zeros((), dtype=torch.float64)
        if scale == 0:
            return torch.zeros_like(flat, dtype=torch.int64), scale.to(torch.float32)
        y = flat / scale * self.levels
        low = torch.floor(y)
        up = torch.rand(y.shape, generator=generator, dtype=torch.float64) < (y - low)
        codes = (low + up).clamp_(-self.levels, self.levels).to(torch.int64)
        if self.contractive:
            frac = y - low
            omega = (frac * (1 - frac)).sum() * (scale / self.levels) ** 2 / (flat**2).sum()
            scale = scale / (1 + omega)
        return codes, scale.to(torch.float32)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (codes.to(torch.float64) * (float(scale) / self.levels)).to(torch.float32)

    # -- packing ------------------------------------------------------------------------------
    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        unsigned = codes + self.levels  # [0, 2L] < 2^bits
        padded = torch.zeros(
            math.ceil(codes.numel() / self.per_byte) * self.per_byte, dtype=torch.int64
        )
        padded[: codes.numel()] = unsigned
        lanes = padded.reshape(-1, self.per_byte)
        shifts = torch.arange(self.per_byte, dtype=torch.int64) * self.bits
        return (lanes << shifts).sum(dim=1).to(torch.uint8)

    def unpack(self, packed: torch.Tensor, count: int) -> torch.Tensor:
        shifts = torch.arange(self.per_byte, dtype=torch.int64) * self.bits
        lanes = (packed.to(torch.int64).unsqueeze(1) >> shifts) & (2**self.bits - 1)
        return lanes.reshape(-1)[:count] - self.levels

    # -- Codec --------------------------------------------------------------------------------
    def encode(self, tensors: TensorDict, round_index: int, sender: str) -> TensorDict:
        generator = torch.Generator().manual_seed(
            derived_seed(self.seed, round_index, zlib.crc32(sender.encode()))
        )
        wire: TensorDict = {}
        for name, tensor in tensors.items():
            if not tensor.is_floating_point():
                raise ValueError(
                    f"quantizer: tensor {name!r} is {tensor.dtype}, not a float tensor"
                )
            codes, scale = self.quantize(tensor, generator)
            wire[name + CODES] = self.pack(codes)
            wire[name + SCALE] = scale.reshape(1)
            wire[name + SHAPE] = torch.tensor(tensor.shape, dtype=torch.int32)
        return wire

    def decode(self, wire: TensorDict) -> TensorDict:
        names = {key.rsplit("#", 1)[0] for key in wire}
        tensors: TensorDict = {}
        for name in sorted(names):
            parts = {suffix: wire.get(name + suffix) for suffix in (CODES, SCALE, SHAPE)}
            missing = [suffix for suffix, t in parts.items() if t is None]
            if missing:
                raise MessageError(f"quantized tensor {name!r} lacks {missing}")
            packed, scale, shape = parts[CODES], parts[SCALE], parts[SHAPE]
            if (
                packed.dtype != torch.uint8
                or packed.dim() != 1
                or shape.dtype != torch.int32
                or shape.dim() != 1
                or scale.shape != (1,)
            ):
                raise MessageError(f"quantized tensor {name!r} has malformed parts")
            if not torch.isfinite(scale).all() or float(scale) < 0:
                raise MessageError(f"quantized tensor {name!r} has an invalid scale {float(scale)}")
            if (shape < 0).any():
                raise MessageError(f"quantized tensor {name!r} has a negative dimension")
            count = math.prod(int(d) for d in shape)
            if packed.numel() != math.ceil(count / self.per_byte):
                raise MessageError(
                    f"quantized tensor {name!r}: {packed.numel()} bytes for {count} values"
                )
            codes = self.unpack(packed, count)
            if (codes.abs() > self.levels).any():
                raise MessageError(f"quantized tensor {name!r} has codes outside ±{self.levels}")
            tensors[name] = self.dequantize(codes, scale).reshape([int(d) for d in shape])
        return tensors


def make_codec(bits: int, seed: int, contractive: bool = False) -> Codec | None:
    """The codec for ``topology.quantize_bits``: None (exact float32 messages) at 32 bits."""
    return None if bits == 32 else StochasticQuantizer(bits, seed, contractive)
