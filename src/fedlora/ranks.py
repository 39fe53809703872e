"""Per-client LoRA ranks (the ``[ranks]`` section): who can afford which rank.

Heterogeneous-rank methods (FlexLoRA, HetLoRA, FLoRA, FSLoRA's budgets k_i) read one rank per
client; the shared PEFT slots are built at ``lora.rank`` (the maximum) and a rank-r_i client
trains zero-padded factors inside them (``fedlora.lora.pad_factors``). The draw is seeded, so a
config gives the same ranks on every machine and after a resume.
"""

from __future__ import annotations

from math import erf, sqrt

import numpy as np

from fedlora.config import Config, ConfigError
from fedlora.training import derived_seed


def profile_probabilities(profile: str, count: int) -> np.ndarray:
    """Probabilities over ``count`` ascending rank values.

    ``heavy_tail`` generalises FlexLoRA's 80% Type_0 (r8) / 5% r30 / 5% attn30-FFN200 / 10% r200:
    with four values it is exactly [0.8, 0.05, 0.05, 0.1] in ascending rank order. ``normal`` is
    FlexLoRA's rounded N(1.5, 0.7) over four positions, scaled to ``count`` positions.
    """
    if count == 1:
        return np.ones(1)
    if profile == "uniform":
        return np.full(count, 1.0 / count)
    if profile == "heavy_tail":
        probabilities = np.zeros(count)
        probabilities[0], probabilities[-1] = 0.8, 0.1
        middle = count - 2
        if middle:
            probabilities[1:-1] = 0.1 / middle
        else:
            probabilities[-1] = 0.2
        return probabilities
    if profile == "normal":
        # P(round(x) = j), x ~ N(mean, sd) clipped to [0, count-1] (tails go to the ends).
        mean, sd = (count - 1) / 2, 0.7 * (count - 1) / 3
        cdf = [
            0.5 * (1 + erf((edge - mean) / (sd * sqrt(2)))) for edge in np.arange(count - 1) + 0.5
        ]
        return np.diff([0.0, *cdf, 1.0])
    raise ValueError(f"unknown rank profile {profile!r}")


def client_ranks(config: Config, num_clients: int) -> list[int]:
    """One LoRA rank per client, seeded by ``ranks.seed`` (default: the run seed)."""
    ranks, slot_rank = config.ranks, config.lora.rank
    if ranks.profile == "homo":
        return [slot_rank] * num_clients
    values = sorted(set(ranks.values))
    if values[0] < 1 or values[-1] > slot_rank:
        raise ConfigError(
            f"ranks.values {ranks.values} must lie in [1, lora.rank = {slot_rank}] "
            "(lora.rank is the slot, i.e. maximum, rank)"
        )
    seed = ranks.seed if ranks.seed is not None else config.experiment.seed
    rng = np.random.default_rng(derived_seed(seed, 0x4A4B))
    picks = rng.choice(
        len(values), size=num_clients, p=profile_probabilities(ranks.profile, len(values))
    )
    return [values[int(i)] for i in picks]
