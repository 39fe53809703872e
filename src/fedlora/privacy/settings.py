"""Numbers of the ``[privacy]`` table that follow from the config alone (no data, no accountant),
shared by the config-time checks and the plan."""

from __future__ import annotations

from fedlora.config import Config, ConfigError, round_size
from fedlora.privacy.central import update_noise_multiplier


def expected_clients(config: Config) -> int:
    """m: the clients a round samples (central DP's fixed denominator)."""
    federation = config.federation
    return round_size(
        config.partition.num_clients, federation.clients_per_round, federation.fraction
    )


def count_stddev(config: Config) -> float:
    """σ_b: ``clipped_count_stddev``, or m/20 (Andrew et al.; Flower's default)."""
    given = config.privacy.clipped_count_stddev
    return given if given is not None else expected_clients(config) / 20


def check_adaptive(config: Config, noise_multiplier: float) -> None:
    """Adaptive clipping must leave the updates a share of the noise (2σ_b > z)."""
    if not config.privacy.adaptive_clipping:
        return
    try:
        update_noise_multiplier(noise_multiplier, count_stddev(config))
    except ValueError as error:
        raise ConfigError(f"privacy.adaptive_clipping: {error}") from None
