"""Streaming aggregation: the server folds each reply into a running weighted sum as it
arrives, so a round holds one sum instead of every decoded reply (issue 16).

For a method whose server step needs only the weighted mean of the replies (no
``needs_each_reply``) under the plain ``mean`` aggregator, Σ_i w_i X_i / Σ_i w_i is all the
server step uses, and ``Method.aggregate_mean`` takes it. The sum is kept in float64, so the
order in which replies arrive changes the result by float64 rounding only (≈1e-16 relative,
far below the float32 of the tensors themselves), and the mean is returned in each reply's own
dtype. Who needs every reply keeps them: robust aggregators (a median needs all values), central
DP (each update is clipped, the sum noised; ``fedlora.privacy.central``), secure aggregation
(the clients hold their replies until the masked sum), and the methods whose server step reads
each reply (FlexLoRA's SVD, HetLoRA's norm weights, FLoRA's stacking, ...).
"""

from __future__ import annotations

from collections.abc import Mapping

from fedlora.lazy import torch
from fedlora.tensors import TensorDict


class RunningMean:
    """Σ_i w_i X_i / Σ_i w_i over the replies ``add``-ed so far, one float64 sum per tensor."""

    def __init__(self) -> None:
        self.total: TensorDict = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.weight = 0.0
        self.count = 0

    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold in one reply with its raw (unnormalised) weight; every reply has the same keys
        and shapes (the server checked each against the method's expected schema)."""
        if weight <= 0:
            raise ValueError(f"a reply's weight must be positive, got {weight}")
        if self.count and set(state) != set(self.total):
            raise ValueError("every reply of a round must have the same tensors")
        for key, tensor in state.items():
            if key in self.total:
                self.total[key].add_(tensor.detach().double(), alpha=weight)
            else:
                self.total[key] = tensor.detach().double() * weight
                self.dtypes[key] = tensor.dtype
        self.weight += weight
        self.count += 1

    def mean(self) -> TensorDict:
        if not self.count:
            raise ValueError("nothing to average")
        return {k: (v / self.weight).to(self.dtypes[k]) for k, v in self.total.items()}
