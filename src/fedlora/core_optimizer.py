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


class SlotOptimizer(torch.optim.Optimizer):
    """An optimizer whose own param groups are PEFT's slot tensors, so that the trainer's
    zero_grad, learning-rate schedule and gradient scaler act on them as on any optimizer,
    while an inner optimizer (``[train]``'s AdamW or SGD) steps the tensors the slots are made
    of; its state is this optimizer's state. Subclasses build ``self.inner`` and write the
    slots back in ``step``."""

    inner: torch.optim.Optimizer

    def __init__(self, params: list[tuple[str, torch.nn.Parameter]], config: TrainConfig) -> None:
        super().__init__(parameter_groups(params, config), {"lr": config.lr})

    def sync_learning_rates(self) -> None:
        """The schedule sets this optimizer's rates; the inner one steps with them."""
        for outer, inner in zip(self.param_groups, self.inner.param_groups, strict=True):
            inner["lr"] = outer["lr"]

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.inner.load_state_dict(state_dict)


class CoreOptimizer(SlotOptimizer):
    """Trains R in slot B = U·R (U fixed, orthonormal columns) through the slot tensors; the
    inner optimizer holds R and the other tensors."""

    def __init__(
        self,
        params: list[tuple[str, torch.nn.Parameter]],
        bases: dict[str, torch.Tensor],
        config: TrainConfig,
    ) -> None:
        super().__init__(params, config)
        self.bases = {p: bases[name].to(p.device) for name, p in params if name in bases}
        self.cores = {p: torch.nn.Parameter(u.T @ p.detach()) for p, u in self.bases.items()}
        self.inner = standard_optimizer([(n, self.cores.get(p, p)) for n, p in params], config)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> None:
        self.sync_learning_rates()
        for p, core in self.cores.items():
            core.grad = None if p.grad is None else self.bases[p].T @ p.grad
        self.inner.step()
        for p, core in self.cores.items():
            p.copy_(self.bases[p] @ core)
