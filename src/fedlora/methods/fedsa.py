"""FedSA-LoRA: A is shared and averaged, each client keeps its own B and head (§6.3).

A tends to learn what clients have in common and B what is client-specific, so only A is
aggregated; client i's model is W0 + s·B_i·A, evaluated per client. Its personal tensors live in
its ``store``. A client is evaluated on the model it holds after its last local training (its
own B_i with its trained A), since the next averaged A only reaches it with the next round.
"""

from __future__ import annotations

from pydantic import BaseModel

from fedlora.methods.base import Method, MethodContext
from fedlora.tensors import TensorDict

OWN = "own."  # store prefix of the client's full trained adapter state


class FedSALoRA(Method):
    name = "fedsa"
    summary = (
        "FedSA-LoRA: A averaged, B and head kept by each client; per-client eval (Guo et al. 2025)"
    )
    per_client_eval = True
    mean_of_replies = True
    needs_each_reply = ""  # the mean of the A's

    def __init__(self, context: MethodContext, options: BaseModel) -> None:
        super().__init__(context, options)
        self.shared = {m.a for m in context.modules}
        self.state: TensorDict = {k: context.initial[k].clone() for k in self.shared}

    def server_message(self, client: int, round_index: int) -> TensorDict:
        return self.state

    def client_start(self, client: int, message: TensorDict, store: TensorDict) -> TensorDict:
        own = self.client_model(client, store) or self.context.initial
        return {**own, **message}

    def client_reply(
        self, client: int, trained: TensorDict, message: TensorDict, store: TensorDict
    ) -> TensorDict:
        store.update({OWN + k: v for k, v in trained.items()})
        return {k: trained[k] for k in self.shared}

    def client_model(self, client: int, store: TensorDict) -> TensorDict | None:
        own = {k[len(OWN) :]: v for k, v in store.items() if k.startswith(OWN)}
        return own or None

    def aggregate(
        self, round_index: int, replies: dict[int, TensorDict], weights: dict[int, float]
    ) -> None:
        self.state = self.combine(round_index, replies, weights, reference=self.state)

    def state_dict(self) -> TensorDict:
        return dict(self.state)

    def load_state_dict(self, state: TensorDict) -> None:
        self.state = dict(state)
