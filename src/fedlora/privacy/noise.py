"""Seeded Gaussian noise for the private sums (DP-SGD's gradient, central DP's update), and the
noised mean both take of them.

Noise is drawn on the CPU from a ``torch.Generator`` seeded by (run seed, round, party) and only
then moved to where the sum lives, so the same config and seed add the same noise on any device
and after a resume.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedlora.lazy import torch


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
