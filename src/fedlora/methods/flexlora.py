"""FlexLoRA: average the clients' effective updates, then SVD back to each client's rank (§6.4).

Server state is ΔW = Σ_i p_i s_i B_i A_i per module, kept factored at the slot rank R as
(B̃, Ã) = (U_R Σ_R, V_Rᵀ): the truncated SVD is computed from the clients' factors
(``weighted_product_svd``), never from a d×k product. Client j (rank r_j, scale s_j) receives
B_j = U_{r_j} Σ_{r_j} / s_j and A_j = V_{r_j}ᵀ, so s_j B_j A_j is the best rank-r_j approximation
of ΔW (Eckart–Young, §7 T3) whatever its rank: the scale is compensated with the receiver's own
s (§1.1). Before the first aggregation ΔW = 0 and clients start from the common init.
"""

from __future__ import annotations

from pydantic import BaseModel

from fedlora.lora import pad_factors, weighted_product_svd
from fedlora.methods.base import Method, MethodContext
from fedlora.methods.factors import (
    RankedClients,
    averaged_head,
    factors_of,
    head_of,
    pack,
    padded_start,
    truncated_reply,
)
from fedlora.tensors import TensorDict


class FlexLoRA(RankedClients, Method):
    name = "flexlora"
    summary = "FlexLoRA: average s_i·B_i·A_i, truncated SVD to each client's rank (Bai et al. 2024)"
    heterogeneous_ranks = True
    needs_each_reply = (
        "its server step is an SVD of Σ p_i s_i·B_i·A_i, which needs each client's product "
        "(a mean of the factors is not the mean of the products), at each client's own rank"
    )

    def __init__(self, context: MethodContext, options: BaseModel) -> None:
        super().__init__(context, options)
        # (B̃, Ã) with B̃·Ã = ΔW; initially B̃ = 0 and Ã = A0, so every client starts at the init.
        self.state: TensorDict = {k: v.clone() for k, v in context.initial.items()}

    def server_message(self, client: int, round_index: int) -> TensorDict:
        modules, scale = self.context.modules, self._scale(client)
        factors = factors_of(self.state, modules, self.context.rank(client))
        return {
            **pack({k: (b / scale, a) for k, (b, a) in factors.items()}, modules),
            **head_of(self.state, modules),
        }

    def client_start(self, client: int, message: TensorDict, store: TensorDict) -> TensorDict:
        return padded_start(message, self.context.modules)

    def client_reply(
        self, client: int, trained: TensorDict, message: TensorDict, store: TensorDict
    ) -> TensorDict:
        return truncated_reply(trained, self.context.modules, self.context.rank(client))

    def aggregate(
        self, round_index: int, replies: dict[int, TensorDict], weights: dict[int, float]
    ) -> None:
        modules, clients = self.context.modules, sorted(replies)
        coefficients = [weights[c] * self._scale(c) for c in clients]
        state = averaged_head(replies, weights, modules)
        for m in modules:
            u, sigma, vh = weighted_product_svd(
                [replies[c][m.b] for c in clients],
                [replies[c][m.a] for c in clients],
                coefficients,
                m.rank,
            )
            state[m.b], state[m.a] = pad_factors(u * sigma, vh, m.rank)
        self.state = state

    def global_state(self) -> TensorDict:
        """The rank-R truncation of ΔW in the slots' own scale s_R."""
        modules = self.context.modules
        return {
            **pack({m.key: (self.state[m.b] / m.scale, self.state[m.a]) for m in modules}, modules),
            **head_of(self.state, modules),
        }

    def state_dict(self) -> TensorDict:
        return dict(self.state)

    def load_state_dict(self, state: TensorDict) -> None:
        self.state = dict(state)
