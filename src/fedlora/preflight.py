"""The checks of a config that need no model, no data and nothing heavier than torch, run
before anything is loaded: a mistake is answered in about a second, not after the whole
transformers/peft stack has been imported."""

from __future__ import annotations

from fedlora import compute as computes
from fedlora.compute import Compute
from fedlora.config import Config, ConfigError
from fedlora.methods import method_class, method_options, registry
from fedlora.privacy.refusals import check_privacy
from fedlora.ranks import client_ranks


def preflight(config: Config) -> Compute:
    """Method and options, device and dtype, ranks, 4-bit compatibility, robust aggregation,
    attackers and privacy; returns where the run computes."""
    method_options(config.method)
    compute = computes.resolve(config.compute)
    cls = method_class(config.method.name)
    if config.ranks.profile != "homo" and not cls.heterogeneous_ranks:
        raise ConfigError(
            f"ranks.profile {config.ranks.profile!r}: method {config.method.name!r} trains every "
            "client at lora.rank; use a heterogeneous-rank method or profile 'homo'"
        )
    client_ranks(config, 1)  # range check of ranks.values against lora.rank
    if config.model.quantize_4bit and cls.full_weights:
        raise ConfigError(
            f"model.quantize_4bit: method {config.method.name!r} fine-tunes the full target "
            "weights, which cannot be 4-bit; use quantize_4bit = false"
        )
    check_reliability(config)
    check_privacy(config)
    return compute


def check_reliability(config: Config) -> None:
    """Robust aggregators need a mean of replies; attackers must be clients of the run."""
    aggregator = config.federation.aggregator
    cls = method_class(config.method.name)
    if aggregator != "mean" and not cls.mean_of_replies:
        able = ", ".join(name for name, c in registry().items() if c.mean_of_replies)
        raise ConfigError(
            f"federation.aggregator {aggregator!r}: method {config.method.name!r} does not "
            f"aggregate by a mean of replies (its server step is its own); methods that "
            f"support robust aggregation: {able}"
        )
    federation, defaults = config.federation, type(config.federation)()
    faults = [
        f"federation.{name}"
        for name in ("dropout", "min_replies", "deadline_steps")
        if getattr(federation, name) != getattr(defaults, name)
    ] + (["attack.clients"] if config.attack.clients else [])
    if faults and cls.engine != "simulation":
        raise ConfigError(
            f"{', '.join(faults)}: method {config.method.name!r} runs on the {cls.engine!r} "
            "engine; simulated faults and attackers apply to server-based methods"
        )
    clients = 1 if cls.pooled_data else config.partition.num_clients
    outside = [c for c in config.attack.clients if not 0 <= c < clients]
    if outside:
        raise ConfigError(f"attack.clients {outside}: the run has clients 0..{clients - 1}")
