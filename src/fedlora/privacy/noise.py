"""Gaussian noise for the private sums (DP-SGD's gradient, central DP's update), the noised mean
both take of them, and where their randomness comes from.

Noise is drawn on the CPU from a ``torch.Generator`` and only then moved to where the sum lives.
Its seed is the privacy question (``privacy.noise_source``, ``NoiseSeeds``):

- ``seeded``: derived from (run seed, round, party). The same config and seed add the same noise
  on any device and after a resume, which is what a research comparison wants; but the run seed
  is in config.toml, which the server holds (the Flower app ships it to every node), so anyone
  holding it can regenerate the noise from a client's download and reply and subtract it: the ε
  then holds against other clients and readers of the model who lack the config, not against
  the server.
- ``secure``: a fresh 63-bit secret from the OS's cryptographic generator (``secrets``) for every
  party, round and stream, used once and never stored or sent, so no one can replay the draws;
  runs are then not bit-reproducible, and a resumed round draws new noise.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from fedlora.lazy import torch

NoiseSource = Literal["secure", "seeded"]


@dataclass(frozen=True)
class NoiseSeeds:
    """The seeds of a party's private draws (noise and DP-SGD's samples)."""

    source: NoiseSource
    run_seed: int

    def seed(self, *stream: int) -> int:
        """The seed of one stream, e.g. (round, client, 3): derived, or a fresh secret."""
        if self.source == "secure":
            return secrets.randbits(63)
        from fedlora.training import derived_seed

        return derived_seed(self.run_seed, *stream)


def resolve_source(configured: str, deployed: bool) -> NoiseSource:
    """``auto``: secure where parties are separate processes (``deployed``), else seeded."""
    if configured == "auto":
        return "secure" if deployed else "seeded"
    if configured == "secure" or configured == "seeded":
        return configured
    raise ValueError(f"unknown noise source {configured!r}")


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian_noise(
    like: Sequence[torch.Tensor], std: float, source: torch.Generator
) -> list[torch.Tensor]:
    """One N(0, std²) tensor per tensor of ``like`` (its shape, float32, its device), drawn in
    order from ``source``."""
    return [
        (torch.randn(t.shape, generator=source, dtype=torch.float32) * std).to(t.device)
        for t in like
    ]


def noisy_mean(
    sums: Sequence[torch.Tensor],
    clip_norm: float,
    noise_multiplier: float,
    denominator: float,
    source: torch.Generator,
) -> list[torch.Tensor]:
    """(Σ clipped + N(0, (z·C)² I)) / denominator, tensor by tensor: the Gaussian mechanism on
    a sum whose sensitivity to one contributor is C; the public denominator is post-processing."""
    noise = gaussian_noise(sums, noise_multiplier * clip_norm, source)
    return [(total + n) / denominator for total, n in zip(sums, noise, strict=True)]
