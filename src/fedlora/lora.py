"""The tensor algebra of adapters: pure functions over tensors and tensor dicts.

Methods combine these; tests check them against the identities of algorithms.md §7.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from fedlora.lazy import torch
from fedlora.tensors import TensorDict


def normalized(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("aggregation weights must have a positive sum")
    return [float(w) / total for w in weights]


def weighted_average(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> TensorDict:
    """Σ_i p_i X_i key by key, with p normalised to sum to 1 (FedAvg of each tensor)."""
    if not states:
        raise ValueError("nothing to average")
    p = normalized(weights)
    keys = list(states[0])
    return {k: sum(w * s[k] for w, s in zip(p, states, strict=True)) for k in keys}


def product(b: torch.Tensor, a: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The effective update s·B·A of one module."""
    return scale * (b @ a)


# -- ranks and scales (§1.1) ---------------------------------------------------------------


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """s = α/r (PEFT default) or α/√r (rsLoRA). Moving factors between ranks must compensate s."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def pad_factors(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero columns of B and zero rows of A up to ``rank``: pad(B)·pad(A) = B·A, and the padded
    entries get exactly zero gradient (each is multiplied by the other's zeros), so a rank-r_i
    client can train inside rank-r_max slots without ever touching them."""
    extra = rank - b.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad rank {b.shape[1]} down to {rank}")
    return (
        torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1),
        torch.cat([a, a.new_zeros(extra, a.shape[1])], dim=0),
    )


def truncate_factors(
    b: torch.Tensor, a: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``rank`` components: B[:, :rank], A[:rank, :] (HetLoRA's distribution rule)."""
    return b[:, :rank].clone(), a[:rank, :].clone()


def product_norm(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """‖B·A‖_F from r×r Gram matrices, ‖BA‖² = tr((BᵀB)(AAᵀ)), without forming the d×k product."""
    return torch.sqrt(torch.clamp(((b.T @ b) * (a @ a.T)).sum(), min=0.0))


def sparsity_weights(factors: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """HetLoRA's p_i = ‖B_i A_i‖_F / Σ_j ‖B_j A_j‖_F (summing to 1); [] if every product is 0,
    so the caller can fall back to other weights."""
    norms = [float(product_norm(b, a)) for b, a in factors]
    return normalized(norms) if sum(norms) > 0 else []


def stack_factors(
    bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor], coefficients: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA stacking (§6.6): B_stack = [B_1 … B_K], A_stack = [c_1 A_1; …; c_K A_K], so that
    B_stack·A_stack = Σ c_k B_k A_k exactly, whatever the ranks r_k (stacked rank Σ r_k)."""
    return (
        torch.cat(list(bs), dim=1),
        torch.cat([c * a for c, a in zip(coefficients, as_, strict=True)], dim=0),
    )


def product_svd(
    b: torch.Tensor, a: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` truncated SVD (U, σ, Vᵀ) of B·A from the factors alone.

    With B = Q_B R_B and Aᵀ = Q_A R_A (thin QR), B·A = Q_B (R_B R_Aᵀ) Q_Aᵀ, so the SVD of the
    small m×m core (m = columns of B) gives the SVD of the d×k product. Cost O((d+k)m² + m³)
    instead of forming d×k and an O(dk·min(d,k)) dense SVD. Fewer than ``rank`` components are
    returned when m < rank.
    """
    q_b, r_b = torch.linalg.qr(b)
    q_a, r_a = torch.linalg.qr(a.T)
    u, sigma, vh = torch.linalg.svd(r_b @ r_a.T)
    keep = min(rank, sigma.numel())
    return q_b @ u[:, :keep], sigma[:keep], vh[:keep] @ q_a.T


def weighted_product_svd(
    bs: Sequence[torch.Tensor],
    as_: Sequence[torch.Tensor],
    coefficients: Sequence[float],
    rank: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD of Σ c_i B_i A_i (c_i ≥ 0, e.g. p_i·s_i) by ``product_svd`` of the stacked
    factors [√c_i B_i] and [√c_i A_i] (balanced, so neither factor carries all the weight)."""
    if any(c < 0 for c in coefficients):
        raise ValueError("coefficients must be non-negative")
    roots = [math.sqrt(c) for c in coefficients]
    b = torch.cat([r * bi for r, bi in zip(roots, bs, strict=True)], dim=1)
    a = torch.cat([r * ai for r, ai in zip(roots, as_, strict=True)], dim=0)
    return product_svd(b, a, rank)


def fresh_a(rank: int, d_in: int, generator: torch.Generator) -> torch.Tensor:
    """A new LoRA A drawn like PEFT's default init (Kaiming-uniform, a = √5: U(±1/√d_in))."""
    bound = 1.0 / math.sqrt(d_in)
    return (torch.rand(rank, d_in, generator=generator) * 2.0 - 1.0) * bound


# -- FSLoRA sketches (§5.1, §7 T8) ----------------------------------------------------------


def sketch_indices(r: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """I ⊂ {0..r−1}, |I| = k, uniform without replacement (sorted, for a canonical layout)."""
    if not 1 <= k <= r:
        raise ValueError(f"sketch size k={k} must be in [1, r={r}]")
    return torch.sort(torch.randperm(r, generator=generator)[:k]).values


def sketch_factors(
    b: torch.Tensor, a: torch.Tensor, index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B[:, I], A[I, :]): with scale s·r/k these give s·B S A for S = (r/k) Σ_{j∈I} e_j e_jᵀ."""
    return b[:, index].clone(), a[index, :].clone()


# -- corrections and splits of the 2025 baselines --------------------------------------------


def ridge_b_correction(
    bs: Sequence[torch.Tensor],
    as_: Sequence[torch.Tensor],
    weights: Sequence[float],
    b_bar: torch.Tensor,
    a_bar: torch.Tensor,
    lam: float,
) -> torch.Tensor:
    """LoRA-FAIR's correction ΔB = argmin ‖Σ p_i B_i A_i − (B̄ + ΔB)Ā‖²_F + λ‖ΔB‖²_F.

    Setting the gradient to zero gives ΔB (ĀĀᵀ + λI) = (Σ p_i B_i A_i − B̄Ā)Āᵀ; the right side is
    Σ p_i B_i (A_i Āᵀ) − B̄ (ĀĀᵀ), so only r×r Gram products and d×r factors are formed, never
    the d×k average. ``weights`` are normalised to sum to 1."""
    p = normalized(weights)
    gram = a_bar @ a_bar.T
    target = sum(w * b @ (a @ a_bar.T) for w, b, a in zip(p, bs, as_, strict=True)) - b_bar @ gram
    system = gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(system, target.T).T  # system is symmetric: (X S⁻¹)ᵀ = S⁻¹ Xᵀ


def principal_factors(
    weight: torch.Tensor, rank: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The PiSSA split of W: with W = U Σ Vᵀ, B = U_r √(Σ_r/s) and A = √(Σ_r/s) V_rᵀ, so s·B·A is
    W's best rank-r approximation (Eckart–Young) and both factors carry the same energy."""
    u, sigma, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    root = torch.sqrt(sigma[:rank] / scale)
    return (u[:, :rank] * root).to(weight.dtype), (root[:, None] * vh[:rank]).to(weight.dtype)
