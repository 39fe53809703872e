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

from fedlora.errors import FedloraError


class ConfigError(FedloraError, ValueError):
    """A user mistake in a config file or override: shown as one message, never a traceback."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExperimentConfig(Section):
    name: str = Field(
        "experiment", description="run name; the default run directory is `runs/<name>`"
    )
    seed: int = Field(
        0,
        description="seeds the model init, the partition, client sampling, batches, dropout "
        "and sketches",
    )
    rounds: int = Field(10, ge=1, description="communication rounds")


class ModelConfig(Section):
    name: str = Field(
        "minilm-l6",
        description="`minilm-l6` (sequence classification), `smollm2-135m` (causal LM), "
        "`tiny-bert` or `tiny-llama` (random initialisation, for tests), a local Hugging Face "
        "directory, or a hub id",
    )
    max_length: int = Field(
        128, ge=8, le=4096, description="tokens per example (prompt + answer for causal LMs)"
    )
    quantize_4bit: bool = Field(
        False,
        description="freeze the base in NF4 (bitsandbytes; every linear layer's input width "
        "must be a multiple of 64)",
    )


class LoraConfig(Section):
    rank: int = Field(
        8, ge=1, description="LoRA rank (the maximum rank when client ranks differ: `[ranks]`)"
    )
    alpha: float = Field(16.0, gt=0, description="scale s = α/r")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    target_modules: list[str] | None = Field(
        None,
        description="the modules that get LoRA factors; None: the model's default (BERT: query, "
        "key, value; LLaMA: q/k/v/o_proj)",
    )
    train_head: bool = Field(True, description="train and communicate the classification head")
    init_seed: int | None = Field(
        None, description="seed of the common A initialisation; None: the run seed"
    )
    rslora: bool = Field(
        False, description="scale s = α/√r (rsLoRA) instead of α/r (algorithms.md §1.1)"
    )


PartitionKind = Literal[
    "iid", "dirichlet", "fslora_dirichlet", "shards", "proportions", "quantity", "natural"
]


DataFormat = Literal["auto", "text", "alpaca", "messages", "prompt_completion", "multiple_choice"]


class DataConfig(Section):
    dataset: str = Field(
        "bbc-news",
        description="`bbc-news` (topics), `bbc-news-mc` (the same articles as multiple choice), "
        "`chatterbot` (Q/A pairs), a `.jsonl`/`.json`/`.csv`/`.parquet` path, or a hub dataset id",
    )
    format: DataFormat = Field(
        "auto",
        description="how a record is read (causal LMs): `text`, `alpaca`, `messages`, "
        "`prompt_completion`, `multiple_choice`; `auto`: a built-in's own, a file's from its "
        "columns",
    )
    text_column: str = Field(
        "text", description="input (or prompt) column of a file (format `text`)"
    )
    label_column: str = Field(
        "label",
        description="label column of a file (optional for causal data: the partition label)",
    )
    answer_column: str = Field(
        "answer",
        description="format `text`: the answer; `multiple_choice`: the correct choice (an index "
        "from 0 or a letter)",
    )
    instruction_column: str = Field("instruction", description="format `alpaca`: the instruction")
    input_column: str = Field("input", description="format `alpaca`: its optional input")
    output_column: str = Field("output", description="format `alpaca`: the answer")
    messages_column: str = Field(
        "messages",
        description="format `messages`: the list of `{role, content}` (or ShareGPT "
        "`{from, value}`) turns",
    )
    prompt_column: str = Field("prompt", description="format `prompt_completion`: the prompt")
    completion_column: str = Field(
        "completion", description="format `prompt_completion`: the answer"
    )
    question_column: str = Field("question", description="format `multiple_choice`: the question")
    choices_column: str = Field(
        "choices", description="format `multiple_choice`: the list of choices"
    )
    list_choices: bool = Field(
        True,
        description="format `multiple_choice`: the prompt lists the choices (A. …) under the "
        "question",
    )
    chat_template: Literal["auto", "none"] = Field(
        "auto",
        description="`auto`: the tokenizer's chat template if it has one, else fedlora's plain "
        "one; `none`: the plain one",
    )
    truncation: Literal["left", "drop"] = Field(
        "left",
        description="a record longer than `model.max_length`: `left` cuts its oldest tokens "
        "(dropped, and counted, if its last answer does not fit whole); `drop` drops it",
    )
    subset: str | None = Field(None, description="hub dataset: its configuration (subset) name")
    split: str = Field("train", description="hub dataset: the split read as the dataset")
    revision: str | None = Field(None, description="hub dataset: a branch, tag or commit")
    test_fraction: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="held-out test share, stratified by label, fixed by `split_seed`",
    )
    validation_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="share of the training data held out as a stratified validation set before "
        "partitioning (no client trains on it); evaluation rounds then report `val_accuracy`, "
        "`val_macro_f1`, `val_loss` … next to the test metrics. 0: none",
    )
    test_file: str | None = Field(
        None,
        description="a local file's given test split (the same columns as `data.dataset`), used "
        "instead of carving `test_fraction`",
    )
    validation_file: str | None = Field(
        None,
        description="a given validation split (the same columns), instead of `validation_fraction`",
    )
    max_train_examples: int | None = Field(
        None, ge=1, description="cap on training examples; None: all"
    )
    max_test_examples: int | None = Field(None, ge=1, description="cap on test examples; None: all")
    max_validation_examples: int | None = Field(
        None, ge=1, description="cap on validation examples; None: all"
    )
    split_seed: int = Field(
        1234,
        description="seed of the train/test and train/validation splits (independent of the run "
        "seed)",
    )

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
    kind: PartitionKind = Field(
        "dirichlet",
        description="`iid`, `dirichlet` (per class, α), `fslora_dirichlet` (per client, α), "
        "`shards` (k classes per client), `proportions` (a fixed label mix per client), "
        "`quantity` (size skew), `natural` (by a column)",
    )
    num_clients: int = Field(
        10, ge=1, description="clients (for `natural`: the number of distinct values)"
    )
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (smaller: more skew)")
    min_client_size: int = Field(
        2, ge=0, description="`dirichlet`: redraw until every client has this many examples"
    )
    shards_per_client: int = Field(2, ge=1, description="`shards`: classes (shards) per client")
    proportions: list[list[float]] | None = Field(
        None, description="`proportions`: one row of class proportions per client"
    )
    quantity: Literal["linear", "square", "exponential"] = Field(
        "linear", description="`quantity`: how client sizes grow: linear, square or exponential"
    )
    column: str | None = Field(
        None,
        description="`natural`: the column naming each example's client; None: the label column",
    )


Aggregator = Literal["mean", "median", "trimmed_mean", "norm_clip"]


class FederationConfig(Section):
    clients_per_round: int | None = Field(
        None, ge=1, description="clients sampled per round (seeded); None: all clients"
    )
    fraction: float | None = Field(
        None,
        gt=0,
        le=1,
        description="or the fraction of clients sampled per round (instead of `clients_per_round`)",
    )
    weighting: Literal["size", "uniform"] = Field(
        "size", description="aggregation weights: by data `size`, or `uniform`"
    )
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="probability that a sampled client fails to reply in a round (seeded)",
    )
    dropout_after_masking: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="under secure aggregation: probability that a client vanishes after sending "
        "its masked input, before the unmasking (seeded; the others' shares recover it)",
    )
    min_replies: int = Field(
        1,
        ge=1,
        description="fewer accepted replies than this: the round is skipped and the global model "
        "stays",
    )
    deadline_steps: int | None = Field(
        None,
        ge=1,
        description="local steps a client may run in a round (a simulated deadline); None: no "
        "deadline",
    )
    stragglers: Literal["cut", "drop"] = Field(
        "cut",
        description="a client that needs more steps than the deadline: `cut` short, or `drop`ped",
    )
    aggregator: Aggregator = Field(
        "mean",
        description="`mean`, `median`, `trimmed_mean`, `norm_clip` (robust ones: methods whose "
        "server step is a mean of replies)",
    )
    trim_fraction: float = Field(
        0.1, ge=0, lt=0.5, description="`trimmed_mean`: share cut from each end, per coordinate"
    )
    clip_norm: float | None = Field(
        None,
        gt=0,
        description="`norm_clip`: bound on each client's update norm (required by it)",
    )
    max_message_bytes: int = Field(
        16 * 2**30, ge=1, description="the largest message a party accepts, in bytes (16 GiB)"
    )
    lost_ranks: Literal["stop", "continue"] = Field(
        "stop",
        description="`--engine distributed`, server rounds: a worker rank that dies `stop`s the "
        "run (`--resume` continues it), or the run `continue`s without it (its clients absent "
        "from then on, with the reason)",
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

    clients: list[int] = Field([], description="the simulated attackers (client indices)")
    kind: Literal["scale", "noise", "sign_flip", "nan", "wrong_shape"] = Field(
        "scale",
        description="`scale` (update × `factor`), `noise` (+ N(0, `noise_std`²)), `sign_flip`, "
        "`nan`, `wrong_shape`",
    )
    factor: float = Field(10.0, description="`scale`: the factor the update is multiplied by")
    noise_std: float = Field(
        1.0, gt=0, description="`noise`: the standard deviation of the Gaussian added"
    )


class TrainConfig(Section):
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw", description="`adamw`, or `sgd` (with `momentum`)"
    )
    lr: float = Field(2e-3, gt=0, description="peak learning rate")
    head_lr: float | None = Field(
        None,
        gt=0,
        description="the trained output head's own learning rate (same schedule); None: `lr`",
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay")
    batch_size: int = Field(16, ge=1, description="examples per micro-batch")
    local_steps: int | None = Field(
        8,
        ge=1,
        description="optimizer steps per client per round, or set `local_epochs` instead "
        "(exactly one of the two; `--set` of one drops the other)",
    )
    local_epochs: float | None = Field(
        None,
        gt=0,
        description="passes over the client's data per round, instead of `local_steps` (which "
        "then steps aside)",
    )
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    scheduler: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="`constant`, or `linear` or `cosine` decay over the whole run"
    )
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")
    keep_optimizer_state: bool | None = Field(
        None,
        description="keep each client's optimizer state between rounds; None: the method's "
        "default (reset each round unless the method keeps it)",
    )
    max_grad_norm: float | None = Field(
        None, gt=0, description="gradient clipping norm; None: no clipping"
    )

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
    batch_size: int = Field(64, ge=1, description="evaluation batch size")
    max_generate: int = Field(
        16,
        ge=0,
        description="instruction data: test answers generated for exact match, F1 and ROUGE-L",
    )
    max_new_tokens: int = Field(32, ge=1, description="causal LMs: generation length, in tokens")
    own_test_share: bool = Field(
        False,
        description="methods that evaluate each client's own model: also on the client's own "
        "share of the test set, cut from each class (or `natural` group) in the client's share "
        "of its training examples; reported as `own_<metric>`",
    )
    lm_eval_tasks: list[Annotated[str, Field(min_length=1)]] = Field(
        [],
        description="lm-evaluation-harness tasks run on the final adapter after the last round "
        "(causal LMs; as `fedlora evaluate`)",
    )
    lm_eval_limit: int | None = Field(None, ge=1, description="lm-eval: items per task; None: all")
    lm_eval_include_path: str | None = Field(
        None, description="lm-eval: a directory of local task YAMLs (works offline)"
    )
    answer_pattern: str | None = Field(
        None,
        description="a regex whose last match (its first group, if any) is the answer, in the "
        "generation and the reference, before exact match and F1 (e.g. `'(-?[\\d,]*\\.?\\d+)'`, "
        "the last number)",
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
    ] = Field("ring", description="the graph the decentralized nodes gossip over")
    p: float | None = Field(None, gt=0, le=1, description="`erdos_renyi`: the edge probability")
    edge_file: str | None = Field(None, description="`file`: one `i j` edge per line")
    seed: int | None = Field(None, description="graph seed; None: the run seed")
    time_varying: bool = Field(
        False, description="a fresh random graph each round (`erdos_renyi`, `matching`)"
    )
    mixing: Literal["auto", "ring", "metropolis", "laplacian", "uniform"] = Field(
        "auto",
        description="the mixing weights: `ring` (1/3), `metropolis`, `laplacian`, `uniform`; "
        "`auto`: ring 1/3 on rings, laplacian on Erdős–Rényi, uniform on complete, else "
        "Metropolis",
    )
    quantize_bits: Literal[2, 4, 8, 32] = Field(
        32, description="stochastic quantized gossip at 2, 4 or 8 bits (our extension); 32: exact"
    )
    error_feedback: bool = Field(False, description="CHOCO-style compressed gossip (our extension)")
    consensus_step: float = Field(1.0, gt=0, le=1, description="CHOCO consensus step size γ")
    mix_space: Literal["factors", "products"] = Field(
        "factors",
        description="mix A and B, or `products`: mix s·B·A and return to rank r by a factored "
        "SVD (DeCAF-like)",
    )
    average_model: Literal["factors", "products"] = Field(
        "factors",
        description="the evaluated network model: the mean factors A and B, or the rank-r SVD of "
        "the mean product",
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

    profile: Literal["homo", "uniform", "heavy_tail", "normal"] = Field(
        "homo",
        description="per-client ranks: `homo` (every client `lora.rank`), or drawn from `values` "
        "by `uniform`, `heavy_tail` or `normal`",
    )
    values: list[int] = Field(
        [8, 16, 32],
        min_length=1,
        description="candidate client ranks (each ≤ `lora.rank`; unused by `homo`)",
    )
    seed: int | None = Field(None, description="seed of the rank draw; None: the run seed")


DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:[0-9]+)?)$"


class ComputeConfig(Section):
    """Where and in what precision the work runs (resolved against the machine by
    ``fedlora.compute``; a device the machine lacks is refused there, before any loading)."""

    device: str = Field(
        "auto",
        pattern=DEVICE_PATTERN,
        description="`auto` (CUDA if present, else Apple `mps`, else CPU), `cpu`, `cuda`, "
        "`cuda:N`, `mps`; a device the machine lacks is a config error",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="compute dtype of the frozen base: `auto` (bfloat16 on accelerators that "
        "support it, float32 on the CPU), `float32`, `bfloat16`, `float16` (with a gradient "
        "scaler)",
    )
    edge_device: str = Field(
        "cpu",
        pattern=DEVICE_PATTERN,
        description="DLoRA: where each user's device (edge) computes; the cloud uses "
        "`compute.device`",
    )
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward (7B-class models on one GPU)"
    )
    compile: bool = Field(
        False,
        description="`torch.compile` the model's forward; matches eager runs within 1e-5 "
        "(losses, adapter); measured slower on the CPUs here (docs/benchmarks.md), not measured "
        "on a GPU",
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="CPU intra-op threads; None: torch's default (distributed ranks: 1 each; "
        "with `workers`, the cores shared out per worker)",
    )
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        1,
        description="processes training a round's clients in parallel on this machine's CPU "
        "(server methods), bit-identical to 1 at the same `threads`; `auto`: one per core where "
        "that measured faster (⌈n / cores⌉ × 0.9 × cores < n clients a round; on 2 cores even "
        "rounds and odd ones from 11)",
    )
    states_on_device: bool = Field(
        False,
        description="keep idle clients' optimizer states on the device instead of in CPU memory",
    )


DpSampling = Literal["poisson", "fixed"]


class PrivacyConfig(Section):
    """Formal privacy (``fedlora.privacy``): differentially private local training
    (``dp_sgd``), user-level DP at the server (``central``) and secure aggregation, which
    composes with either. The spent (ε, δ) is accounted per round in metrics.jsonl."""

    mechanism: Literal["none", "dp_sgd", "central"] = Field(
        "none",
        description="`dp_sgd` (per-example clipping and noise in local training), `central` "
        "(each client's update clipped, the mean noised at the server), or `none`",
    )
    clip_norm: float = Field(
        1.0,
        gt=0,
        description="`dp_sgd`: per-example gradient norm bound; `central`: per-client update "
        "norm bound (the initial one with adaptive clipping)",
    )
    noise_multiplier: float | None = Field(
        None,
        ge=0,
        description="noise std as a multiple of `clip_norm` (set this or `target_epsilon`); "
        "None: solved from `target_epsilon`",
    )
    target_epsilon: float | None = Field(
        None,
        gt=0,
        description="ε to reach after all rounds; the noise multiplier is solved for before "
        "training",
    )
    delta: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="δ of the (ε, δ) guarantee; None: min(1e-5, 1/(10·n)), n the smallest "
        "dataset the guarantee covers (the smallest client's training examples for `dp_sgd`, the "
        "clients for `central`); 1/n or more needs `allow_large_delta`",
    )
    allow_large_delta: bool = Field(
        False,
        description="accept a δ of 1/n or more (n: the smallest dataset the guarantee covers); "
        "such a δ is met by a mechanism that publishes one member's data outright, so it is "
        "refused unless set, and printed beside ε when it is",
    )
    client_stats: bool = Field(
        False,
        description="under a DP mechanism, each client also reports its training loss and "
        "example count (ε does not cover them); default: they stay on the client, and the "
        "round's record has no train_loss nor examples",
    )
    noise_source: Literal["auto", "secure", "seeded"] = Field(
        "auto",
        description="where DP noise and DP-SGD's samples draw their randomness: `secure` (a "
        "fresh secret seed from the OS's cryptographic generator for every party and round, "
        "never stored nor sent: no one can replay the noise), `seeded` (derived from "
        "experiment.seed: reproducible, so anyone holding config.toml, the server included, can "
        "replay and strip it), `auto` (secure where parties are separate processes, i.e. "
        "--engine distributed and Flower; seeded in the one-process simulation)",
    )
    max_epsilon: float | None = Field(
        None,
        gt=0,
        description="stop cleanly before a round that would take ε above this (last round "
        "evaluated, checkpoint kept)",
    )
    sampling: DpSampling = Field(
        "poisson",
        description="`dp_sgd` samples: `poisson` (rate L/n, L = batch_size·grad_accum; ε "
        "against adding or removing an example) or `fixed` (L without replacement; ε against "
        "replacing one)",
    )
    adaptive_clipping: bool = Field(
        False,
        description="`central`: the clip norm tracks a quantile of the update norms (Andrew et "
        "al. 2021)",
    )
    target_quantile: float = Field(
        0.5, gt=0, lt=1, description="adaptive clipping: share of updates to leave unclipped"
    )
    clip_learning_rate: float = Field(
        0.2, gt=0, description="adaptive clipping: geometric step of the clip norm per round"
    )
    clipped_count_stddev: float | None = Field(
        None,
        ge=0,
        description="adaptive clipping: noise on the count of unclipped updates; None: m/20 "
        "(m: the clients a round samples)",
    )
    secure_aggregation: bool = Field(
        False,
        description="pairwise-masked replies (Bonawitz et al. 2017): the server learns only "
        "their sum",
    )
    threshold: int | None = Field(
        None,
        ge=2,
        description="secure aggregation: Shamir shares needed to recover a seed or a dropped "
        "client's mask key; None: ⌊2n/3⌋+1 (n: the clients a round samples); fewer clients at "
        "any step skip the round",
    )
    fixed_point_bits: int = Field(
        16,
        ge=4,
        le=24,
        description="secure aggregation: fractional bits f of the mod-2³² fixed-point code "
        "(error ≤ n·2^(−f−1) per coordinate, values within ±(2³¹ − n)/2^f)",
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
    name: str = Field(
        "fedit",
        description="a name from `fedlora methods`; the method's own options sit in the same table",
    )

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class LogConfig(Section):
    """Experiment trackers, each optional (``pip install 'fedlora[trackers]'``) and off by
    default; they get the per-round metrics, the resolved config, the bytes totals, the
    adapter and the figures (``fedlora.trackers``)."""

    tensorboard: bool = Field(False, description="TensorBoard event files in <run>/tensorboard")
    mlflow: bool = Field(
        False,
        description="an MLflow run: in MLFLOW_TRACKING_URI, else in a local store beside the "
        "run directory (<run>/../mlflow.db, artifacts in <run>/../mlartifacts)",
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
