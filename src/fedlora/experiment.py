"""Build every piece of a run from a validated config, checking what the schema cannot
(known method, model, dataset, a partition that fits the data) before any training starts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedlora import compute as computes
from fedlora.adapters import AdapterSlots
from fedlora.compute import Compute
from fedlora.config import Config, ConfigError
from fedlora.data.partition import label_histograms, partition
from fedlora.data.sources import SplitData, load_split
from fedlora.data.tokenized import TokenizedSet, tokenize
from fedlora.evaluation import Evaluator
from fedlora.methods import build_method, method_class, method_options, registry
from fedlora.methods.base import Method, MethodContext
from fedlora.models import (
    ModelSpec,
    check_targets,
    load_base_model,
    load_tokenizer,
    model_spec,
    place_base,
)
from fedlora.nf4 import quantize_nf4
from fedlora.ranks import client_ranks
from fedlora.training import LocalTrainer, derived_seed


@dataclass
class Experiment:
    config: Config
    spec: ModelSpec
    split: SplitData
    clients: list[list[int]]  # training rows per client
    histograms: list[list[int]]
    slots: AdapterSlots
    train_set: TokenizedSet
    method: Method
    trainer: LocalTrainer
    evaluator: Evaluator
    compute: Compute


def validate(config: Config) -> Compute:
    """Cheap checks first, so a typo fails in milliseconds rather than after model loading.
    Returns where the run computes (a device the machine lacks is refused here)."""
    method_options(config.method)
    compute = computes.resolve(config.compute)
    model_spec(config.model.name)
    check_targets(config.model.name, config.lora.target_modules)
    if config.ranks.profile != "homo" and not method_class(config.method.name).heterogeneous_ranks:
        raise ConfigError(
            f"ranks.profile {config.ranks.profile!r}: method {config.method.name!r} trains every "
            "client at lora.rank; use a heterogeneous-rank method or profile 'homo'"
        )
    client_ranks(config, 1)  # range check of ranks.values against lora.rank
    if config.model.quantize_4bit and method_class(config.method.name).full_weights:
        raise ConfigError(
            f"model.quantize_4bit: method {config.method.name!r} fine-tunes the full target "
            "weights, which cannot be 4-bit; use quantize_4bit = false"
        )
    check_reliability(config)
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
    clients = 1 if cls.pooled_data else config.partition.num_clients
    outside = [c for c in config.attack.clients if not 0 <= c < clients]
    if outside:
        raise ConfigError(f"attack.clients {outside}: the run has clients 0..{clients - 1}")


def build(config: Config) -> Experiment:
    compute = validate(config)
    cls = method_class(config.method.name)
    spec = model_spec(config.model.name)
    split = load_split(config.data, needs_answers=spec.task == "causal")
    num_classes = len(split.label_names)
    if cls.pooled_data:
        clients = [list(range(len(split.train)))]
    else:
        clients = partition(split.train, config.partition, num_classes, config.experiment.seed)
    histograms = label_histograms(list(split.train["label"]), clients, num_classes)

    tokenizer = load_tokenizer(config.model.name)
    causal = spec.task == "causal"
    train_set = tokenize(split.train, tokenizer, config.model.max_length, causal)
    test_set = tokenize(split.test, tokenizer, config.model.max_length, causal)
    quantized = config.model.quantize_4bit
    storage = compute.dtype if compute.stores_base_in_dtype and not quantized else None
    base = load_base_model(
        config.model.name, num_classes, tokenizer, config.experiment.seed, storage or torch.float32
    )
    if quantized:
        quantize_nf4(base, spec.head, compute)
    place_base(base, compute, quantized)
    init_seed = (
        config.lora.init_seed if config.lora.init_seed is not None else config.experiment.seed
    )
    slots = AdapterSlots(
        base, spec, config.lora, derived_seed(init_seed, 0xA0), full_weights=cls.full_weights
    )

    context = MethodContext(
        config=config,
        modules=slots.modules,
        initial=slots.read(),
        num_examples=[len(rows) for rows in clients],
        ranks=client_ranks(config, len(clients)),
    )
    method = build_method(config.method, context)
    trainer = LocalTrainer(
        slots,
        train_set,
        config.train,
        config.experiment.seed,
        config.experiment.rounds,
        method.local_optimizer,
        compute,
    )
    evaluator = Evaluator(slots, test_set, tokenizer, config.eval, compute)
    return Experiment(
        config,
        spec,
        split,
        clients,
        histograms,
        slots,
        train_set,
        method,
        trainer,
        evaluator,
        compute,
    )
