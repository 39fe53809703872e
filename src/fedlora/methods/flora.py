"""FLoRA: stack the clients' adapters, merge the exact sum into the base, start fresh (§6.6).

B_stack = [B_1 … B_K] and A_stack = [p_1 s_1 A_1; …; p_K s_K A_K] give
B_stack·A_stack = Σ p_k s_k B_k A_k exactly (§7 T4), for any mix of ranks, so nothing is lost
to aggregation; the price is that the product must leave the low-rank form: it is merged into
the frozen base (W ← W + ΔW) and every client starts the next round from a fresh adapter
(random A, zero B). The cumulative merged offset is method state, so a resumed run rebuilds the
same base exactly (``Method.base_offset``).

Downlink: the previous round's stacked factors ((Σ_j r_j)(d+k) per module), i.e. what a
deployment must ship so that clients can merge them into their own base copy. In simulation the
base is shared and the engine merges it, so clients do not read those tensors, but they still
cross the channel and are counted. Fresh A: Kaiming-uniform like PEFT's init, drawn per client
from (seed, client, participation count), kept in the client's store: clients need no common A
because stacking is exact whatever the A_k.
"""

from __future__ import annotations

from pydantic import BaseModel

from fedlora.channel import Schema
from fedlora.lazy import torch
from fedlora.lora import fresh_a, stack_factors
from fedlora.methods.base import Method, MethodContext
from fedlora.methods.factors import (
    RankedClients,
    averaged_head,
    head_of,
    pack,
    rank_reply_schema,
    slot_state,
    truncated_reply,
)
from fedlora.tensors import TensorDict
from fedlora.training import derived_seed

OFFSET = "offset."  # method-state prefix of the merged cumulative update per module key
PARTICIPATIONS = "flora.participations"  # client-store counter that seeds its fresh A


class FLoRA(RankedClients, Method):
    name = "flora"
    summary = "FLoRA: stacked Σ p_k s_k B_k A_k merged into the base each round (Wang et al. 2024)"
    heterogeneous_ranks = True
    needs_each_reply = "it stacks every client's factors [B_1 … B_K] and [p_1·s_1·A_1; …]"

    def __init__(self, context: MethodContext, options: BaseModel) -> None:
        super().__init__(context, options)
        modules = context.modules
        self.head: TensorDict = head_of(context.initial, modules)
        self.offset: TensorDict = {m.key: torch.zeros(m.d_out, m.d_in) for m in modules}
        self.stack: TensorDict = {}  # last round's stacked factors, sent down next round

    def server_message(self, client: int, round_index: int) -> TensorDict:
        return {**self.stack, **self.head}

    def client_start(self, client: int, message: TensorDict, store: TensorDict) -> TensorDict:
        modules, rank = self.context.modules, self.context.rank(client)
        count = int(store[PARTICIPATIONS]) if PARTICIPATIONS in store else 0
        generator = torch.Generator().manual_seed(
            derived_seed(self.context.config.experiment.seed, client, count, 0xF1)
        )
        fresh = {
            m.key: (torch.zeros(m.d_out, rank), fresh_a(rank, m.d_in, generator)) for m in modules
        }
        return slot_state(fresh, head_of(message, modules), modules)

    def expected_reply(self, client: int, message: TensorDict) -> Schema:
        return rank_reply_schema(message, self.context.modules, self.context.rank(client))

    def client_reply(
        self, client: int, trained: TensorDict, message: TensorDict, store: TensorDict
    ) -> TensorDict:
        count = int(store[PARTICIPATIONS]) if PARTICIPATIONS in store else 0
        store[PARTICIPATIONS] = torch.tensor(float(count + 1))
        return truncated_reply(trained, self.context.modules, self.context.rank(client))

    def aggregate(
        self, round_index: int, replies: dict[int, TensorDict], weights: dict[int, float]
    ) -> None:
        modules, clients = self.context.modules, sorted(replies)
        coefficients = [weights[c] * self._scale(c) for c in clients]
        self.head = averaged_head(replies, weights, modules)
        stacked = {}
        for m in modules:
            b, a = stack_factors(
                [replies[c][m.b] for c in clients], [replies[c][m.a] for c in clients], coefficients
            )
            self.offset[m.key] = self.offset[m.key] + b @ a
            stacked[m.key] = (b, a)
        self.stack = pack(stacked, modules)

    def base_offset(self) -> TensorDict:
        return self.offset

    def global_state(self) -> TensorDict:
        """The merged base carries the update; the adapter itself is the zero-product init."""
        return {**self.context.initial, **self.head}

    def state_dict(self) -> TensorDict:
        return {
            **self.head,
            **{OFFSET + k: v for k, v in self.offset.items()},
            **{"stack." + k: v for k, v in self.stack.items()},
        }

    def load_state_dict(self, state: TensorDict) -> None:
        self.offset = {k[len(OFFSET) :]: v for k, v in state.items() if k.startswith(OFFSET)}
        self.stack = {k[len("stack.") :]: v for k, v in state.items() if k.startswith("stack.")}
        self.head = {k: v for k, v in state.items() if not k.startswith((OFFSET, "stack."))}
