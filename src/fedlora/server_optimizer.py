"""The server's update rule for methods that treat the aggregate as a step direction.

``plain``: x ← x + Δ (FedAvg-style). ``adam``: FedAdam-style, one AdamW step with the
pseudo-gradient −Δ, which is what FSLoRA's released code does (algorithms.md §5.2, §5.6 item 4).
The AdamW moments are part of the method's checkpointed state.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedlora.lazy import torch
from fedlora.tensors import TensorDict
from fedlora.training import optimizer_tensors, restore_optimizer

ServerKind = Literal["plain", "adam"]


class ServerOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    server_lr: float | None = Field(
        None, gt=0, description="adam: server lr; None: train.lr (as the code)"
    )
    server_betas: tuple[float, float] = Field(
        (0.9, 0.999), description="adam: the server AdamW's (β1, β2)"
    )
    server_eps: float = Field(1e-8, gt=0, description="adam: the server AdamW's ε")
    server_weight_decay: float = Field(
        0.01, ge=0, description="adam: torch AdamW's default, which the FSLoRA code keeps [Recon]"
    )


class ServerOptimizer:
    """Holds the server tensors and applies aggregated updates to them."""

    def __init__(
        self, state: TensorDict, kind: ServerKind, options: ServerOptions, default_lr: float
    ):
        self.kind = kind
        self.params = {k: torch.nn.Parameter(v.detach().clone()) for k, v in state.items()}
        self.optimizer = torch.optim.AdamW(
            list(self.params.values()),
            lr=options.server_lr or default_lr,
            betas=options.server_betas,
            eps=options.server_eps,
            weight_decay=options.server_weight_decay,
        )

    def apply(self, delta: TensorDict) -> None:
        with torch.no_grad():
            if self.kind == "plain":
                for name, param in self.params.items():
                    param.add_(delta[name])
                return
        for name, param in self.params.items():
            param.grad = -delta[name]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def values(self) -> TensorDict:
        return {k: p.detach() for k, p in self.params.items()}

    def state_dict(self) -> TensorDict:
        flat = {f"param/{k}": p.detach().clone() for k, p in self.params.items()}
        flat.update({f"adam/{k}": v for k, v in optimizer_tensors(self.optimizer).items()})
        return flat

    def load_state_dict(self, flat: TensorDict) -> None:
        with torch.no_grad():
            for name, param in self.params.items():
                param.copy_(flat[f"param/{name}"])
        moments = {k[len("adam/") :]: v for k, v in flat.items() if k.startswith("adam/")}
        if moments:
            restore_optimizer(self.optimizer, moments)
