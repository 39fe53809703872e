"""Module-wise views of adapter states that the LoRA-family methods share.

An adapter state (and a message) is a flat dict keyed by PEFT state-dict names; these helpers
split it into per-module factor pairs (B, A) and the rest (the classifier head), and rebuild a
slot-shaped state from factors of any rank ≤ the slot rank by zero-padding (exact, see
``fedlora.lora.pad_factors``).
"""

from __future__ import annotations

from fedlora.channel import Schema
from fedlora.config import LoraConfig
from fedlora.lazy import torch
from fedlora.lora import lora_scale, pad_factors, weighted_average
from fedlora.methods.base import MethodContext
from fedlora.tensors import LoraModule, TensorDict

Factors = dict[str, tuple["torch.Tensor", "torch.Tensor"]]  # module key -> (B, A)


def head_of(state: TensorDict, modules: list[LoraModule]) -> TensorDict:
    """The tensors that are not LoRA factors (the classifier head, if trained)."""
    factor_keys = {m.a for m in modules} | {m.b for m in modules}
    return {k: v for k, v in state.items() if k not in factor_keys}


def factors_of(state: TensorDict, modules: list[LoraModule], rank: int | None = None) -> Factors:
    """(B, A) per module, truncated to the first ``rank`` components if given."""
    return {m.key: (state[m.b][:, :rank], state[m.a][:rank]) for m in modules}


def pack(factors: Factors, modules: list[LoraModule]) -> TensorDict:
    """Factors back to wire names (any rank)."""
    packed: TensorDict = {}
    for m in modules:
        packed[m.b], packed[m.a] = factors[m.key]
    return packed


def slot_state(factors: Factors, head: TensorDict, modules: list[LoraModule]) -> TensorDict:
    """A full slot-shaped adapter state: each module's factors zero-padded to the slot rank."""
    padded = {m.key: pad_factors(*factors[m.key], m.rank) for m in modules}
    return {**pack(padded, modules), **head}


def padded_start(message: TensorDict, modules: list[LoraModule]) -> TensorDict:
    """The slot state a client trains from: the message's factors (any rank) zero-padded."""
    return slot_state(factors_of(message, modules), head_of(message, modules), modules)


def truncated_reply(trained: TensorDict, modules: list[LoraModule], rank: int) -> TensorDict:
    """What a rank-``rank`` client sends back: its first ``rank`` components and the head."""
    return {**pack(factors_of(trained, modules, rank), modules), **head_of(trained, modules)}


def rank_reply_schema(message: TensorDict, modules: list[LoraModule], rank: int | None) -> Schema:
    """What a server accepts from a client replying at ``rank`` (None: any rank up to what
    the client prunes to): each module's B (d_out x rank) and A (rank x d_in), and the head
    the message carried."""
    schema: Schema = {k: tuple(v.shape) for k, v in head_of(message, modules).items()}
    for m in modules:
        schema[m.b], schema[m.a] = (m.d_out, rank), (rank, m.d_in)
    return schema


def averaged_head(
    replies: dict[int, TensorDict], weights: dict[int, float], modules: list[LoraModule]
) -> TensorDict:
    """The weighted average of the non-factor tensors (the classifier head) of the replies."""
    clients = sorted(replies)
    return weighted_average(
        [head_of(replies[c], modules) for c in clients], [weights[c] for c in clients]
    )


def rank_scales(modules: list[LoraModule], rank: int, lora: LoraConfig) -> dict[str, float]:
    """The scale s(r) of a rank-``rank`` client for every module (§1.1)."""
    scale = lora_scale(lora.alpha, rank, lora.rslora)
    return {m.key: scale for m in modules}


class RankedClients:
    """For methods whose client i trains at its own rank r_i with the scale s(r_i) (§1.1)."""

    context: MethodContext

    def _scale(self, client: int) -> float:
        lora = self.context.config.lora
        return lora_scale(lora.alpha, self.context.rank(client), lora.rslora)

    def client_scales(self, client: int) -> dict[str, float]:
        return rank_scales(
            self.context.modules, self.context.rank(client), self.context.config.lora
        )
