"""What a privacy mechanism cannot be combined with, refused at config time with the reason
(called by ``fedlora.preflight``: nothing heavier than the method classes is imported)."""

from __future__ import annotations

from fedlora.config import Config, ConfigError
from fedlora.methods import method_class, method_options, registry
from fedlora.privacy.settings import check_adaptive

DP_SGD = "privacy.mechanism 'dp_sgd'"
CENTRAL = "privacy.mechanism 'central'"


def check_privacy(config: Config) -> None:
    mechanism = config.privacy.mechanism
    if mechanism == "dp_sgd":
        check_dp_sgd(config)
    elif mechanism == "central":
        check_central(config)


def check_dp_sgd(config: Config) -> None:
    cls = method_class(config.method.name)
    if cls.engine == "split":
        raise ConfigError(
            f"{DP_SGD}: method {config.method.name!r} trains through the cloud-edge split, "
            "where the edge receives one gradient of the cloud activations per batch, not per "
            "example; per-example clipping cannot cross the split"
        )
    refused = {
        "train.max_grad_norm": (
            config.train.max_grad_norm is not None,
            "DP-SGD already clips each example's gradient to privacy.clip_norm; a second clip "
            "of the noised mean is redundant, unset it",
        ),
        "compute.dtype 'float16'": (
            config.compute.dtype == "float16",
            "per-example gradients are not loss-scaled; use bfloat16 or float32",
        ),
        "compute.gradient_checkpointing": (
            config.compute.gradient_checkpointing,
            "recomputation in backward cannot run inside torch.func's vmap; turn it off",
        ),
        "model.quantize_4bit": (
            config.model.quantize_4bit,
            "bitsandbytes' 4-bit matmul has no torch.func (vmap) support; use a float base",
        ),
    }
    for key, (applies, reason) in refused.items():
        if applies:
            raise ConfigError(f"{DP_SGD} with {key}: {reason}")


def check_central(config: Config) -> None:
    name = config.method.name
    cls = method_class(name)
    if not cls.mean_of_replies:
        able = ", ".join(
            n for n, c in registry().items() if c.mean_of_replies and not c.pooled_data
        )
        raise ConfigError(
            f"{CENTRAL}: method {name!r} does not aggregate by a mean of client updates (its "
            "server step is its own), so one client's influence on it has no bound to clip and "
            f"noise; methods with central DP: {able}"
        )
    if cls.pooled_data:
        raise ConfigError(
            f"{CENTRAL}: method {name!r} pools all data in one party; user-level DP needs "
            "several clients (use mechanism 'dp_sgd' for example-level DP)"
        )
    if reason := cls.central_dp_refusal(method_options(config.method)):
        raise ConfigError(f"{CENTRAL}: method {name!r}: {reason}")
    federation = config.federation
    if federation.aggregator != "mean":
        raise ConfigError(
            f"{CENTRAL} with federation.aggregator {federation.aggregator!r}: central DP clips "
            "and averages the updates itself (a robust rule would change its sensitivity); use "
            "'mean'"
        )
    if federation.weighting != "uniform":
        raise ConfigError(
            f"{CENTRAL} with federation.weighting {federation.weighting!r}: the noised mean "
            "weighs clients uniformly (a size-weighted mean's sensitivity is max_i p_i·C and "
            "the sizes are private); set federation.weighting = 'uniform'"
        )
    if config.privacy.sampling != "poisson":
        raise ConfigError(
            f"{CENTRAL} with privacy.sampling {config.privacy.sampling!r}: sampling is DP-SGD's "
            "choice of examples; central DP's sample is the server's draw of clients "
            "(federation.clients_per_round)"
        )
    noise = config.privacy.noise_multiplier
    if noise is not None:  # a solved one is checked once solved (fedlora.privacy.plan)
        check_adaptive(config, noise)
