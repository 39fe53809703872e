"""LoRA-FAIR (Bian et al., ICCV 2025, arXiv 2411.14961): FedIT's averages with a server-side
correction of B̄, broadcast as the next round's start.

Averaging the factors gives B̄Ā ≠ Σ p_i B_i A_i. The server keeps Ā and looks for a correction
ΔB with (B̄ + ΔB)Ā close to the exact average while ΔB stays small; clients then start the next
round from (B̄ + ΔB, Ā), which is the paper's "initialisation refinement" (the refined global
factors, not a fresh adapter as FLoRA's). The traffic is FedIT's: ΔB is folded into B before
sending.

Follows the paper: the residual correction on B only, regularised towards ΔB = 0, on the
server, no extra communication. Reconstruction: the paper states the objective with a generic
similarity between the ideal and the corrected update plus a weight λ on ‖ΔB‖; we take the
squared Frobenius distance and λ‖ΔB‖²_F, whose minimiser has the closed form
ΔB = (Σ p_i B_i A_i − B̄Ā)Āᵀ(ĀĀᵀ + λI)⁻¹ (``fedlora.lora.ridge_b_correction``, computed from
r×r Gram products, never the d×k average); λ (``lam``) is ours, 0.01 by default, small against
ĀĀᵀ, whose diagonal entries are ≈ 1/3 at PEFT's init, so it barely damps the correction.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from fedlora.lora import ridge_b_correction
from fedlora.methods.fedit import FedIT
from fedlora.tensors import TensorDict


class LoRAFairOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    lam: float = Field(0.01, gt=0, description="ridge weight λ on ‖ΔB‖²")


class LoRAFAIR(FedIT):
    name = "lora_fair"
    mean_of_replies = False  # the correction targets the exact mean of the products
    needs_each_reply = "its correction targets Σ p_i B_i·A_i, which needs each client's product"
    summary = "LoRA-FAIR: FedIT plus a server ridge correction ΔB so (B̄+ΔB)Ā ≈ Σp·B·A (2025)"
    Options = LoRAFairOptions

    def aggregate(
        self, round_index: int, replies: dict[int, TensorDict], weights: dict[int, float]
    ) -> None:
        super().aggregate(round_index, replies, weights)
        clients = sorted(replies)
        for m in self.context.modules:
            self.state[m.b] = self.state[m.b] + ridge_b_correction(
                [replies[c][m.b] for c in clients],
                [replies[c][m.a] for c in clients],
                [weights[c] for c in clients],
                self.state[m.b],
                self.state[m.a],
                self.options.lam,
            )
