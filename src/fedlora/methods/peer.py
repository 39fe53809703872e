"""What a decentralized method is: peers that train, exchange with graph neighbours and mix.

There is no server, so the server hooks of ``Method`` refuse to run; the gossip engine
(``engine = "gossip"``) drives a round as

    start   = client_start(node, {}, store)        the node's own model (common init at first)
    ... local steps ...
    message = client_reply(node, trained, {}, store) what the node sends to its neighbours
    mixed   = mix(node, {j: message_j}, {j: w_ij})  j over the node and its neighbours
    keep(store, mixed)

and, as an observer outside the network, ``network_model(states)`` for evaluation. A node's model
lives in its ``store`` under ``MODEL`` (checkpointed by the engine like any client store).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import NoReturn

from pydantic import BaseModel

from fedlora.channel import Schema
from fedlora.methods.base import Method, MethodContext, store_under, stored
from fedlora.tensors import TensorDict

MODEL = "model."


class PeerMethod(Method):
    engine = "gossip"
    per_client_eval = True  # every node has its own model (exported to adapters/client_<i>)

    def __init__(self, context: MethodContext, options: BaseModel) -> None:
        super().__init__(context, options)
        self.average: TensorDict | None = None

    # -- there is no server --------------------------------------------------------------
    def _no_server(self) -> NoReturn:
        raise TypeError(
            f"method {self.name} is decentralized: it has no server (run it with the gossip engine)"
        )

    def server_message(self, client: int, round_index: int) -> TensorDict:
        self._no_server()

    def aggregate(
        self, round_index: int, replies: dict[int, TensorDict], weights: dict[int, float]
    ) -> None:
        self._no_server()

    # -- a node ----------------------------------------------------------------------------
    def client_start(self, client: int, message: TensorDict, store: TensorDict) -> TensorDict:
        return self.own_model(client, store)

    def client_reply(
        self, client: int, trained: TensorDict, message: TensorDict, store: TensorDict
    ) -> TensorDict:
        return trained

    def client_model(self, client: int, store: TensorDict) -> TensorDict | None:
        return stored(store, MODEL) or None

    def keep(self, store: TensorDict, state: TensorDict) -> None:
        store_under(store, MODEL, state)

    def message_schema(self, shapes: Schema) -> Schema:
        """The names and shapes of a node's message to its neighbours, given the adapter's
        (``shapes``); what a receiver accepts. Default: the whole adapter."""
        return shapes

    @abstractmethod
    def mix(
        self, node: int, states: dict[int, TensorDict], weights: dict[int, float]
    ) -> TensorDict:
        """Node ``node``'s new model from its own state and its neighbours' (keys of ``states``)."""

    # -- the observer ------------------------------------------------------------------------
    @abstractmethod
    def combine_network(self, states: list[TensorDict]) -> TensorDict:
        """The network-averaged model of all nodes (what Dec-LoRA evaluates)."""

    def network_model(self, states: list[TensorDict]) -> TensorDict:
        self.average = self.combine_network(states)
        return self.average

    def global_state(self) -> TensorDict | None:
        return self.average

    def state_dict(self) -> TensorDict:
        return dict(self.average or {})

    def load_state_dict(self, state: TensorDict) -> None:
        self.average = dict(state) or None
