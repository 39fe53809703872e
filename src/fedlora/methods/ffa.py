"""FFA-LoRA: A frozen at the shared seeded init, only B (and the head) trained and averaged
(algorithms.md §6.2).

With every client holding the same A0, Σ p_i B_i A0 = (Σ p_i B_i) A0: averaging B is exactly
averaging the updates (§7 T2), and A0 never travels because every party rebuilds it from the
init seed, which halves the traffic of FedIT.
"""

from __future__ import annotations

from pydantic import BaseModel

from fedlora.methods.base import MethodContext
from fedlora.methods.fedit import FedIT
from fedlora.tensors import TensorDict


class FFALoRA(FedIT):
    """FedIT's averaging, applied to B and the head only; A0 stays out of the server state."""

    name = "ffa"
    summary = (
        "FFA-LoRA: A frozen at the seeded init, never sent; B and head averaged (Sun et al. 2024)"
    )

    def __init__(self, context: MethodContext, options: BaseModel) -> None:
        super().__init__(context, options)
        self.frozen = {m.a for m in context.modules}
        self.state = {k: v for k, v in self.state.items() if k not in self.frozen}

    def trainable(self, name: str) -> bool:
        return name not in self.frozen

    def client_start(self, client: int, message: TensorDict, store: TensorDict) -> TensorDict:
        return {**self.context.initial, **message}

    def client_reply(
        self, client: int, trained: TensorDict, message: TensorDict, store: TensorDict
    ) -> TensorDict:
        return {k: trained[k] for k in message}

    def global_state(self) -> TensorDict:
        return {**self.context.initial, **self.state}
