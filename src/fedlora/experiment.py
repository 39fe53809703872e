"""Build every piece of a run from a validated config, checking what the schema cannot
(known method, model, dataset, a partition that fits the data) before any training starts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from fedlora.adapters import AdapterSlots
from fedlora.compute import Compute
from fedlora.config import Config, ConfigError
from fedlora.data.chat import Rendering
from fedlora.data.partition import label_histograms, own_test_shares, partition
from fedlora.data.sources import SplitData, load_split
from fedlora.data.token_cache import tokenize_cached
from fedlora.data.tokenized import TokenizedSet
from fedlora.evaluation import Evaluator
from fedlora.methods import build_method, method_class
from fedlora.methods.base import Method, MethodContext
from fedlora.models import (
    ENCODERS,
    ModelSpec,
    check_targets,
    load_base_model,
    load_tokenizer,
    model_spec,
    place_base,
)
from fedlora.nf4 import quantize_nf4
from fedlora.preflight import preflight
from fedlora.privacy.budget import PrivacyBudget
from fedlora.privacy.plan import central_of, dp_sgd_of, plan_privacy
from fedlora.ranks import client_ranks
from fedlora.training import LocalTrainer, derived_seed

OWN_TEST_STREAM = 0x0575  # the shuffle that cuts the clients' own test shares


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
    privacy: PrivacyBudget | None = None  # [privacy] with a mechanism
    own_tests: list[TokenizedSet] | None = None  # eval.own_test_share: each client's share

    def own_test(self, client: int) -> TokenizedSet | None:
        """Client ``client``'s own share of the test set (``eval.own_test_share``), if it has
        one with rows."""
        share = self.own_tests[client] if self.own_tests is not None else None
        return share if share is not None and len(share) > 0 else None

    @property
    def withholds_client_stats(self) -> bool:
        """Under DP, clients keep their loss and example counts (``privacy.client_stats``)."""
        privacy = self.config.privacy
        return privacy.mechanism != "none" and not privacy.client_stats


def compile_in_place(model: torch.nn.Module) -> None:
    """``torch.compile`` of the model's forward, lazily: dynamo traces on the first call,
    after the adapters exist, and loading a client's state copies into the same parameters,
    so clients share the compiled graphs. Inductor draws dropout masks from the eager RNG
    (``fallback_random``), so a compiled run trains on the masks of the eager one and differs
    only by float reassociation, and the same seed still gives the same numbers."""
    import torch._inductor.config as inductor

    inductor.fallback_random = True
    model.compile()


def validate(config: Config) -> Compute:
    """Every check that can run before training: the quick ones first (``preflight``), then
    the model's (its name, its LoRA targets). Returns where the run computes."""
    compute = preflight(config)
    model_spec(config.model.name)
    check_targets(config.model.name, config.lora.target_modules)
    return compute


def tokenize_splits(
    split: SplitData,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    causal: bool,
    rendering: Rendering,
) -> tuple[SplitData, dict[str, TokenizedSet]]:
    """Each split's tokens; records too long for ``max_length`` under the truncation rule are
    dropped from the data and its tokens alike (and counted in ``SplitData.dropped``), before
    any partitioning, so that client row indices point at kept records."""
    sets: dict[str, TokenizedSet] = {}
    for name in ("train", "test", "validation"):
        table = getattr(split, name)
        if table is None:
            continue
        tokens = tokenize_cached(table, tokenizer, max_length, causal, rendering)
        unfit = tokens.unfit_rows()
        if len(unfit) == len(table):
            raise ConfigError(
                f"model.max_length {max_length}: no {name} record fits (data.truncation = "
                f"{rendering.truncation!r}); raise model.max_length"
            )
        if unfit:
            split, gone = split.without(name, unfit), set(unfit)
            tokens = tokens.select([r for r in range(len(tokens)) if r not in gone])
        sets[name] = tokens
    return split, sets


def build(config: Config, deployed: bool = False) -> Experiment:
    """Everything a run needs, built once; ``deployed``: the parties are separate processes
    (``--engine distributed``, Flower), which ``privacy.noise_source = "auto"`` reads."""
    compute = validate(config)
    cls = method_class(config.method.name)
    spec = model_spec(config.model.name)
    causal = spec.task == "causal"
    split = load_split(config.data, needs_answers=causal)
    tokenizer = load_tokenizer(config.model.name)
    rendering = Rendering(config.data.chat_template, config.data.truncation)
    split, sets = tokenize_splits(split, tokenizer, config.model.max_length, causal, rendering)
    num_classes = len(split.label_names)
    if cls.pooled_data:
        clients = [list(range(len(split.train)))]
    else:
        clients = partition(split.train, config.partition, num_classes, config.experiment.seed)
    histograms = label_histograms(list(split.train["label"]), clients, num_classes)
    train_set, test_set, validation_set = sets["train"], sets["test"], sets.get("validation")
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
    if compute.compile:
        compile_in_place(slots.model)

    sizes = [len(rows) for rows in clients]
    plan = plan_privacy(config, sizes, deployed)
    central = central_of(plan, config)
    context = MethodContext(
        config=config,
        modules=slots.modules,
        initial=slots.read(),
        num_examples=sizes,
        ranks=client_ranks(config, len(clients)),
        central=None if config.privacy.secure_aggregation else central,  # see secure_round
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
        dp_sgd_of(plan, config, causal_attention=base.config.model_type not in ENCODERS),
    )
    evaluator = Evaluator(slots, test_set, tokenizer, config.eval, compute, validation_set)
    own_tests = (
        own_test_sets(config, split, clients, test_set)
        if config.eval.own_test_share and cls.per_client_eval
        else None
    )
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
        PrivacyBudget(plan, central) if plan is not None else None,
        own_tests,
    )


def own_test_sets(
    config: Config, split: SplitData, clients: list[list[int]], test_set: TokenizedSet
) -> list[TokenizedSet]:
    """Each client's own share of the test set (``own_test_shares``), by the key the training
    data was partitioned by: the ``natural`` partition's column, else the label."""
    natural = config.partition.kind == "natural"
    key = (config.partition.column or "label") if natural else "label"
    if key not in split.test.column_names:
        raise ConfigError(
            f"eval.own_test_share: the test data has no column {key!r} to cut the clients' "
            "shares by; add it to the test records or set eval.own_test_share = false"
        )
    seed = derived_seed(config.experiment.seed, OWN_TEST_STREAM)
    shares = own_test_shares(list(split.train[key]), clients, list(split.test[key]), seed)
    return [test_set.select(rows) for rows in shares]
