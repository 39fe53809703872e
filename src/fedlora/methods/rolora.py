"""RoLoRA (Chen et al., NeurIPS 2025, arXiv 2502.01755): alternate which LoRA factor is trained.

In one round every client trains B with A frozen at the shared global A, and sends only B (and
the head); in the next it trains A with B frozen and sends only A. With the other factor common
to all clients the average is exact: Σ p_i s B_i A = s(Σ p_i B_i)A, and likewise for A (§7 T2,
FFA-LoRA's identity, but without FFA's A frozen forever). The upload per round is the trained
factor only: d·r or r·k per module, half of FedIT's r(d+k) when d = k.

Follows the paper: alternating optimisation of the two factors, each aggregated by FedAvg while
the other is shared. Reconstructions: the paper alternates the two updates; here one factor per
communication round (``first`` says which, default B: with PEFT's B = 0 init the first A-round
would see zero gradient); the downlink is the whole global adapter (A, B and head) plus a 1-float
phase flag, so a client that missed rounds still starts from the global model; every party could
also know the phase from the round number, the flag makes it explicit on the wire.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedlora.channel import Schema
from fedlora.lazy import torch
from fedlora.lora import weighted_average
from fedlora.methods.base import MethodContext
from fedlora.methods.fedit import FedIT
from fedlora.tensors import TensorDict

PHASE = "rolora.trains_a"  # message flag: 1.0 in A-rounds, 0.0 in B-rounds


class RoLoRAOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    first: Literal["b", "a"] = Field("b", description="the factor trained in round 1")


class RoLoRA(FedIT):
    name = "rolora"
    mean_of_replies = False  # each aggregation is exact only as a mean
    needs_each_reply = ""  # the mean of the factor trained this round
    summary = "RoLoRA: rounds alternate training/averaging B (A frozen) and A (B frozen) (2025)"
    Options = RoLoRAOptions

    def __init__(self, context: MethodContext, options: BaseModel) -> None:
        super().__init__(context, options)
        self.a_names = {m.a for m in context.modules}
        self.b_names = {m.b for m in context.modules}
        self.trains_a = False  # the phase of the client being trained (set by client_start)

    def phase(self, round_index: int) -> bool:
        """Whether round ``round_index`` trains A (else B)."""
        return (round_index % 2 == 1) != (self.options.first == "a")

    def frozen(self, trains_a: bool) -> set[str]:
        return self.b_names if trains_a else self.a_names

    def server_message(self, client: int, round_index: int) -> TensorDict:
        return {**self.state, PHASE: torch.tensor([float(self.phase(round_index))])}

    def client_start(self, client: int, message: TensorDict, store: TensorDict) -> TensorDict:
        self.trains_a = bool(message[PHASE].item())
        return {k: v for k, v in message.items() if k != PHASE}

    def trainable(self, name: str) -> bool:
        return name not in self.frozen(self.trains_a)

    def expected_reply(self, client: int, message: TensorDict) -> Schema:
        """The factor trained this round (and the head), not the frozen one nor the phase."""
        frozen = self.frozen(bool(message[PHASE].item()))
        return {k: tuple(v.shape) for k, v in self.state.items() if k not in frozen}

    def client_reply(
        self, client: int, trained: TensorDict, message: TensorDict, store: TensorDict
    ) -> TensorDict:
        frozen = self.frozen(bool(message[PHASE].item()))
        return {k: v for k, v in trained.items() if k not in frozen}

    def aggregate(
        self, round_index: int, replies: dict[int, TensorDict], weights: dict[int, float]
    ) -> None:
        clients = sorted(replies)
        averaged = weighted_average([replies[c] for c in clients], [weights[c] for c in clients])
        self.state = {**self.state, **averaged}
