"""What every method is: a few hooks the engine calls, knowing nothing of which method it runs.

A round, whichever engine drives it:

    message = server_message(client)          server -> client   (through the channel)
    start   = client_start(client, message)   state loaded into the adapter slots
    ... the trainer runs the local steps on the parameters ``trainable`` selects ...
    reply   = client_reply(client, trained)   client -> server   (through the channel)
    aggregate(replies, weights)               new server state

Server hooks see only server state; client hooks see only the message and that client's own
``store`` (tensors the client keeps between rounds, checkpointed by the engine). That split is
what lets the distributed engine run the two halves in different processes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from fedlora.adapters import LoraModule, TensorDict
from fedlora.config import Config


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class MethodContext:
    """What a method may know of the run: never the engine, the data or the file system."""

    config: Config
    modules: list[LoraModule]
    initial: TensorDict  # the common initial adapter state every party can reproduce
    num_examples: list[int]  # per client


class Method(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions

    # Declarative traits the engine reads (never method names).
    pooled_data: ClassVar[bool] = False  # one client holding all training data
    communicates: ClassVar[bool] = True  # False: nothing crosses a party boundary
    keeps_optimizer_state: ClassVar[bool] = False  # default for train.keep_optimizer_state
    per_client_eval: ClassVar[bool] = False  # evaluate each client's own model
    engine: ClassVar[str] = "simulation"  # "simulation": server rounds; "gossip": peers over a graph

    def __init__(self, context: MethodContext, options: BaseModel) -> None:
        self.context = context
        self.options = options

    # -- server side ---------------------------------------------------------------------
    @abstractmethod
    def server_message(self, client: int, round_index: int) -> TensorDict:
        """What the server sends to ``client`` at the start of a round."""

    @abstractmethod
    def aggregate(self, round_index: int, replies: dict[int, TensorDict], weights: dict[int, float]) -> None:
        """Combine the clients' replies into the new server state."""

    def global_state(self) -> TensorDict | None:
        """The full adapter state of the global model, or None if there is none."""
        return None

    # -- client side ---------------------------------------------------------------------
    @abstractmethod
    def client_start(self, client: int, message: TensorDict, store: TensorDict) -> TensorDict:
        """The full adapter state the client trains from."""

    @abstractmethod
    def client_reply(self, client: int, trained: TensorDict, message: TensorDict, store: TensorDict) -> TensorDict:
        """What the client sends back; it may also update its ``store``."""

    def client_model(self, client: int, store: TensorDict) -> TensorDict | None:
        """The client's own model for per-client evaluation (``per_client_eval``)."""
        return None

    def trainable(self, name: str) -> bool:
        """Whether the adapter tensor ``name`` is trained locally."""
        return True

    # -- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> TensorDict:
        return {}

    def load_state_dict(self, state: TensorDict) -> None:
        if state:
            raise ValueError(f"method {self.name} keeps no state but got {sorted(state)[:3]}")
