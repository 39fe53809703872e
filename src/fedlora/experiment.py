"""Build every piece of a run from a validated config, checking what the schema cannot
(known method, model, dataset, a partition that fits the data) before any training starts."""

from __future__ import annotations

from dataclasses import dataclass

from fedlora.adapters import AdapterSlots
from fedlora.config import Config, ConfigError
from fedlora.data.partition import label_histograms, partition
from fedlora.data.sources import SplitData, load_split
from fedlora.data.tokenized import TokenizedSet, tokenize
from fedlora.evaluation import Evaluator
from fedlora.methods import build_method, method_class, method_options
from fedlora.methods.base import Method, MethodContext
from fedlora.models import ModelSpec, load_base_model, load_tokenizer, model_spec
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


def validate(config: Config) -> None:
    """Cheap checks first, so a typo fails in milliseconds rather than after model loading."""
    method_options(config.method)
    model_spec(config.model.name)
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


def build(config: Config) -> Experiment:
    validate(config)
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
    base = load_base_model(config.model.name, num_classes, tokenizer, seed=config.experiment.seed)
    if config.model.quantize_4bit:
        quantize_nf4(base, spec.head)
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
    )
    evaluator = Evaluator(slots, test_set, tokenizer, config.eval)
    return Experiment(
        config, spec, split, clients, histograms, slots, train_set, method, trainer, evaluator
    )
