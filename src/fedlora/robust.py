"""The server's combination of replies: the weighted mean, or a robust rule against broken or
malicious clients (``federation.aggregator``), one implementation for every method whose server
step is a mean of replies.

- ``mean``: Σ p_i X_i (FedAvg).
- ``median``: the coordinate-wise median (the mean of the two middle values for an even count),
  unweighted, as in Yin et al. (2018).
- ``trimmed_mean``: per coordinate, drop the ⌊β·n⌋ largest and smallest values and average the
  rest (unweighted; β = ``trim_fraction``).
- ``norm_clip``: each client's update X_i − X_ref scaled to norm at most ``clip_norm`` (the norm of
  all its tensors together), then the weighted mean, added to X_ref (Sun et al. 2019).

Median and trimmed mean are translation invariant, so they act on the replies themselves;
norm clipping needs the state the clients started from (``reference``; zero for methods whose
replies are already updates).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from fedlora.config import FederationConfig
from fedlora.lazy import torch
from fedlora.lora import weighted_average
from fedlora.tensors import TensorDict


def coordinate_median(stack: torch.Tensor) -> torch.Tensor:
    """Median over dim 0 (numpy's: the middle two averaged for an even count)."""
    ordered = stack.sort(dim=0).values
    n = ordered.shape[0]
    if n % 2:
        return ordered[n // 2]
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def trimmed_mean(stack: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean over dim 0 after dropping the ⌊fraction·n⌋ smallest and largest per coordinate."""
    n = stack.shape[0]
    cut = math.floor(fraction * n)
    if n - 2 * cut < 1:
        cut = (n - 1) // 2
    return stack.sort(dim=0).values[cut : n - cut].mean(dim=0)


def update_of(
    state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor] | None
) -> TensorDict:
    """X − X_ref (X itself where the reference lacks the tensor, or without a reference)."""
    return {
        k: v - reference[k] if reference is not None and k in reference else v
        for k, v in state.items()
    }


def applied(
    update: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor] | None
) -> TensorDict:
    """X_ref + update: the inverse of ``update_of``."""
    if reference is None:
        return dict(update)
    return {k: reference[k] + u if k in reference else u for k, u in update.items()}


def norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of all the tensors together (in float64)."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))


def clip(update: Mapping[str, torch.Tensor], clip_norm: float) -> tuple[TensorDict, float]:
    """``update`` scaled by min(1, clip_norm / ‖update‖), and its norm before clipping."""
    size = norm(update)
    factor = min(1.0, clip_norm / size) if size > 0 else 1.0
    return {k: u * factor for k, u in update.items()}, size


def clipped_updates(
    states: Sequence[Mapping[str, torch.Tensor]],
    reference: Mapping[str, torch.Tensor] | None,
    clip_norm: float,
) -> list[TensorDict]:
    """Each X_i − X_ref, scaled by min(1, clip_norm / ‖X_i − X_ref‖) over all its tensors."""
    return [clip(update_of(state, reference), clip_norm)[0] for state in states]


def combine(
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    rule: FederationConfig,
    reference: Mapping[str, torch.Tensor] | None = None,
) -> TensorDict:
    """The aggregate of ``states`` under ``rule.aggregator`` (every state has the same keys)."""
    if not states:
        raise ValueError("nothing to aggregate")
    if rule.aggregator == "mean":
        return weighted_average(states, weights)
    if rule.aggregator == "norm_clip":
        assert rule.clip_norm is not None  # the schema insists
        mean_update = weighted_average(clipped_updates(states, reference, rule.clip_norm), weights)
        return applied(mean_update, reference)
    combined = {}
    for key in states[0]:
        stack = torch.stack([s[key] for s in states])
        if rule.aggregator == "median":
            combined[key] = coordinate_median(stack)
        else:
            combined[key] = trimmed_mean(stack, rule.trim_fraction)
    return combined
