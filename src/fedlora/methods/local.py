"""Local-only training: every client trains alone and never communicates (the lower reference)."""

from __future__ import annotations

from fedlora.adapters import TensorDict
from fedlora.methods.base import Method

PREFIX = "adapter."


class Local(Method):
    name = "local"
    summary = (
        "each client trains alone from the common init, no communication; mean per-client score"
    )
    communicates = False
    keeps_optimizer_state = True
    per_client_eval = True

    def server_message(self, client: int, round_index: int) -> TensorDict:
        return {}

    def aggregate(
        self, round_index: int, replies: dict[int, TensorDict], weights: dict[int, float]
    ) -> None:
        return None

    def client_start(self, client: int, message: TensorDict, store: TensorDict) -> TensorDict:
        own = self.client_model(client, store)
        return own if own is not None else dict(self.context.initial)

    def client_reply(
        self, client: int, trained: TensorDict, message: TensorDict, store: TensorDict
    ) -> TensorDict:
        store.update({PREFIX + k: v for k, v in trained.items()})
        return {}

    def client_model(self, client: int, store: TensorDict) -> TensorDict | None:
        own = {k[len(PREFIX) :]: v for k, v in store.items() if k.startswith(PREFIX)}
        return own or None
