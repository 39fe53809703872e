"""HetLoRA: heterogeneous ranks by truncation, self-pruning, and sparsity-weighted zero-padded
aggregation (algorithms.md §6.5).

Scale convention (§1.1; the FlexLoRA branch's √(α/r_i) trick): the server keeps the global
rank-R factors in the gauge B̃ = √s·B, Ã = √s·A, so B̃Ã = s·B·A is the effective update for any
rank. Client i (configured rank r_i, scale s_i, current rank c_i ≤ r_i) gets B̃[:, :c_i]/√s_i and
Ã[:c_i]/√s_i (truncation: s_i·B_i·A_i is the first c_i components of the global update) and its
reply goes back through √s_i. s_i stays that of the configured rank when a client prunes, so the
conversions remain inverse to each other.

Self-pruning: the local loss gets λ·Σ_modules ‖B[:, ⌊γc⌋:c]‖·‖A[⌊γc⌋:c, :]‖; if that tail norm
shrank over the local steps, the client drops the tail (c ← ⌊γc⌋, at least ``min_rank``) and
the server learns the new rank from the shape of the reply.

Aggregation: every reply zero-padded to R and weighted by p_i = ‖S_i‖_F / Σ_j ‖S_j‖_F with
S_i = s_i·B_i·A_i per module [Recon: per module, effective product], norms from r×r Gram
matrices. Padded averaging is not product-exact (§7 T5), by design of the method.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedlora.channel import Schema
from fedlora.lazy import torch
from fedlora.lora import lora_scale, pad_factors, sparsity_weights
from fedlora.methods.base import Method, MethodContext, Regularizer
from fedlora.methods.factors import (
    averaged_head,
    factors_of,
    head_of,
    pack,
    padded_start,
    rank_reply_schema,
    rank_scales,
    truncated_reply,
)
from fedlora.tensors import TensorDict

RANKS = "hetlora.client_ranks"  # method-state key of the clients' current ranks


class HetLoRAOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    reg_lambda: float = Field(1e-3, ge=0, description="λ of the self-pruning penalty (0: off)")
    gamma: float = Field(0.99, gt=0, lt=1, description="kept fraction of the rank when pruning")
    prune: bool = Field(True, description="drop the tail when its norm shrank over local training")
    min_rank: int = Field(1, ge=1, description="never prune below this rank")
    weighting: Literal["sparsity", "engine"] = Field(
        "sparsity",
        description="sparsity: p_i ∝ ‖s_i B_i A_i‖_F (the paper); engine: federation.weighting",
    )


class HetLoRA(Method):
    name = "hetlora"
    summary = (
        "HetLoRA: truncation, self-pruning, sparsity-weighted zero-padded average (Cho et al. 2024)"
    )
    Options = HetLoRAOptions
    heterogeneous_ranks = True
    needs_each_reply = (
        "its weights p_i ∝ ‖s_i·B_i·A_i‖ come from each reply, and replies differ in rank"
    )

    def __init__(self, context: MethodContext, options: BaseModel) -> None:
        super().__init__(context, options)
        assert isinstance(options, HetLoRAOptions)
        self.options: HetLoRAOptions = options
        modules = context.modules
        # The gauge of the slots' own scale s_R, so the global model starts exactly at the init.
        initial = factors_of(context.initial, modules)
        gauge = {m.key: tuple(x * math.sqrt(m.scale) for x in initial[m.key]) for m in modules}
        self.state: TensorDict = {**pack(gauge, modules), **head_of(context.initial, modules)}
        self.current = [context.rank(c) for c in range(len(context.num_examples))]

    def _root_scale(self, client: int) -> float:
        lora = self.context.config.lora
        return math.sqrt(lora_scale(lora.alpha, self.context.rank(client), lora.rslora))

    def client_scales(self, client: int) -> dict[str, float]:
        return rank_scales(
            self.context.modules, self.context.rank(client), self.context.config.lora
        )

    def server_message(self, client: int, round_index: int) -> TensorDict:
        modules, root = self.context.modules, self._root_scale(client)
        factors = factors_of(self.state, modules, self.current[client])
        return {
            **pack({k: (b / root, a / root) for k, (b, a) in factors.items()}, modules),
            **head_of(self.state, modules),
        }

    # -- client --------------------------------------------------------------------------
    def _tail(self, rank: int) -> tuple[int, int]:
        return max(self.options.min_rank, math.floor(self.options.gamma * rank)), rank

    def _tail_norm(self, state: TensorDict, rank: int) -> torch.Tensor:
        low, high = self._tail(rank)
        return sum(
            (
                torch.linalg.vector_norm(state[m.b][:, low:high])
                * torch.linalg.vector_norm(state[m.a][low:high])
                for m in self.context.modules
            ),
            torch.zeros(()),
        )

    def regularizer(self, client: int, message: TensorDict) -> Regularizer | None:
        rank = message[self.context.modules[0].a].shape[0]
        low, high = self._tail(rank)
        if self.options.reg_lambda == 0 or low >= high:
            return None
        return lambda params: self.options.reg_lambda * self._tail_norm(params, rank)

    def client_start(self, client: int, message: TensorDict, store: TensorDict) -> TensorDict:
        return padded_start(message, self.context.modules)

    def expected_reply(self, client: int, message: TensorDict) -> Schema:
        """Its rank: the one sent, or lower where the client self-pruned."""
        return rank_reply_schema(message, self.context.modules, None)

    def client_reply(
        self, client: int, trained: TensorDict, message: TensorDict, store: TensorDict
    ) -> TensorDict:
        modules = self.context.modules
        rank = message[modules[0].a].shape[0]
        low, high = self._tail(rank)
        with torch.no_grad():
            shrank = self._tail_norm(trained, rank) < self._tail_norm(message, rank)
        if self.options.prune and low < high and shrank:
            rank = low
        return truncated_reply(trained, modules, rank)

    # -- server --------------------------------------------------------------------------
    def aggregate(
        self, round_index: int, replies: dict[int, TensorDict], weights: dict[int, float]
    ) -> None:
        modules, clients = self.context.modules, sorted(replies)
        state = averaged_head(replies, weights, modules)
        for c in clients:
            self.current[c] = replies[c][modules[0].a].shape[0]
        roots = {c: self._root_scale(c) for c in clients}
        for m in modules:
            gauge = {c: (replies[c][m.b] * roots[c], replies[c][m.a] * roots[c]) for c in clients}
            p = [weights[c] for c in clients]
            if self.options.weighting == "sparsity":
                p = sparsity_weights([gauge[c] for c in clients]) or p
            padded = [pad_factors(*gauge[c], m.rank) for c in clients]
            state[m.b] = sum(w * b for w, (b, _) in zip(p, padded, strict=True))
            state[m.a] = sum(w * a for w, (_, a) in zip(p, padded, strict=True))
        self.state = state

    def global_state(self) -> TensorDict:
        modules = self.context.modules
        unscaled = {
            m.key: (self.state[m.b] / math.sqrt(m.scale), self.state[m.a] / math.sqrt(m.scale))
            for m in modules
        }
        return {**pack(unscaled, modules), **head_of(self.state, modules)}

    def state_dict(self) -> TensorDict:
        return {**self.state, RANKS: torch.tensor(self.current, dtype=torch.float32)}

    def load_state_dict(self, state: TensorDict) -> None:
        self.current = [int(r) for r in state[RANKS].tolist()]
        self.state = {k: v for k, v in state.items() if k != RANKS}
