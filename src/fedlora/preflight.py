"""The checks of a config that need no model and no data, run before anything is loaded: a
mistake is answered in well under a second, not after the whole torch/transformers/peft stack
has been imported. ``check_config`` needs no torch at all (the method modules import it lazily,
``fedlora.lazy``); only asking the machine for its devices (``preflight``) loads torch."""

from __future__ import annotations

from fedlora import compute as computes
from fedlora.compute import Compute
from fedlora.config import Config, ConfigError, round_size
from fedlora.extras import require
from fedlora.methods import method_class, method_options, registry
from fedlora.privacy.refusals import check_privacy
from fedlora.ranks import client_ranks


def preflight(config: Config) -> Compute:
    """``check_config``, then device and dtype against this machine; returns where the run
    computes."""
    check_config(config)
    compute = computes.resolve(config.compute)
    check_workers(config, compute.device.type)
    return compute


def check_config(config: Config) -> None:
    """Method and options, ranks, 4-bit compatibility, robust aggregation, attackers, secure
    aggregation, and lm-eval tasks (which alone load transformers and lm-eval's task index)."""
    method_options(config.method)
    cls = method_class(config.method.name)
    if config.ranks.profile != "homo" and not cls.heterogeneous_ranks:
        raise ConfigError(
            f"ranks.profile {config.ranks.profile!r}: method {config.method.name!r} trains every "
            "client at lora.rank; use a heterogeneous-rank method or profile 'homo'"
        )
    client_ranks(config, 1)  # range check of ranks.values against lora.rank
    if config.eval.own_test_share and not cls.per_client_eval:
        raise ConfigError(
            f"eval.own_test_share: method {config.method.name!r} evaluates one global model; "
            "a client's own test share needs a method that evaluates each client's own model "
            "(fedsa, feddpa, local, declora, dlora)"
        )
    if config.model.quantize_4bit and cls.full_weights:
        raise ConfigError(
            f"model.quantize_4bit: method {config.method.name!r} fine-tunes the full target "
            "weights, which cannot be 4-bit; use quantize_4bit = false"
        )
    check_reliability(config)
    check_secure_aggregation(config)
    check_privacy(config)
    check_extras(config)
    if config.eval.lm_eval_tasks:  # the model's task and lm-eval's index: transformers, lm-eval
        from fedlora.harness import check_run_tasks

        check_run_tasks(config)


def check_extras(config: Config) -> None:
    """Every optional part the config asks for is installed (``fedlora.extras``)."""
    if config.privacy.mechanism != "none":
        require("dp_accounting", "privacy", f"privacy.mechanism {config.privacy.mechanism!r}")
    if config.eval.lm_eval_tasks:
        require("lm_eval", "eval", "eval.lm_eval_tasks")
    for tracker in ("tensorboard", "mlflow", "wandb"):
        if getattr(config.log, tracker):
            require(tracker, "trackers", f"log.{tracker} = true")


def check_workers(config: Config, device: str) -> None:
    """What clients trained by worker processes (``compute.workers`` > 1) cannot run. ``auto``
    never fails here: it takes one process where the pool cannot run (``pool_refusal``)."""
    workers = config.compute.workers
    if workers == "auto" or workers == 1:
        return
    refusal = pool_refusal(config, device)
    if refusal is not None:
        raise ConfigError(f"compute.workers = {workers}: {refusal}; set workers = 1")


def pool_refusal(config: Config, device: str) -> str | None:
    """Why a round's clients cannot be trained by worker processes, or None if they can."""
    from fedlora.engines.capabilities import placement_refusal

    refusal = placement_refusal(config, "pool")
    if refusal is None and device != "cpu":
        return (
            "worker processes share out the CPU's cores; on "
            f"{device} the clients share one accelerator in one process"
        )
    return refusal


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


def check_secure_aggregation(config: Config) -> None:
    """Secure aggregation shows the server only the weighted sum of a round's replies: the
    method's server step must need nothing else, the aggregator must be the plain mean, and a
    round must have at least two clients and at least ``privacy.threshold``."""
    if not config.privacy.secure_aggregation:
        if config.federation.dropout_after_masking > 0:
            raise ConfigError(
                "federation.dropout_after_masking drops clients between two steps of secure "
                "aggregation's protocol; set privacy.secure_aggregation = true, or use "
                "federation.dropout"
            )
        return
    name, cls = config.method.name, method_class(config.method.name)
    prefix = f"privacy.secure_aggregation: method {name!r}"
    if cls.engine != "simulation":
        raise ConfigError(f"{prefix} runs on the {cls.engine!r} engine: no server sums replies")
    if not cls.communicates:
        raise ConfigError(f"{prefix} sends nothing, so there is no sum to protect")
    if cls.needs_each_reply:
        able = ", ".join(
            n
            for n, c in registry().items()
            if not c.needs_each_reply and c.communicates and c.engine == "simulation"
        )
        raise ConfigError(
            f"{prefix} cannot run on the sum of the replies alone: {cls.needs_each_reply}; "
            f"methods that support secure aggregation: {able}"
        )
    aggregator = config.federation.aggregator
    if aggregator != "mean":
        raise ConfigError(
            f"federation.aggregator {aggregator!r} needs each client's reply, which secure "
            "aggregation hides from the server; use aggregator = 'mean'"
        )
    federation = config.federation
    clients = round_size(
        config.partition.num_clients, federation.clients_per_round, federation.fraction
    )
    if clients < 2:
        raise ConfigError(
            f"privacy.secure_aggregation: a round has {clients} client, and the sum of one reply "
            "is that reply; sample at least 2 clients a round"
        )
    threshold = config.privacy.threshold
    if threshold is not None and threshold > clients:
        raise ConfigError(
            f"privacy.threshold {threshold} exceeds the {clients} clients of a round, so no "
            f"round could recover its sum; use at most {clients}"
        )
