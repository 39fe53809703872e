"""Local-only training: every client trains alone and never communicates (the lower reference)."""

from __future__ import annotations

from fedlora.methods.base import Method, store_under, stored
from fedlora.tensors import TensorDict

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
        return self.own_model(client, store)

    def client_reply(
        self, client: int, trained: TensorDict, message: TensorDict, store: TensorDict
    ) -> TensorDict:
        store_under(store, PREFIX, trained)
        return {}

    def client_model(self, client: int, store: TensorDict) -> TensorDict | None:
        return stored(store, PREFIX) or None
