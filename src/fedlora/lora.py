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
