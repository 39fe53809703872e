"""What every method is: a few hooks the engine calls, knowing nothing of which method it runs.

A round, whichever engine drives it:

    message = server_message(client)          server -> client   (through the channel)
    start   = client_start(client, message)   state loaded into the adapter slots
    ... the trainer runs the local steps on the parameters ``trainable`` selects ...
    reply   = client_reply(client, trained)   client -> server   (through the channel)
    aggregate(replies, weights)               new server state
    (secure aggregation: aggregate_mean(Σ p_i reply_i), the server never sees one reply)

Server hooks see only server state; client hooks see only the message and that client's own
``store`` (tensors the client keeps between rounds, checkpointed by the engine). That split is
what lets the distributed engine run the two halves in different processes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict

from fedlora import robust
from fedlora.channel import Schema, schema_of
from fedlora.config import Config, TrainConfig
from fedlora.lazy import torch
from fedlora.privacy.central import CentralDP
from fedlora.tensors import LoraModule, TensorDict
from fedlora.training import standard_optimizer

if TYPE_CHECKING:
    from fedlora.mixing import Branch, Mixture

MEAN = -1  # the client index ``aggregate_mean`` gives the mean of the replies


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class MethodContext:
    """What a method may know of the run: never the engine, the data or the file system."""

    config: Config
    modules: list[LoraModule]
    initial: TensorDict  # the common initial adapter state every party can reproduce
    num_examples: list[int]  # per client
    ranks: list[int] = field(default_factory=list)  # per client ([ranks]); empty: all lora.rank
    central: CentralDP | None = None  # the server's private mean (privacy.mechanism "central")

    def rank(self, client: int) -> int:
        """Client ``client``'s LoRA rank (at most the slot rank ``lora.rank``)."""
        return self.ranks[client] if self.ranks else self.config.lora.rank


# A penalty on the named trainable tensors, added to the local loss at every optimizer step.
def stored(store: TensorDict, prefix: str) -> TensorDict:
    """The tensors of a client ``store`` under ``prefix``, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in store.items() if k.startswith(prefix)}


def store_under(store: TensorDict, prefix: str, state: TensorDict) -> None:
    store.update({prefix + k: v for k, v in state.items()})


Regularizer = Callable[[dict[str, "torch.nn.Parameter"]], "torch.Tensor"]


@dataclass(frozen=True)
class PersonalPhase:
    """Local steps on an adapter the client keeps to itself, run before the round's own
    training (FedDPA's local adapter): from ``start``, on the tensors ``trainable`` selects,
    the slots' own LoRA output weighted by ``weight`` and the ``added`` branches in the
    forward (``fedlora.mixing``). Its result goes to ``Method.keep_personal``, never on the
    wire."""

    start: TensorDict
    trainable: Callable[[str], bool]
    weight: float
    added: list[Branch]


class Method(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions

    # Declarative traits the engine reads (never method names).
    pooled_data: ClassVar[bool] = False  # one client holding all training data
    communicates: ClassVar[bool] = True  # False: nothing crosses a party boundary
    keeps_optimizer_state: ClassVar[bool] = False  # default for train.keep_optimizer_state
    per_client_eval: ClassVar[bool] = False  # evaluate each client's own model
    heterogeneous_ranks: ClassVar[bool] = False  # reads per-client ranks from [ranks]
    full_weights: ClassVar[bool] = False  # trains whole target matrices instead of LoRA
    # Its server step is a mean of replies, taken by ``combine``: robust aggregators apply.
    mean_of_replies: ClassVar[bool] = False
    # Why its server step needs each reply itself; "" if the weighted mean Σ p_i X_i of the
    # replies (one schema for all of a round) is all it needs: then secure aggregation applies
    # and ``aggregate_mean`` is its server step.
    needs_each_reply: ClassVar[str] = "its server step is not declared a function of the mean"
    needs_base_weights: ClassVar[bool] = False  # the engine calls ``attach_base`` (FRLoRA)
    engine: ClassVar[str] = (
        "simulation"  # "simulation": server rounds; "gossip": peers over a graph
    )

    def __init__(self, context: MethodContext, options: BaseModel) -> None:
        self.context = context
        self.options = options

    # -- server side ---------------------------------------------------------------------
    @abstractmethod
    def server_message(self, client: int, round_index: int) -> TensorDict:
        """What the server sends to ``client`` at the start of a round."""

    @abstractmethod
    def aggregate(
        self, round_index: int, replies: dict[int, TensorDict], weights: dict[int, float]
    ) -> None:
        """Combine the clients' replies into the new server state."""

    def aggregate_mean(self, round_index: int, mean: TensorDict) -> None:
        """The server step from the weighted mean of the replies alone (secure aggregation).
        ``aggregate`` over that mean as the only reply, of weight 1, is the same step for the
        methods without ``needs_each_reply``, whose ``aggregate`` is a weighted mean."""
        if self.needs_each_reply:
            raise TypeError(f"method {self.name} cannot aggregate a mean: {self.needs_each_reply}")
        self.aggregate(round_index, {MEAN: mean}, {MEAN: 1.0})

    def global_state(self) -> TensorDict | None:
        """The full adapter state of the global model, or None if there is none."""
        return None

    def expected_reply(self, client: int, message: TensorDict) -> Schema:
        """The names and shapes the server accepts from ``client`` after sending it
        ``message`` (a ``None`` dimension: any size). Default: the download's own schema;
        methods whose replies differ from their downloads say so."""
        return schema_of(message)

    def combine(
        self,
        round_index: int,
        replies: dict[int, TensorDict],
        weights: dict[int, float],
        reference: TensorDict | None = None,
    ) -> TensorDict:
        """The weighted mean of the replies, or the robust rule of ``federation.aggregator``
        (methods with ``mean_of_replies``), or under central DP the reference plus the noised
        uniform mean of the clipped updates (``fedlora.privacy.central``); ``reference``: the
        state the clients started from, for norm clipping and central DP (None: the replies are
        updates already)."""
        clients = sorted(replies)
        central = self.context.central
        if central is not None:
            updates = [robust.update_of(replies[c], reference) for c in clients]
            return robust.applied(central.mean_update(round_index, updates), reference)
        return robust.combine(
            [replies[c] for c in clients],
            [weights[c] for c in clients],
            self.context.config.federation,
            reference,
        )

    @classmethod
    def central_dp_refusal(cls, options: BaseModel) -> str | None:
        """Why these options of a ``mean_of_replies`` method cannot take central DP, or None."""
        return None

    # -- client side ---------------------------------------------------------------------
    @abstractmethod
    def client_start(self, client: int, message: TensorDict, store: TensorDict) -> TensorDict:
        """The full adapter state the client trains from."""

    @abstractmethod
    def client_reply(
        self, client: int, trained: TensorDict, message: TensorDict, store: TensorDict
    ) -> TensorDict:
        """What the client sends back; it may also update its ``store``."""

    def client_model(self, client: int, store: TensorDict) -> TensorDict | None:
        """The client's own model for per-client evaluation (``per_client_eval``)."""
        return None

    def client_exports(self, client: int, store: TensorDict) -> dict[str, TensorDict]:
        """The client's adapters to export, by subfolder of ``adapters/client_<i>`` ("" for the
        folder itself): its own model by default."""
        own = self.client_model(client, store)
        return {"": own} if own is not None else {}

    def client_mixture(self, client: int, store: TensorDict) -> Mixture | None:
        """Two adapters the client's model mixes per test example (FedDPA), evaluated by
        ``fedlora.mixing.mixture_metrics`` instead of ``own_model``; None for one adapter."""
        return None

    def personal_phase(
        self, client: int, message: TensorDict, store: TensorDict, round_index: int
    ) -> PersonalPhase | None:
        """Local steps before the round's own training, on an adapter that never leaves the
        client; None (the default): none."""
        return None

    def keep_personal(self, client: int, trained: TensorDict, store: TensorDict) -> None:
        """Keep the result of ``personal_phase`` in the client's ``store``."""
        raise NotImplementedError(f"method {self.name} has no personal phase")

    def own_model(self, client: int, store: TensorDict) -> TensorDict:
        """The client's own model, or the common init before it has trained."""
        own = self.client_model(client, store)
        return own if own is not None else dict(self.context.initial)

    def trainable(self, name: str) -> bool:
        """Whether the adapter tensor ``name`` is trained locally."""
        return True

    def local_optimizer(
        self, params: list[tuple[str, torch.nn.Parameter]], config: TrainConfig
    ) -> torch.optim.Optimizer:
        """The optimizer of a client's local steps over the named trainable tensors: AdamW or
        SGD from ``[train]``; methods that prescribe their own (FedFTG's GaLore) override it."""
        return standard_optimizer(params, config)

    def client_scales(self, client: int) -> dict[str, float] | None:
        """Per-module LoRA scale s for this client's training and evaluation, keyed by module
        key; None keeps the slots' own. Rank-r_i clients need s(r_i) (§1.1); the engine applies
        it around the client's work and restores the slot scales afterwards."""
        return None

    def regularizer(self, client: int, message: TensorDict) -> Regularizer | None:
        """A term the trainer adds to this client's local loss (HetLoRA's self-pruning
        penalty); None for the plain loss."""
        return None

    # -- the shared frozen base ----------------------------------------------------------
    def base_offset(self) -> TensorDict | None:
        """The cumulative update merged into the frozen base, per module key (d_out x d_in), or
        None. The engine sets W = W0 + offset after every aggregation and after a resume, so
        methods that merge (FLoRA) keep the offset in their checkpointed state."""
        return None

    def attach_base(self, weights: TensorDict) -> None:
        """The frozen base's pristine target weights W0 per module key (d_out x d_in, float32,
        CPU), given once by the engine of every process before the first round to methods that
        declare ``needs_base_weights``. The pretrained model is public, so every party has them
        (FRLoRA restarts its factors from their singular vectors)."""
        return None

    # -- checkpointing -------------------------------------------------------------------
    def state_dict(self) -> TensorDict:
        return {}

    def load_state_dict(self, state: TensorDict) -> None:
        if state:
            raise ValueError(f"method {self.name} keeps no state but got {sorted(state)[:3]}")
