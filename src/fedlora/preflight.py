"""The checks of a config that need no model and no data, run before anything is loaded: a
mistake is answered in well under a second, not after the whole torch/transformers/peft stack
has been imported. ``check_config`` needs no torch at all (the method modules import it lazily,
``fedlora.lazy``); only asking the machine for its devices (``preflight``) loads torch."""

from __future__ import annotations

from fedlora import compute as computes
from fedlora.compute import Compute
from fedlora.config import Config, ConfigError
from fedlora.methods import method_class, method_options, registry
from fedlora.ranks import client_ranks


def preflight(config: Config) -> Compute:
    """``check_config``, then device and dtype against this machine; returns where the run
    computes."""
    check_config(config)
    return computes.resolve(config.compute)


def check_config(config: Config) -> None:
    """Method and options, ranks, 4-bit compatibility, robust aggregation and attackers."""
    method_options(config.method)
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
