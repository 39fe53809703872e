"""FedFTG (algorithms.md §4.2, §6.7): direct weight averaging with GaLore-AdamW as the clients'
local optimizer, the projection really engaged.

Each target matrix's gradient is projected on the top ``galore_rank`` singular vectors of the
gradient (refreshed every ``update_proj_gap`` steps), Adam runs in that projected space and the
step is projected back times ``scale``; the head trains with plain AdamW. As in the paper's code
(§4.3) the client optimizers persist across rounds by default, projector included.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedlora.config import ConfigError, TrainConfig
from fedlora.lazy import torch
from fedlora.methods.base import MethodContext
from fedlora.methods.dwa import DirectWeightAveraging
from fedlora.tensors import FULL_COPY

ProjectionType = Literal["std", "reverse_std", "right", "left"]


class GaLoreOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    galore_rank: int = Field(16, ge=1, description="projection rank ρ (default: LoRA parity)")
    update_proj_gap: int = Field(200, ge=1, description="steps between projector refreshes")
    scale: float = Field(0.25, gt=0, description="GaLore scale α on the back-projected step")
    proj_type: ProjectionType = Field(
        "std",
        description="GaLore's projection side: std projects each gradient onto its smaller "
        "dimension, reverse_std onto its larger one, right and left always that side",
    )


class FedFTG(DirectWeightAveraging):
    name = "fedftg"
    summary = "FedFTG: direct weight averaging with GaLore-AdamW local steps (Mahla et al. 2024)"
    Options = GaLoreOptions
    keeps_optimizer_state = True

    def __init__(self, context: MethodContext, options: BaseModel) -> None:
        super().__init__(context, options)
        if context.config.train.optimizer != "adamw":
            raise ConfigError(
                f"train.optimizer {context.config.train.optimizer!r}: method {self.name!r} runs "
                "GaLore-AdamW; set train.optimizer = 'adamw'"
            )
        self.projected = {name for name in context.initial if f".{FULL_COPY}." in name}
        smallest = min(min(context.initial[name].shape) for name in self.projected)
        if options.galore_rank > smallest:
            raise ConfigError(
                f"method.galore_rank {options.galore_rank} exceeds the smallest target matrix "
                f"dimension {smallest}"
            )

    def local_optimizer(
        self, params: list[tuple[str, torch.nn.Parameter]], config: TrainConfig
    ) -> torch.optim.Optimizer:
        options = self.options
        from fedlora.galore import galore_adamw  # galore-torch loads bitsandbytes: only here

        return galore_adamw(
            params,
            self.projected,
            config,
            rank=options.galore_rank,
            update_proj_gap=options.update_proj_gap,
            scale=options.scale,
            proj_type=options.proj_type,
        )
