"""FedSVD (Lee et al., NeurIPS 2025, arXiv 2505.12805; code sw-programmer/FedSVD, the paper's link
seanie12/fed-svd holds the same code): clients train only B with A frozen; the server averages B
and re-factorises B̄·A by an SVD, so A becomes orthonormal and adapts to the aggregate.

A round: the server sends B, A and the head; each client trains B (and the head) with A frozen
and uploads them; the server forms B̄ = B + Σ p_i (B_i − B) = Σ p_i B_i, exact on the product
because every client used the same A (Σ p_i B_i A = B̄A, FFA-LoRA's identity §7 T2), then, in
the rounds ``refactors`` names, takes the thin SVD B̄A = U S Vᵀ and sets A ← V_rᵀ (orthonormal
rows) and B ← U_r S_r, so B′A′ = B̄A exactly (B̄A has rank ≤ r) and B′ᵀB′ = S_r² is diagonal and
descending. The SVD is factored (``fedlora.lora.product_svd``: QR of B̄ and Aᵀ, SVD of an r×r
core), never of the d×k product. Why it helps under DP-SGD (the paper's setting): the noise is
added to B's gradient only, never multiplied by a second noised factor, and B's gradient is
s·G·Aᵀ for the gradient G of W, which an orthonormal A cannot enlarge (‖G Aᵀ‖ ≤ ‖G‖).

Follows the paper (read as far as its abstract and the OpenReview summary): B alone trained and
uploaded, B averaged, the SVD of B̄A with the previous A, A = its orthonormal right singular
vectors and B the rest of the SVD, both downloaded, re-factorised periodically. From the code
(``misc/utils.py::reinit_lora``, ``fedmm/fedavg/server.py``): B = U_r·diag(S_r) exactly; the
period ``recalc_period`` (its ``--recalculate-svd-period``: 1 in the paper's scripts; 0, never,
is the default of one copy's parser and is FFA-LoRA, not offered here); ``warmup_rounds`` (its
``--svd-warmup-steps``, default 0: no SVD until that many rounds have passed); weights by data
size (``federation.weighting = "uniform"`` is its ``--balanced``). Where this differs from the
code: the upload is B itself, not its ΔB = B_i − B (the same floats on the wire, and the server's
B + Σ p_i ΔB_i is the same B̄; the framework's central DP, robust rules and secure aggregation
take the update as reply − download); the code also uploads A's zero change and freezes the
classifier head, here A stays off the uplink and the head follows ``lora.train_head`` (trained
and averaged, as in FedIT); the code's SVD is a dense one of the d×k product. Round 1 trains B
against the seeded PEFT init A0 (not orthonormal), as the code does: the first SVD comes after
it. The code resets each client's optimizer every round, and an SVD moves B to other
coordinates, so ``train.keep_optimizer_state`` is refused.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from fedlora.channel import Schema
from fedlora.config import ConfigError
from fedlora.lora import pad_factors, product_svd
from fedlora.methods.base import MethodContext
from fedlora.methods.fedit import FedIT
from fedlora.tensors import TensorDict


class FedSVDOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    recalc_period: int = Field(
        1, ge=1, description="rounds between the server's SVD re-factorisations of B̄A"
    )
    warmup_rounds: int = Field(
        0, ge=0, description="rounds before the first SVD (the code's --svd-warmup-steps)"
    )


class FedSVD(FedIT):
    """FedIT's server loop with A frozen on the clients and re-factorised on the server."""

    name = "fedsvd"
    summary = "FedSVD: train and average B (A frozen); server SVD of B̄A resets A orthonormal (2025)"
    Options = FedSVDOptions

    def __init__(self, context: MethodContext, options: BaseModel) -> None:
        if context.config.train.keep_optimizer_state:
            raise ConfigError(
                "train.keep_optimizer_state: method fedsvd re-factorises B by an SVD on the "
                "server (B ← U·S), so a kept optimizer state would describe other coordinates; "
                "leave it unset"
            )
        super().__init__(context, options)
        self.frozen = {m.a for m in context.modules}

    def refactors(self, round_index: int) -> bool:
        """Whether the server re-factorises after round ``round_index`` (from 0): every
        ``recalc_period`` rounds once ``warmup_rounds`` have passed (the code's test)."""
        done = round_index + 1
        return done % self.options.recalc_period == 0 and done > self.options.warmup_rounds

    def trainable(self, name: str) -> bool:
        return name not in self.frozen

    def expected_reply(self, client: int, message: TensorDict) -> Schema:
        """B and the head; A never leaves the server."""
        return {k: tuple(v.shape) for k, v in message.items() if k not in self.frozen}

    def client_reply(
        self, client: int, trained: TensorDict, message: TensorDict, store: TensorDict
    ) -> TensorDict:
        return {k: v for k, v in trained.items() if k not in self.frozen}

    def aggregate(
        self, round_index: int, replies: dict[int, TensorDict], weights: dict[int, float]
    ) -> None:
        sent = {k: v for k, v in self.state.items() if k not in self.frozen}
        state = {**self.state, **self.combine(round_index, replies, weights, reference=sent)}
        if self.refactors(round_index):
            for m in self.context.modules:
                u, sigma, vh = product_svd(state[m.b], state[m.a], m.rank)
                state[m.b], state[m.a] = pad_factors(u * sigma, vh, m.rank)
        self.state = state
