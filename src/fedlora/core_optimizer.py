"""Fed-SB's local optimizer (``fedlora.methods.fedsb``): trains the r×r core R of a LoRA B that
is fixed as B = U·R (U with orthonormal columns), through the PEFT slot tensors.

It lives outside the methods package because it subclasses ``torch.optim.Optimizer``, which
would load torch when the method registry imports every method module (``fedlora.lazy``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedlora.config import TrainConfig
from fedlora.training import parameter_groups, standard_optimizer


class CoreOptimizer(torch.optim.Optimizer):
    """Trains R in slot B = U·R (U fixed, orthonormal columns) through the slot tensors.

    Its own param groups are the slot tensors, so the trainer's zero_grad, learning-rate schedule
    and gradient scaler act on them as on any optimizer; the inner optimizer (``[train]``'s AdamW
    or SGD) holds R and the other tensors, and its state is this optimizer's state."""

    def __init__(
        self,
        params: list[tuple[str, torch.nn.Parameter]],
        bases: dict[str, torch.Tensor],
        config: TrainConfig,
    ) -> None:
        super().__init__(parameter_groups(params, config), {"lr": config.lr})
        self.bases = {p: bases[name].to(p.device) for name, p in params if name in bases}
        self.cores = {p: torch.nn.Parameter(u.T @ p.detach()) for p, u in self.bases.items()}
        self.inner = standard_optimizer([(n, self.cores.get(p, p)) for n, p in params], config)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:
        for outer, inner in zip(self.param_groups, self.inner.param_groups, strict=True):
            inner["lr"] = outer["lr"]
        for p, core in self.cores.items():
            core.grad = None if p.grad is None else self.bases[p].T @ p.grad
        self.inner.step()
        for p, core in self.cores.items():
            p.copy_(self.bases[p] @ core)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.inner.load_state_dict(state_dict)
