"""Fed-SB (Singhal et al., arXiv 2502.15436; code CERT-Lab/fed-sb) on LoRA-SB: ΔW = s·B R A with
B and A fixed and shared, and only the r×r matrix R trained, sent and averaged.

With B and A common to every client, Σ p_i s·B R_i A = s·B (Σ p_i R_i) A: averaging R is exactly
averaging the updates, and a client uploads r² floats per module (plus the head) instead of
r(d+k).

The adapter structure, without touching the PEFT slots: the slot B holds B·R and the slot A holds
A; the slot A is frozen, and the local optimizer (``CoreOptimizer``) trains R itself: each step
it maps the slot gradient G_B to R's gradient Bᵀ G_B (exact, since ∂(B R)/∂R is that
projection), steps its inner AdamW/SGD on R, and writes B·R back. B has orthonormal columns, so
the client recovers R = Bᵀ·(slot B) exactly and the exported adapter is a plain PEFT LoRA one.

Follows the paper: fixed B and A from a truncated SVD of an estimate of the first update (B the
left, A the right singular vectors), R initialised from its singular values (the code sets R = Σ_r),
FedAvg of R, only R and the head on the wire after the initialisation. Reconstruction: the code's
estimate is −lr·sign(Σ ∇W) of the full weights over a few batches (50-170 examples) of the pooled
training data, which a federated run does not have and LoRA slots cannot compute; here
``init_rounds`` rounds (default 1) of FedIT-style LoRA training, whose exactly averaged update Σ p_i
s B_i A_i is factored by a truncated SVD (from the factors, never the d×k product): B = U_r, A =
V_rᵀ, R = Σ_r / s, so the global model after the last of those rounds is the best rank-r
approximation of their exact average (the code's R = Σ_r under the scale s instead starts the model
at s times its estimate), and training continues in those fixed singular subspaces. The server sends
B and A to each client once (it keeps a per-client flag), R and the head every round. Gradient
clipping, if set, clips the slot gradient before the projection.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from fedlora.channel import Schema, schema_of
from fedlora.config import ConfigError, TrainConfig
from fedlora.lazy import torch
from fedlora.lora import weighted_average, weighted_product_svd
from fedlora.methods.base import Method, MethodContext, store_under, stored
from fedlora.methods.factors import averaged_head, head_of
from fedlora.tensors import TensorDict
from fedlora.training import standard_optimizer

CORE, BASIS_B, BASIS_A = ".fedsb_R", ".fedsb_B", ".fedsb_A"  # suffixes to module keys
BASIS = "fedsb.basis."  # client-store prefix of the fixed factors
SENT = "fedsb.has_basis"  # server state: 1.0 for every client that replied holding the factors


class FedSBOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    init_rounds: int = Field(1, ge=1, description="FedIT rounds whose SVD fixes B and A")


class FedSB(Method):
    name = "fedsb"
    summary = "Fed-SB: LoRA-SB's fixed B, A from an SVD; only r×r R trained and averaged (2025)"
    Options = FedSBOptions
    needs_each_reply = (
        "its init rounds take an SVD of Σ p_i s·B_i·A_i, which needs each client's product"
    )

    def __init__(self, context: MethodContext, options: BaseModel) -> None:
        super().__init__(context, options)
        if context.config.train.keep_optimizer_state:
            raise ConfigError(
                "train.keep_optimizer_state: method fedsb changes the trained tensors after "
                "its init rounds (factors, then R); leave it unset"
            )
        self.state: TensorDict = {k: v.clone() for k, v in context.initial.items()}
        self.basis: TensorDict = {}  # module key + BASIS_B / BASIS_A: U (d×r), A (r×k)
        self.sent = torch.zeros(len(context.num_examples))
        self.current: TensorDict | None = None  # the basis of the client being trained

    # -- server ----------------------------------------------------------------------------
    def server_message(self, client: int, round_index: int) -> TensorDict:
        if not self.basis:
            return self.state
        if self.sent[client] == 0:  # until a reply shows the client holds the fixed factors
            return {**self.state, **self.basis}
        return self.state

    def aggregate(
        self, round_index: int, replies: dict[int, TensorDict], weights: dict[int, float]
    ) -> None:
        clients = sorted(replies)
        if self.basis:  # a reply to a message with the factors: its client stored them
            self.sent[clients] = 1.0
        # After the init rounds Σ p_i R_i (exact, module docstring); before, FedIT's averages.
        self.state = weighted_average([replies[c] for c in clients], [weights[c] for c in clients])
        if self.basis or round_index + 1 < self.options.init_rounds:
            return
        modules = self.context.modules
        state = averaged_head(replies, weights, modules)
        total = sum(weights[c] for c in clients)
        for m in modules:
            u, sigma, vh = weighted_product_svd(
                [replies[c][m.b] for c in clients],
                [replies[c][m.a] for c in clients],
                [weights[c] / total * m.scale for c in clients],
                m.rank,
            )
            self.basis[m.key + BASIS_B], self.basis[m.key + BASIS_A] = u, vh
            state[m.key + CORE] = torch.diag(sigma) / m.scale
        self.state = state

    def global_state(self) -> TensorDict:
        return self.slot_state(self.state, self.basis) if self.basis else self.state

    def slot_state(self, message: TensorDict, basis: TensorDict) -> TensorDict:
        """Slot B = U·R and slot A = A for every module, and the head."""
        state = {k: v for k, v in message.items() if k in self.context.initial}
        for m in self.context.modules:
            state[m.b] = basis[m.key + BASIS_B] @ message[m.key + CORE]
            state[m.a] = basis[m.key + BASIS_A]
        return state

    # -- client ----------------------------------------------------------------------------
    def client_start(self, client: int, message: TensorDict, store: TensorDict) -> TensorDict:
        store_under(store, BASIS, {k: v for k, v in message.items() if k.endswith(BASIS_B)})
        store_under(store, BASIS, {k: v for k, v in message.items() if k.endswith(BASIS_A)})
        trains_core = any(k.endswith(CORE) for k in message)
        self.current = stored(store, BASIS) if trains_core else None
        if self.current is None:
            return message
        return self.slot_state(message, self.current)

    def trainable(self, name: str) -> bool:
        return self.current is None or name not in {m.a for m in self.context.modules}

    def local_optimizer(
        self, params: list[tuple[str, torch.nn.Parameter]], config: TrainConfig
    ) -> torch.optim.Optimizer:
        if self.current is None:
            return standard_optimizer(params, config)
        bases = {m.b: self.current[m.key + BASIS_B] for m in self.context.modules}
        from fedlora.core_optimizer import CoreOptimizer  # subclasses torch's: lazily

        return CoreOptimizer(params, bases, config)

    def expected_reply(self, client: int, message: TensorDict) -> Schema:
        """The whole adapter during the init rounds; afterwards R (r x r) and the head."""
        if not self.basis:
            return schema_of(self.context.initial)
        schema = schema_of(head_of(self.context.initial, self.context.modules))
        for m in self.context.modules:
            schema[m.key + CORE] = (m.rank, m.rank)
        return schema

    def client_reply(
        self, client: int, trained: TensorDict, message: TensorDict, store: TensorDict
    ) -> TensorDict:
        if self.current is None:
            return trained
        modules = self.context.modules
        reply = head_of(trained, modules)
        for m in modules:  # R = Uᵀ(U R): exact, U has orthonormal columns
            reply[m.key + CORE] = self.current[m.key + BASIS_B].T @ trained[m.b]
        return reply

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> TensorDict:
        return {**self.state, **self.basis, SENT: self.sent.clone()}

    def load_state_dict(self, state: TensorDict) -> None:
        self.sent = state[SENT].clone()
        self.basis = {k: v for k, v in state.items() if k.endswith((BASIS_B, BASIS_A))}
        self.state = {k: v for k, v in state.items() if k != SENT and k not in self.basis}
