"""The tensor algebra of adapters: pure functions over tensors and tensor dicts.

Methods combine these; tests check them against the identities of algorithms.md §7.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

TensorDict = dict[str, torch.Tensor]


def normalized(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("aggregation weights must have a positive sum")
    return [float(w) / total for w in weights]


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> TensorDict:
    """Σ_i p_i X_i key by key, with p normalised to sum to 1 (FedAvg of each tensor)."""
    if not states:
        raise ValueError("nothing to average")
    p = normalized(weights)
    keys = list(states[0])
    return {k: sum(w * s[k] for w, s in zip(p, states, strict=True)) for k in keys}


def product(b: torch.Tensor, a: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """The effective update s·B·A of one module."""
    return scale * (b @ a)


def truncated_product_sum(
    bs: Sequence[torch.Tensor], as_: Sequence[torch.Tensor], weights: Sequence[float], rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors (B, A) of Σ_j w_j B_j A_j without forming the d×k product.

    The sum equals [w_1 B_1 … w_n B_n] [A_1; …; A_n]; thin QRs of both stacks reduce its SVD to
    that of an (n·r)×(n·r) core, so the cost is O((d+k)(n·r)²), not O(d·k). The result is the best
    rank-r approximation (Eckart–Young). Gauge: A = V_rᵀ has orthonormal rows and B = U_r Σ_r, so A
    keeps the O(1) scale of a LoRA init and a zero sum still leaves A trainable (B = 0).
    """
    b_stack = torch.cat([w * b for w, b in zip(weights, bs, strict=True)], dim=1)
    a_stack = torch.cat(list(as_), dim=0)
    q_b, r_b = torch.linalg.qr(b_stack)
    q_a, r_a = torch.linalg.qr(a_stack.T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    return q_b @ (u[:, :rank] * s[:rank]), vh[:rank] @ q_a.T
