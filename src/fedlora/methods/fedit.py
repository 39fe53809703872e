"""FedIT: FedAvg of the LoRA factors A and B separately (algorithms.md §6.1)."""

from __future__ import annotations

from pydantic import BaseModel

from fedlora.methods.base import Method, MethodContext
from fedlora.tensors import TensorDict


class FedIT(Method):
    name = "fedit"
    summary = "FedAvg of A and B separately, weighted by data size (Zhang et al. 2023)"
    mean_of_replies = True
    needs_each_reply = ""

    def __init__(self, context: MethodContext, options: BaseModel) -> None:
        super().__init__(context, options)
        self.state: TensorDict = {k: v.clone() for k, v in context.initial.items()}

    def server_message(self, client: int, round_index: int) -> TensorDict:
        return self.state

    def client_start(self, client: int, message: TensorDict, store: TensorDict) -> TensorDict:
        return message

    def client_reply(
        self, client: int, trained: TensorDict, message: TensorDict, store: TensorDict
    ) -> TensorDict:
        return trained

    def aggregate(
        self, round_index: int, replies: dict[int, TensorDict], weights: dict[int, float]
    ) -> None:
        self.state = self.combine(round_index, replies, weights, reference=self.state)

    def global_state(self) -> TensorDict:
        return self.state

    def state_dict(self) -> TensorDict:
        return dict(self.state)

    def load_state_dict(self, state: TensorDict) -> None:
        self.state = dict(state)
