"""FedRot-LoRA (Zhang et al., ICML 2026, arXiv 2602.23638; code haoran-zh/FedRot-LoRA): before
uploading, each client rotates its factors into the coordinates of the global ones it received;
the server then averages A and B separately, as FedIT does.

A LoRA update is invariant under any orthogonal R: (B R)(Rᵀ A) = B A. Clients that start from the
same factors drift into differently rotated latent bases, and averaging misaligned factors makes
the cross terms B_i A_j interfere. The client solves an orthogonal Procrustes problem against the
reference it received (A_ref, B_ref = the global factors of its download): by A, M = A_i A_refᵀ;
by B, M = B_iᵀ B_ref (both r×r); R = U Vᵀ from M = U S Vᵀ maximises tr(RᵀM) (= ‖M‖_*, so
‖Rᵀ A_i − A_ref‖_F, resp. ‖B_i R − B_ref‖_F, is minimal over O(r)); then A_i ← Rᵀ A_i and
B_i ← B_i R, which leaves the client's product B_i A_i unchanged. Nothing is added to the wire
but a 1-float flag on the downlink saying which factor this round aligns by.

Follows the paper: client-side orthogonal Procrustes alignment to the received global factors
before FedAvg of A and B separately, the product preserved, the same upload as FedIT. (The
paper was read as far as its abstract and published summaries; the rest is the code's.)
From the official code (``federatedscope/rotation_alignment_tools.py`` and
``federatedscope/core/workers/client.py``), each a named option here: rounds alternate the factor
that sets R, A first (``first``): the code picks it by the parity of its round counter (from 0;
odd: A under ``lora.initialshare = 'A'``, the setting of its FedRot configs), so from its first
aligned round the order is A, B, A, …; its config default ``initialshare = ''`` would give B, A,
B, …. ``align = "a"``/``"b"`` always aligns by one factor (the code's ``lora.ablation``). Round 1
uploads unaligned factors (``align_from_round`` = 2; the code's comment: "the first round cannot
rotate"; aligned by B it would see B_ref = 0, so M = 0). ``rotate_lambda`` (default 1.5, the
code's): any λ > 1 is the hard Procrustes solution over O(r), reflections allowed (the code's
``rotation_alignment`` has no determinant check); λ ≤ 1 takes the code's soft path: the SO(r)
solution (Kabsch: the last singular pair's sign flipped when det UVᵀ < 0), which is the whole
rotation at λ = 1, and for λ < 1 the orthogonal polar factor of (1 − λ)I + λR, the rotation
interpolated toward the identity and projected back onto the orthogonal matrices (λ = 0: no
rotation). Reconstructed: M and its SVDs in float64 (the code: float32); a non-finite M leaves the
factors unrotated (the code falls back to I when the SVD fails); weights by data size
(FederatedScope's default).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fedlora.channel import Schema
from fedlora.lazy import torch
from fedlora.methods.fedit import FedIT
from fedlora.tensors import TensorDict

ALIGN = "fedrot.align"  # message flag: which factor sets this round's rotation
UNALIGNED, BY_A, BY_B = 0, 1, 2


class FedRotOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    rotate_lambda: float = Field(
        1.5,
        ge=0.0,
        description="> 1: hard Procrustes rotation in O(r); ≤ 1: in SO(r), softened toward I",
    )
    align: Literal["alternate", "a", "b"] = Field(
        "alternate", description="the factor whose M sets R: alternating, or always A or B"
    )
    first: Literal["a", "b"] = Field(
        "a", description="alternate: the factor of the first aligned round"
    )
    align_from_round: int = Field(
        2, ge=1, description="the first round (from 1) whose uploads are aligned"
    )


def procrustes_rotation(m: torch.Tensor, rotate_lambda: float) -> torch.Tensor:
    """The r×r orthogonal R of the alignment whose cross-Gram is ``m`` (float64).

    λ > 1: R = U Vᵀ (M = U S Vᵀ), the maximiser of tr(RᵀM) over O(r). λ ≤ 1: the maximiser over
    SO(r) (Kabsch), and for λ < 1 the polar factor of (1 − λ)I + λR, a rotation part of the way
    from I to R. A non-finite M gives I: the factors go up unrotated."""
    eye = torch.eye(m.shape[0], dtype=torch.float64)
    if not bool(torch.isfinite(m).all()):
        return eye
    u, _, vh = torch.linalg.svd(m.double())
    rotation = u @ vh
    if rotate_lambda > 1.0:
        return rotation
    if torch.linalg.det(rotation) < 0:
        vh = vh.clone()
        vh[-1] = -vh[-1]
        rotation = u @ vh
    if rotate_lambda == 1.0:
        return rotation
    u_soft, _, vh_soft = torch.linalg.svd((1.0 - rotate_lambda) * eye + rotate_lambda * rotation)
    return u_soft @ vh_soft


class FedRot(FedIT):
    """FedIT with each client's factors rotated onto the global ones before they are sent."""

    name = "fedrot"
    summary = "FedRot-LoRA: clients rotate A, B onto the global factors (Procrustes); FedAvg (2026)"
    Options = FedRotOptions

    def alignment(self, round_index: int) -> int:
        """How round ``round_index`` (from 0) aligns: ``UNALIGNED``, ``BY_A`` or ``BY_B``."""
        start = self.options.align_from_round - 1
        if round_index < start:
            return UNALIGNED
        factor = self.options.align
        if factor == "alternate":
            other = "b" if self.options.first == "a" else "a"
            factor = self.options.first if (round_index - start) % 2 == 0 else other
        return BY_A if factor == "a" else BY_B

    def server_message(self, client: int, round_index: int) -> TensorDict:
        return {**self.state, ALIGN: torch.tensor([float(self.alignment(round_index))])}

    def client_start(self, client: int, message: TensorDict, store: TensorDict) -> TensorDict:
        return {k: v for k, v in message.items() if k != ALIGN}

    def expected_reply(self, client: int, message: TensorDict) -> Schema:
        """The whole adapter, as FedIT's; not the flag."""
        return {k: tuple(v.shape) for k, v in message.items() if k != ALIGN}

    def client_reply(
        self, client: int, trained: TensorDict, message: TensorDict, store: TensorDict
    ) -> TensorDict:
        how = int(message[ALIGN].item())
        reply = dict(trained)
        if how == UNALIGNED:
            return reply
        for m in self.context.modules:
            b, a = trained[m.b], trained[m.a]
            if how == BY_A:
                cross = a.double() @ message[m.a].double().T  # A_i A_refᵀ
            else:
                cross = b.double().T @ message[m.b].double()  # B_iᵀ B_ref
            rotation = procrustes_rotation(cross, self.options.rotate_lambda).to(b.dtype)
            reply[m.b], reply[m.a] = b @ rotation, rotation.T @ a
        return reply
