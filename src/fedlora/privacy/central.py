"""Central (user-level) differential privacy at the server: DP-FedAvg (McMahan et al. 2018),
optionally with adaptive clipping (Andrew et al. 2021, the quantile method Flower ships as
``DifferentialPrivacyServerSideAdaptiveClipping``).

A round over the m clients the server sampled (m = ``federation.clients_per_round``, or all):

    Δ_i  = reply_i − the state client i started from           its update
    Δ̃_i  = Δ_i · min(1, C / ‖Δ_i‖)                              ``clip_update``
    Δ̄    = (Σ_i Δ̃_i + N(0, (z_Δ·C)² I)) / m                     ``noised_mean``

The weights are uniform and the denominator is the fixed m, not the replies' count nor their
data sizes: the sum's sensitivity to one client is then C (a size-weighted mean's would be
max_i p_i·C, and the sizes are private too), and a missing reply is simply a zero update (an
unset bit below). So ``federation.weighting`` must be ``uniform`` under central DP.

Adaptive clipping adds one release per round: b_i = 1[‖Δ_i‖ ≤ C], the noised fraction
b̄ = (Σ_i b_i + N(0, σ_b²)) / m, then C ← C·exp(−η(b̄ − γ)) with γ = ``target_quantile``,
η = ``clip_learning_rate``, σ_b = ``clipped_count_stddev`` (default m/20). The update noise is
then z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2), so the two Gaussian releases together cost exactly one at
noise multiplier z (the bits have sensitivity 1/2 once centred; Andrew et al., Theorem 1), and
the accountant charges one Gaussian step at z per round either way. That needs 2σ_b > z.

The server's part needs only the two sums Σ_i Δ̃_i and Σ_i b_i (``CentralDP.release``), so the
clipping can move to the clients: under secure aggregation (``fedlora.privacy.secure_round``)
each client runs ``clip_update`` on its own update, masks Δ̃_i with its bit as one more
coordinate, and the server noises the unmasked sums, the only thing it sees. Without secure
aggregation ``Method.combine`` calls ``CentralDP.mean_update``, which clips at the server.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fedlora.lazy import torch
from fedlora.privacy.noise import NoiseSeeds, gaussian_noise, generator, noisy_mean
from fedlora.robust import clip
from fedlora.tensors import TensorDict

UPDATE_STREAM = 0xDC  # stream tags of the server's two noise streams (NoiseSeeds.seed)
COUNT_STREAM = 0xDB


def clip_update(update: Mapping[str, torch.Tensor], clip_norm: float) -> tuple[TensorDict, bool]:
    """Δ scaled to norm ≤ clip_norm, and the bit 1[‖Δ‖ ≤ clip_norm] adaptive clipping counts."""
    clipped, size = clip(update, clip_norm)
    return clipped, size <= clip_norm


def summed(updates: Sequence[Mapping[str, torch.Tensor]]) -> TensorDict:
    """Σ_i Δ_i, tensor by tensor (every update has the same keys)."""
    return {k: torch.stack([u[k] for u in updates]).sum(0) for k in updates[0]}


def noised_mean(
    total: Mapping[str, torch.Tensor],
    clip_norm: float,
    noise_multiplier: float,
    clients: int,
    source: torch.Generator,
) -> TensorDict:
    """(Σ clipped updates + N(0, (z·C)² I)) / m, drawn in sorted key order."""
    keys = sorted(total)
    mean = noisy_mean([total[k] for k in keys], clip_norm, noise_multiplier, clients, source)
    return dict(zip(keys, mean, strict=True))


def noised_fraction(
    unclipped: int, count_stddev: float, clients: int, source: torch.Generator
) -> float:
    """b̄ = (Σ b_i + N(0, σ_b²)) / m."""
    (noise,) = gaussian_noise([torch.zeros(())], count_stddev, source)
    return (unclipped + float(noise)) / clients


def next_clip_norm(
    clip_norm: float, fraction: float, target_quantile: float, learning_rate: float
) -> float:
    """C·exp(−η(b̄ − γ)): shrink while more than γ of the updates fit, grow otherwise."""
    return clip_norm * math.exp(-learning_rate * (fraction - target_quantile))


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2): the updates' share of a total budget of z (needs
    2σ_b > z; z = 0, no noise, stays 0)."""
    if noise_multiplier == 0:
        return 0.0
    remaining = noise_multiplier**-2 - (2 * count_stddev) ** -2
    if remaining <= 0:
        raise ValueError(
            f"clipped_count_stddev {count_stddev:g} leaves no budget for the updates at noise "
            f"multiplier {noise_multiplier:g}: it must exceed noise_multiplier / 2"
        )
    return remaining**-0.5


@dataclass(frozen=True)
class AdaptiveClipping:
    target_quantile: float
    learning_rate: float
    count_stddev: float


class CentralDP:
    """The server's private mean of updates; its clip norm (adaptive) is checkpointed state."""

    def __init__(
        self,
        clip_norm: float,
        noise_multiplier: float,
        clients: int,
        seeds: NoiseSeeds,
        adaptive: AdaptiveClipping | None = None,
    ):
        self.clip_norm = clip_norm
        self.noise_multiplier = noise_multiplier
        self.clients = clients  # m: the fixed denominator
        self.seeds = seeds  # the server's noise: derived from the run seed, or secret
        self.adaptive = adaptive
        self.update_multiplier = (
            update_noise_multiplier(noise_multiplier, adaptive.count_stddev)
            if adaptive
            else noise_multiplier
        )
        self.released: dict[int, dict[str, float]] = {}  # per round: what the metrics show

    def mean_update(self, round_index: int, updates: Sequence[Mapping[str, torch.Tensor]]):
        """Δ̄ of this round's updates, each clipped here at the server, then the next round's
        clip norm (adaptive)."""
        clipped, bits = zip(*(clip_update(u, self.clip_norm) for u in updates), strict=True)
        return self.release(round_index, summed(clipped), sum(bits))

    def release(self, round_index: int, total: Mapping[str, torch.Tensor], unclipped: int):
        """Δ̄ from Σ_i Δ̃_i (updates clipped to the current ``clip_norm``) and Σ_i b_i alone, the
        only two things the server needs (and, under secure aggregation, the only two it sees);
        then the next round's clip norm (adaptive)."""
        used = self.clip_norm
        source = generator(self.seeds.seed(round_index, UPDATE_STREAM))
        mean = noised_mean(total, used, self.update_multiplier, self.clients, source)
        released = {"clip_norm": used}
        if self.adaptive is not None:
            counts = generator(self.seeds.seed(round_index, COUNT_STREAM))
            fraction = noised_fraction(unclipped, self.adaptive.count_stddev, self.clients, counts)
            self.clip_norm = next_clip_norm(
                used, fraction, self.adaptive.target_quantile, self.adaptive.learning_rate
            )
            released["unclipped_fraction"] = fraction
        self.released[round_index] = released
        return mean

    def state(self) -> dict[str, float]:
        return {"clip_norm": self.clip_norm}

    def load_state(self, state: Mapping[str, float]) -> None:
        self.clip_norm = float(state["clip_norm"])
