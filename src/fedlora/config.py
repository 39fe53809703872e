"""One schema for every experiment: TOML in, validated pydantic model out.

Every section forbids unknown keys, so a typo stops the run before any training with a message
that names the key. Method-specific options live in ``[method]`` next to ``name`` and are
validated by the chosen method's own ``Options`` model (see ``fedlora.methods``), so adding a
method never touches this file.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A user mistake in a config file or override: shown as one message, never a traceback."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExperimentConfig(Section):
    name: str = "experiment"
    seed: int = 0
    rounds: int = Field(10, ge=1)


class ModelConfig(Section):
    name: str = Field(
        "minilm-l6",
        description="minilm-l6, smollm2-135m, tiny-bert, tiny-llama, or a local HF directory",
    )
    max_length: int = Field(128, ge=8, le=4096)
    quantize_4bit: bool = Field(
        False, description="NF4 frozen base (bitsandbytes, fp32 compute; linears need in % 64 == 0)"
    )


class LoraConfig(Section):
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(None, description="None: the model's default")
    train_head: bool = Field(True, description="train and communicate the classifier head")
    init_seed: int | None = Field(None, description="seed of the common A init; None: the run seed")
    rslora: bool = Field(
        False, description="scale s = alpha/sqrt(r) (rsLoRA) instead of alpha/r (§1.1)"
    )


PartitionKind = Literal[
    "iid", "dirichlet", "fslora_dirichlet", "shards", "proportions", "quantity", "natural"
]


DataFormat = Literal["auto", "text", "alpaca", "messages", "prompt_completion", "multiple_choice"]


class DataConfig(Section):
    dataset: str = Field(
        "bbc-news",
        description="bbc-news, bbc-news-mc, chatterbot, a .jsonl/.json/.csv/.parquet path, or a "
        "hub dataset id",
    )
    format: DataFormat = Field(
        "auto",
        description="record format (causal LMs): auto (the built-in's own; a file's from its "
        "columns), text, alpaca, messages, prompt_completion, multiple_choice",
    )
    text_column: str = "text"
    label_column: str = "label"
    answer_column: str = Field("answer", description="text: the answer; multiple_choice: the key")
    instruction_column: str = "instruction"
    input_column: str = Field("input", description="alpaca: optional context of the instruction")
    output_column: str = "output"
    messages_column: str = Field("messages", description="messages: the list of turns")
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    question_column: str = "question"
    choices_column: str = "choices"
    list_choices: bool = Field(
        True, description="multiple_choice: the prompt lists the choices under the question"
    )
    chat_template: Literal["auto", "none"] = Field(
        "auto", description="auto: the tokenizer's chat template if it has one; none: the plain one"
    )
    truncation: Literal["left", "drop"] = Field(
        "left",
        description="a record longer than model.max_length: left (cut its oldest tokens; dropped "
        "if its last answer does not fit whole) or drop",
    )
    subset: str | None = Field(None, description="hub dataset: its configuration (subset) name")
    split: str = Field("train", description="hub dataset: the split to read")
    revision: str | None = Field(None, description="hub dataset: a branch, tag or commit")
    test_fraction: float = Field(0.2, gt=0, lt=1)
    validation_fraction: float = Field(
        0.0, ge=0, lt=1, description="share of the training data held out for validation; 0: none"
    )
    test_file: str | None = Field(None, description="a given test split (same columns)")
    validation_file: str | None = Field(None, description="a given validation split")
    max_train_examples: int | None = Field(None, ge=1)
    max_test_examples: int | None = Field(None, ge=1)
    max_validation_examples: int | None = Field(None, ge=1)
    split_seed: int = 1234

    @model_validator(mode="after")
    def _one_validation_source(self) -> DataConfig:
        if self.validation_file is not None and self.validation_fraction > 0:
            raise ValueError(
                "set either validation_file (a given split) or validation_fraction (one carved "
                "from the training data), not both"
            )
        return self

    @property
    def has_validation(self) -> bool:
        return self.validation_file is not None or self.validation_fraction > 0


class PartitionConfig(Section):
    kind: PartitionKind = "dirichlet"
    num_clients: int = Field(10, ge=1)
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration")
    min_client_size: int = Field(
        2, ge=0, description="dirichlet: resample until every client has this many"
    )
    shards_per_client: int = Field(2, ge=1, description="shards: classes (shards) per client")
    proportions: list[list[float]] | None = Field(
        None, description="proportions: one row of class proportions per client"
    )
    quantity: Literal["linear", "square", "exponential"] = "linear"
    column: str | None = Field(None, description="natural: the column that names the client")


Aggregator = Literal["mean", "median", "trimmed_mean", "norm_clip"]


class FederationConfig(Section):
    clients_per_round: int | None = Field(None, ge=1, description="None: all clients")
    fraction: float | None = Field(None, gt=0, le=1, description="alternative to clients_per_round")
    weighting: Literal["size", "uniform"] = "size"
    dropout: float = Field(
        0.0, ge=0, lt=1, description="probability a sampled client fails to reply (seeded)"
    )
    min_replies: int = Field(1, ge=1, description="fewer accepted replies: the round is skipped")
    deadline_steps: int | None = Field(
        None, ge=1, description="local steps a client may run per round (simulated deadline)"
    )
    stragglers: Literal["cut", "drop"] = Field(
        "cut", description="a client needing more steps than the deadline: cut short or dropped"
    )
    aggregator: Aggregator = Field("mean", description="mean, median, trimmed_mean, norm_clip")
    trim_fraction: float = Field(
        0.1, ge=0, lt=0.5, description="trimmed_mean: share cut from each end, per coordinate"
    )
    clip_norm: float | None = Field(
        None, gt=0, description="norm_clip: bound on each client's update norm"
    )
    max_message_bytes: int = Field(
        16 * 2**30, ge=1, description="largest message a party accepts (bytes)"
    )

    @model_validator(mode="after")
    def _one_sampling_rule(self) -> FederationConfig:
        if self.clients_per_round is not None and self.fraction is not None:
            raise ValueError("set either clients_per_round or fraction, not both")
        if self.aggregator == "norm_clip" and self.clip_norm is None:
            raise ValueError("aggregator 'norm_clip' needs clip_norm")
        return self


def round_size(num_clients: int, per_round: int | None, fraction: float | None) -> int:
    """How many of ``num_clients`` clients a round samples (``federation.clients_per_round``
    or ``fraction``; all if neither)."""
    if per_round is not None:
        return min(per_round, num_clients)
    if fraction is not None:
        return min(max(1, round(fraction * num_clients)), num_clients)
    return num_clients


class AttackConfig(Section):
    """Simulated adversarial clients (tests and robustness studies): each listed client
    tampers with its reply before sending it."""

    clients: list[int] = Field([], description="indices of the attacking clients")
    kind: Literal["scale", "noise", "sign_flip", "nan", "wrong_shape"] = "scale"
    factor: float = Field(10.0, description="scale: the update is multiplied by this")
    noise_std: float = Field(1.0, gt=0, description="noise: std of the Gaussian added")


class TrainConfig(Section):
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(2e-3, gt=0)
    head_lr: float | None = Field(None, gt=0, description="the output head's lr; None: lr")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(16, ge=1)
    local_steps: int | None = Field(8, ge=1)
    local_epochs: float | None = Field(None, gt=0)
    grad_accum: int = Field(1, ge=1)
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    keep_optimizer_state: bool | None = Field(
        None, description="None: the method's default (reset each round unless it keeps state)"
    )
    max_grad_norm: float | None = Field(None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _epochs_replace_default_steps(cls, data: Any) -> Any:
        """``local_epochs`` alone means epochs: the default ``local_steps`` then steps aside
        (otherwise a TOML file, which cannot write None, could never choose epochs)."""
        epochs_only = isinstance(data, dict) and "local_steps" not in data
        if epochs_only and data.get("local_epochs") is not None:
            return {**data, "local_steps": None}
        return data

    @model_validator(mode="after")
    def _one_work_unit(self) -> TrainConfig:
        if (self.local_steps is None) == (self.local_epochs is None):
            raise ValueError("set exactly one of local_steps and local_epochs")
        return self


class EvalConfig(Section):
    every: int = Field(1, ge=1, description="evaluate every N rounds (and always after the last)")
    batch_size: int = Field(64, ge=1)
    max_generate: int = Field(
        16, ge=0, description="instruction data: answers generated for exact match, F1, ROUGE-L"
    )
    max_new_tokens: int = Field(32, ge=1)
    lm_eval_tasks: list[Annotated[str, Field(min_length=1)]] = Field(
        [], description="lm-evaluation-harness tasks run on the final adapter after the last round"
    )
    lm_eval_limit: int | None = Field(None, ge=1, description="lm-eval: items per task; None: all")
    lm_eval_include_path: str | None = Field(
        None, description="lm-eval: a directory of local task YAMLs (works offline)"
    )
    answer_pattern: str | None = Field(
        None,
        description="a regex whose last match (its first group, if any) is the answer, in the "
        "generation and the reference, before exact match and F1 (e.g. the last number)",
    )

    @model_validator(mode="after")
    def _pattern_compiles(self) -> EvalConfig:
        if self.answer_pattern is not None:
            try:
                re.compile(self.answer_pattern)
            except re.error as error:
                raise ValueError(f"answer_pattern is not a regular expression: {error}") from None
        return self


RANDOM_GRAPHS = ("erdos_renyi", "matching")


class TopologyConfig(Section):
    """Decentralized methods only (engine ``gossip``): the graph, its mixing weights and how
    neighbours' messages are compressed and mixed (algorithms.md §1.3, §2)."""

    kind: Literal[
        "ring", "torus", "erdos_renyi", "complete", "star", "exponential", "matching", "file"
    ] = "ring"
    p: float | None = Field(None, gt=0, le=1, description="erdos_renyi: edge probability")
    edge_file: str | None = Field(None, description="file: one 'i j' edge per line")
    seed: int | None = Field(None, description="graph seed; None: the run seed")
    time_varying: bool = Field(False, description="new graph each round (erdos_renyi, matching)")
    mixing: Literal["auto", "ring", "metropolis", "laplacian", "uniform"] = Field(
        "auto", description="auto: ring 1/3 on rings, laplacian on ER, uniform on complete, else MH"
    )
    quantize_bits: Literal[2, 4, 8, 32] = Field(
        32, description="stochastic quantized gossip (ours); 32: exact"
    )
    error_feedback: bool = Field(False, description="CHOCO-style compressed gossip (ours)")
    consensus_step: float = Field(1.0, gt=0, le=1, description="CHOCO consensus step size gamma")
    mix_space: Literal["factors", "products"] = Field(
        "factors", description="products: mix s·B·A, back to rank r by factored SVD (DeCAF-like)"
    )
    average_model: Literal["factors", "products"] = Field(
        "factors", description="evaluated model: mean A and B, or rank-r SVD of the mean product"
    )
    per_node_eval: bool = Field(True, description="also evaluate every node's own model")

    @model_validator(mode="after")
    def _consistent(self) -> TopologyConfig:
        if self.kind == "erdos_renyi" and self.p is None:
            raise ValueError("kind 'erdos_renyi' needs p (Dec-LoRA does not publish its p)")
        if self.kind == "file" and not self.edge_file:
            raise ValueError("kind 'file' needs edge_file")
        if self.time_varying and self.kind not in RANDOM_GRAPHS:
            raise ValueError(f"time_varying needs a random kind {RANDOM_GRAPHS}, not {self.kind!r}")
        if self.kind == "matching" and not self.time_varying:
            raise ValueError("a fixed matching is disconnected; set time_varying = true")
        if self.error_feedback and (self.time_varying or self.mix_space == "products"):
            raise ValueError("error_feedback needs a static graph and mix_space = 'factors'")
        return self


class RanksConfig(Section):
    """Per-client LoRA ranks for methods with heterogeneous clients (FlexLoRA, HetLoRA, FLoRA,
    FSLoRA budgets k_i). ``lora.rank`` is the slot (global, maximum) rank; every client rank is
    at most it. ``homo`` gives every client ``lora.rank``; the others draw from ``values``
    (ascending) per client, seeded: ``uniform`` (FSLoRA's {1/8,1/4,1/2}·r), ``heavy_tail``
    (FlexLoRA: 80% the smallest, 10% the largest, the rest shared by the middle values) and
    ``normal`` (FlexLoRA: a rounded Gaussian over the value positions, mean the middle,
    sd 0.7·(n−1)/3)."""

    profile: Literal["homo", "uniform", "heavy_tail", "normal"] = "homo"
    values: list[int] = Field([8, 16, 32], min_length=1, description="candidate ranks, not homo")
    seed: int | None = Field(None, description="seed of the rank draw; None: the run seed")


DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:[0-9]+)?)$"


class ComputeConfig(Section):
    """Where and in what precision the work runs (resolved against the machine by
    ``fedlora.compute``; a device the machine lacks is refused there, before any loading)."""

    device: str = Field(
        "auto",
        pattern=DEVICE_PATTERN,
        description="auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="compute dtype of the frozen base; auto: bfloat16 where supported"
    )
    edge_device: str = Field(
        "cpu", pattern=DEVICE_PATTERN, description="DLoRA: the user's device (edge)"
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward")
    compile: bool = Field(
        False,
        description="torch.compile the model's forward (measured slower on the CPUs here: "
        "docs/benchmarks.md; try it on an accelerator)",
    )
    threads: int | None = Field(
        None, ge=1, description="CPU intra-op threads; None: torch's default (1 a distributed rank)"
    )
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        1,
        description="processes training a round's clients in parallel (server methods, CPU); "
        "auto: one per core where that measured faster (fedlora.compute.pool_pays)",
    )
    states_on_device: bool = Field(
        False, description="keep idle clients' optimizer states on the device (else in CPU memory)"
    )


DpSampling = Literal["poisson", "fixed"]


class PrivacyConfig(Section):
    """Formal privacy (``fedlora.privacy``): differentially private local training
    (``dp_sgd``), user-level DP at the server (``central``) and secure aggregation, which
    composes with either. The spent (ε, δ) is accounted per round in metrics.jsonl."""

    mechanism: Literal["none", "dp_sgd", "central"] = Field(
        "none", description="none, dp_sgd (per-example clipping + noise), central (server DP)"
    )
    clip_norm: float = Field(
        1.0, gt=0, description="dp_sgd: per-example gradient norm; central: per-client update norm"
    )
    noise_multiplier: float | None = Field(
        None, ge=0, description="noise std / clip_norm; None: solved from target_epsilon"
    )
    target_epsilon: float | None = Field(
        None, gt=0, description="ε to reach after all rounds (with delta), instead of noise"
    )
    delta: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="δ of (ε, δ); None: 1/n (dp_sgd: all training examples; central: clients)",
    )
    max_epsilon: float | None = Field(
        None, gt=0, description="stop cleanly (last checkpoint kept) before ε would exceed this"
    )
    sampling: DpSampling = Field(
        "poisson", description="dp_sgd samples: poisson (rate L/n) or fixed (L without replacement)"
    )
    adaptive_clipping: bool = Field(
        False, description="central: clip norm follows a quantile of update norms (Andrew 2021)"
    )
    target_quantile: float = Field(
        0.5, gt=0, lt=1, description="adaptive_clipping: share of updates left unclipped"
    )
    clip_learning_rate: float = Field(
        0.2, gt=0, description="adaptive_clipping: geometric step of the clip norm per round"
    )
    clipped_count_stddev: float | None = Field(
        None, ge=0, description="adaptive_clipping: noise on the unclipped count; None: m/20"
    )
    secure_aggregation: bool = Field(
        False, description="pairwise-masked replies: the server learns only their sum"
    )
    threshold: int | None = Field(
        None, ge=2, description="secure_aggregation: shares to recover a seed; None: ⌊2n/3⌋+1"
    )
    fixed_point_bits: int = Field(
        16, ge=4, le=24, description="secure_aggregation: fractional bits of the mod-2^32 code"
    )

    @model_validator(mode="after")
    def _consistent(self) -> PrivacyConfig:
        if self.mechanism == "none":
            needing = [
                name
                for name in ("noise_multiplier", "target_epsilon", "delta", "max_epsilon")
                if getattr(self, name) is not None
            ]
            if needing:
                raise ValueError(f"{'/'.join(needing)} need mechanism dp_sgd or central")
            if self.adaptive_clipping:
                raise ValueError("adaptive_clipping needs mechanism 'central'")
            return self
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                f"mechanism {self.mechanism!r} needs exactly one of "
                "noise_multiplier and target_epsilon"
            )
        if self.adaptive_clipping and self.mechanism != "central":
            raise ValueError("adaptive_clipping needs mechanism 'central'")
        return self


class MethodConfig(BaseModel):
    """``name`` plus the method's own options, validated later by the method's schema."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = "fedit"

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class LogConfig(Section):
    """Experiment trackers, each optional (``pip install 'fedlora[trackers]'``) and off by
    default; they get the per-round metrics, the resolved config, the bytes totals, the
    adapter and the figures (``fedlora.trackers``)."""

    tensorboard: bool = Field(False, description="TensorBoard event files in <run>/tensorboard")
    mlflow: bool = Field(
        False,
        description="an MLflow run: MLFLOW_TRACKING_URI, else a file store beside the run "
        "directory (<run>/../mlruns)",
    )
    wandb: bool = Field(
        False, description="a Weights & Biases run in <run>/wandb (WANDB_MODE=offline honoured)"
    )
    project: str = Field(
        "fedlora", min_length=1, description="the MLflow experiment and the W&B project"
    )


class Config(Section):
    experiment: ExperimentConfig = ExperimentConfig()
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    federation: FederationConfig = FederationConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    ranks: RanksConfig = RanksConfig()
    topology: TopologyConfig = TopologyConfig()
    compute: ComputeConfig = ComputeConfig()
    attack: AttackConfig = AttackConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    method: MethodConfig = MethodConfig()
    log: LogConfig = LogConfig()


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value`` -> (["section", "key"], value). The value is read as TOML when it
    parses (numbers, booleans, lists) and as a plain string otherwise, except for a key whose
    schema type is text (a string or a choice of words): there the bare word is kept as written,
    so ``attack.kind=nan`` is the word nan, not the float, and ``experiment.name=true`` a name."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    path = [part.strip() for part in dotted.split(".")]
    if len(path) < 2 or not all(path):
        raise ConfigError(f"override {text!r}: the key must be section.key, got {dotted!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    if not isinstance(value, str) and takes_text_only(schema_type(path)):
        value = raw.strip()
    return path, value


def schema_type(path: list[str]) -> Any:
    """The schema's type of ``section.key``; None where the schema does not fix one (a
    method's own options, an unknown key)."""
    if len(path) != 2 or path[0] not in Config.model_fields:
        return None
    section = Config.model_fields[path[0]].annotation
    if not (isinstance(section, type) and issubclass(section, BaseModel)):
        return None
    field = section.model_fields.get(path[1])
    return field.annotation if field is not None else None


def takes_text_only(annotation: Any) -> bool:
    """A string, a choice of words, or either one or None: a bare word means itself."""
    if annotation is str:
        return True
    args = get_args(annotation)
    origin = get_origin(annotation)
    if origin is Literal:
        return all(isinstance(arg, str) for arg in args)
    if origin is Annotated:
        return takes_text_only(args[0])
    if origin in (Union, UnionType):
        kinds = [arg for arg in args if arg is not type(None)]
        return bool(kinds) and all(takes_text_only(arg) for arg in kinds)
    return False


def described_value(value: Any) -> str:
    """What ``--set`` read a value as, in words, for an error message."""
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, list):
        return f"the list {value}"
    if isinstance(value, dict):
        return "a table"
    return f"the text {value!r}"


OVERRIDE_SYNTAX = (
    "--set reads numbers, true/false and [lists] as TOML and anything else as text; put quotes "
    "around text that would read as one of those: --set 'section.key=\"true\"'"
)


# Keys that are alternatives to each other: overriding one drops the other from the file, so
# ``--set train.local_steps=5`` works on a config written in epochs (and vice versa).
ALTERNATIVES = {
    ("train", "local_steps"): "local_epochs",
    ("train", "local_epochs"): "local_steps",
}


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for key in path[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {key!r} is not a section")
            node = child
        node[path[-1]] = value
        if tuple(path) in ALTERNATIVES:
            node.pop(ALTERNATIVES[tuple(path)], None)
    return data


def describe_validation_error(error: ValidationError) -> str:
    """Turn pydantic's report into lines of ``section.key: what is wrong``."""
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "config"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "string_pattern_mismatch" and item["loc"][0] == "compute":
            message = f"{item['input']!r} is not a device; expected auto, cpu, cuda, cuda:N or mps"
        elif item["type"] == "literal_error":
            message = f"not allowed; {item['msg'].lower()}"
        lines.append(f"{where}: {message}")
    return "\n".join(lines)


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> Config:
    """The validated config; a mistake in a key that ``overrides`` set also says what ``--set``
    read its value as, and how to write it."""
    try:
        return Config.model_validate(data)
    except ValidationError as error:
        message = describe_validation_error(error)
        hints = override_hints(error, overrides or [])
        raise ConfigError("\n".join([message, *hints])) from None


def override_hints(error: ValidationError, overrides: list[str]) -> list[str]:
    """One line per ``--set`` whose key the error names: what its value was read as."""
    wrong = {tuple(str(part) for part in item["loc"][:2]) for item in error.errors()}
    hints = []
    for text in overrides:
        path, value = parse_override(text)
        if tuple(path[:2]) in wrong:
            hints.append(f"--set {text}: read as {described_value(value)}")
    return [*hints, OVERRIDE_SYNTAX] if hints else []


def load_config(path: Path | str, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from None
    return config_from_dict(apply_overrides(data, overrides or []), overrides)
