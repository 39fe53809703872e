"""FedEx-LoRA (Singhal et al., ACL 2025, arXiv 2410.09432): FedIT's averages plus the exact
residual folded into the frozen base.

FedIT's global model W0 + s·B̄Ā misses the cross terms of Σ p_i s·B_i A_i. FedEx-LoRA keeps the
averaged factors (B̄, Ā) as the next round's adapter and adds the residual
ΔW_res = Σ p_i s·B_i A_i − s·B̄Ā to the frozen base, so after every aggregation
W0 + offset + s·B̄Ā = W0 + Σ_t (the exact averages of the clients' products): aggregation is exact
while clients still train rank-r factors.

Follows the paper and its code: factors and head averaged as FedIT, residual added to the base,
clients start the next round from (B̄, Ā) on the moved base. Reconstructions (the paper leaves
them open): size weights p_i (the code averages uniformly; ``federation.weighting = "uniform"``
gives that); and how the residual travels, ``residual``:

- ``"dense"`` (default; what the code adds): the d×k matrix per module, d·k floats;
- ``"factored"``: the same residual exactly, as stacked factors [B_1 … B_K, B̄] and
  [p_1 s A_1; …; p_K s A_K; −s Ā] (rank ≤ (K+1)r, (K+1)r(d+k) floats; cheaper than dense when
  (K+1)r(d+k) < dk, i.e. many-dimensional modules and few clients);
- ``"truncated"``: its best rank-``residual_rank`` approximation (factored SVD of that stack),
  lossy; the server merges exactly what it sends, so every party keeps the same base and the
  identity then holds up to the dropped tail.

The residual of round t travels in round t+1's message to every sampled client (like FLoRA's
stacked factors): in a deployment each client adds it to its own base copy. With partial
participation a client would also need the residuals of the rounds it missed; in simulation the
base is shared and the engine merges it (``Method.base_offset``), so clients do not read it, but
its bytes are counted.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedlora.channel import Schema, schema_of
from fedlora.lazy import torch
from fedlora.lora import normalized, product_svd, stack_factors
from fedlora.methods.base import MethodContext
from fedlora.methods.fedit import FedIT
from fedlora.tensors import TensorDict

OFFSET = "offset."  # method-state prefix of the cumulative merged residual per module key
RESIDUAL = "residual."  # method-state prefix of the residual message sent next round


class FedExOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    residual: Literal["dense", "factored", "truncated"] = Field(
        "dense", description="how the residual crosses the channel"
    )
    residual_rank: int = Field(8, ge=1, description="rank of the 'truncated' residual")


class FedExLoRA(FedIT):
    name = "fedex"
    mean_of_replies = False  # the residual needs the exact mean of the products
    needs_each_reply = "its residual Σ p_i s·B_i·A_i − s·B̄·Ā needs each client's product B_i·A_i"
    summary = "FedEx-LoRA: FedIT plus the exact residual Σp·sBA − s·B̄Ā merged into the base (2024)"
    Options = FedExOptions

    def __init__(self, context: MethodContext, options: BaseModel) -> None:
        super().__init__(context, options)
        self.offset: TensorDict = {m.key: torch.zeros(m.d_out, m.d_in) for m in context.modules}
        self.residual: TensorDict = {}  # last round's residual in wire form, sent next round

    def server_message(self, client: int, round_index: int) -> TensorDict:
        return {**self.state, **self.residual}

    def expected_reply(self, client: int, message: TensorDict) -> Schema:
        """The trained adapter, without the residual the download carried."""
        return schema_of(self.context.initial)

    def client_start(self, client: int, message: TensorDict, store: TensorDict) -> TensorDict:
        return {k: v for k, v in message.items() if k in self.context.initial}

    def aggregate(
        self, round_index: int, replies: dict[int, TensorDict], weights: dict[int, float]
    ) -> None:
        super().aggregate(round_index, replies, weights)
        clients = sorted(replies)
        p = normalized([weights[c] for c in clients])
        self.residual = {}
        for m in self.context.modules:
            # The exact residual as stacked factors: Σ p_i s B_i A_i − s B̄ Ā (§7 T4's stacking).
            b, a = stack_factors(
                [replies[c][m.b] for c in clients] + [self.state[m.b]],
                [replies[c][m.a] for c in clients] + [self.state[m.a]],
                [w * m.scale for w in p] + [-m.scale],
            )
            if self.options.residual == "truncated":
                u, sigma, vh = product_svd(b, a, self.options.residual_rank)
                b, a = u * sigma, vh
            merged = b @ a  # what every party adds to its base: exactly what is sent
            if self.options.residual == "dense":
                sent = {m.key + ".residual": merged}
            else:
                sent = {m.key + ".residual_B": b, m.key + ".residual_A": a}
            self.offset[m.key] = self.offset[m.key] + merged
            self.residual.update(sent)

    def base_offset(self) -> TensorDict:
        return self.offset

    def state_dict(self) -> TensorDict:
        return {
            **self.state,
            **{OFFSET + k: v for k, v in self.offset.items()},
            **{RESIDUAL + k: v for k, v in self.residual.items()},
        }

    def load_state_dict(self, state: TensorDict) -> None:
        self.offset = {k[len(OFFSET) :]: v for k, v in state.items() if k.startswith(OFFSET)}
        self.residual = {k[len(RESIDUAL) :]: v for k, v in state.items() if k.startswith(RESIDUAL)}
        self.state = {k: v for k, v in state.items() if not k.startswith((OFFSET, RESIDUAL))}
