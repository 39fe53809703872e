"""FRLoRA (Yan et al., ICLR 2025; code IAMJackYan/FRLoRA): merge each round's aggregated update
into the global base, and restart every client's LoRA from the principal singular directions.

Start factors (PiSSA's split, ``fedlora.lora.principal_factors``): with W = U Σ Vᵀ,
B_s = U_r √(Σ_r/s), A_s = √(Σ_r/s) V_rᵀ, and the base is moved to W − s·B_s A_s, so training
starts exactly at W while the adapter holds W's top-r part. Each round clients train from
(B_s, A_s); the server averages the factors (FedAvg) and merges ΔW_t = s(B̄Ā − B_s A_s) into the
global weights, so after T rounds the model is W0 + Σ_t ΔW_t (a sum of rank-2r updates, so the
global update leaves the rank-r space: the paper's "residual" higher-rank global update).

Follows the paper and its code: the PiSSA-style start, FedAvg of A and B, the merge of the
averaged product minus the start product into every party's base, and the restart from the
principal factors every round. ``restart``:

- ``"pretrained"`` (default; the paper's abstract and its code): the principal factors of the
  pre-trained W0, computed once (every party has W0, so they never travel);
- ``"updated"``: the principal factors of the current merged weights W0 + Σ ΔW, recomputed by the
  server after every merge and sent to the clients (a reading of the method in which the restart
  follows the moving model; our option).

Reconstructions: size weights p_i (the code averages uniformly; ``federation.weighting =
"uniform"`` gives that). Downlink: the last round's averaged factors (B̄, Ā), r(d+k) per
module, which a deployment's clients add to their own base copies (in simulation the engine
merges the shared base, ``Method.base_offset``), plus the head, plus in ``"updated"`` mode the
restart factors. The exported PEFT adapter holds (B_s, A_s) for the merged base, as FLoRA's.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedlora.channel import Schema, schema_of
from fedlora.config import ConfigError
from fedlora.lazy import torch
from fedlora.lora import principal_factors, weighted_average
from fedlora.methods.base import Method, MethodContext
from fedlora.methods.factors import Factors, averaged_head, factors_of, head_of, pack
from fedlora.tensors import TensorDict

MERGED = "merged."  # method-state prefix: Σ_t ΔW_t per module key
START = "start."  # method-state prefix: the current restart factors, wire names
UPDATE = "update."  # method-state prefix: last round's averaged factors, sent next round


class FRLoRAOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    restart: Literal["pretrained", "updated"] = Field(
        "pretrained", description="principal factors of W0, or of the merged weights"
    )


class FRLoRA(Method):
    name = "frlora"
    summary = "FRLoRA: merge s(B̄Ā − B_sA_s) into the base each round, restart from W's SVD (2025)"
    Options = FRLoRAOptions
    needs_base_weights = True
    needs_each_reply = ""  # it merges the product of the mean factors

    def __init__(self, context: MethodContext, options: BaseModel) -> None:
        super().__init__(context, options)
        if context.config.model.quantize_4bit:
            raise ConfigError("method frlora needs float base weights; set model.quantize_4bit")
        modules = context.modules
        self.head: TensorDict = head_of(context.initial, modules)
        self.merged: TensorDict = {m.key: torch.zeros(m.d_out, m.d_in) for m in modules}
        self.base: TensorDict = {}  # W0 per module key, from attach_base
        self.start: TensorDict = {}  # (B_s, A_s) in wire names
        self.update: TensorDict = {}

    def attach_base(self, weights: TensorDict) -> None:
        self.base = {m.key: weights[m.key] for m in self.context.modules}
        self.start = self._principal(self.base)

    def _principal(self, weights: TensorDict) -> TensorDict:
        modules = self.context.modules
        factors: Factors = {
            m.key: principal_factors(weights[m.key], m.rank, m.scale) for m in modules
        }
        return pack(factors, modules)

    # -- server ----------------------------------------------------------------------------
    def server_message(self, client: int, round_index: int) -> TensorDict:
        restart = self.start if self.options.restart == "updated" else {}
        return {**restart, **self.update, **self.head}

    def aggregate(
        self, round_index: int, replies: dict[int, TensorDict], weights: dict[int, float]
    ) -> None:
        modules, clients = self.context.modules, sorted(replies)
        self.head = averaged_head(replies, weights, modules)
        averaged = weighted_average(
            [{k: replies[c][k] for k in self.start} for c in clients], [weights[c] for c in clients]
        )
        start = factors_of(self.start, modules)
        for m in modules:
            b_start, a_start = start[m.key]
            delta = m.scale * (averaged[m.b] @ averaged[m.a] - b_start @ a_start)
            self.merged[m.key] = self.merged[m.key] + delta
        self.update = {
            f"{m.key}.update_{part}": averaged[name]
            for m in modules
            for part, name in (("B", m.b), ("A", m.a))
        }
        if self.options.restart == "updated":
            self.start = self._principal({k: self.base[k] + self.merged[k] for k in self.base})

    def base_offset(self) -> TensorDict:
        """W = W0 + Σ ΔW − s·B_s A_s, so that base plus the restart adapter is W0 + Σ ΔW."""
        start = factors_of(self.start, self.context.modules)
        return {
            m.key: self.merged[m.key] - m.scale * start[m.key][0] @ start[m.key][1]
            for m in self.context.modules
        }

    def global_state(self) -> TensorDict:
        return {**self.start, **self.head}

    # -- client ----------------------------------------------------------------------------
    def client_start(self, client: int, message: TensorDict, store: TensorDict) -> TensorDict:
        """The restart factors (sent in "updated" mode, every party's own otherwise) and the
        head; the update factors are for a deployment's base merge, not for training."""
        return {**self.start, **{k: v for k, v in message.items() if k in self.context.initial}}

    def expected_reply(self, client: int, message: TensorDict) -> Schema:
        """The whole trained adapter (the download carries updates and a restart)."""
        return schema_of(self.context.initial)

    def client_reply(
        self, client: int, trained: TensorDict, message: TensorDict, store: TensorDict
    ) -> TensorDict:
        return trained

    # -- checkpointing ---------------------------------------------------------------------
    def state_dict(self) -> TensorDict:
        return {
            **self.head,
            **{MERGED + k: v for k, v in self.merged.items()},
            **{START + k: v for k, v in self.start.items()},
            **{UPDATE + k: v for k, v in self.update.items()},
        }

    def load_state_dict(self, state: TensorDict) -> None:
        prefixes = (MERGED, START, UPDATE)
        parts = [{k[len(p) :]: v for k, v in state.items() if k.startswith(p)} for p in prefixes]
        self.merged, self.start, self.update = parts
        self.head = {k: v for k, v in state.items() if not k.startswith(prefixes)}
