"""The names and shapes every party agrees on, with nothing heavier than torch (and that only
lazily, ``fedlora.lazy``): adapter tensor
dicts keyed like PEFT's state dict (the wire format), and the adapted modules' dimensions.
Methods, the channel and the trainer import these without loading transformers or peft, so a
config can be checked (and ``fedlora methods`` listed) quickly."""

from __future__ import annotations

from dataclasses import dataclass

from fedlora.lazy import torch

TensorDict = dict[str, "torch.Tensor"]

ADAPTER = "default"
FULL_COPY = "ln_tuning_layers"  # PEFT's name for a trainable copy of a whole module


def wire_name(parameter_name: str) -> str:
    """PEFT parameter name -> PEFT state-dict key (adapter name and wrapper level removed)."""
    return parameter_name.replace(f".modules_to_save.{ADAPTER}.", ".").replace(f".{ADAPTER}.", ".")


def is_head(name: str) -> bool:
    """Whether a wire name is a trained copy of the output head (neither LoRA nor a full copy)."""
    return ".lora_" not in name and f".{FULL_COPY}." not in name


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear map: W (d_out x d_in) + s * B (d_out x r) @ A (r x d_in)."""

    key: str  # wire-name prefix, e.g. base_model.model.bert.encoder.layer.0.attention.self.query
    d_out: int
    d_in: int
    rank: int
    scale: float

    @property
    def a(self) -> str:
        return f"{self.key}.lora_A.weight"

    @property
    def b(self) -> str:
        return f"{self.key}.lora_B.weight"
