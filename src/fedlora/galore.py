"""GaLore-AdamW (galore-torch) as a local optimizer whose projection really happens.

galore-torch projects a parameter's gradient only if its param group carries the keys ``rank``,
``update_proj_gap``, ``scale`` and ``proj_type``; without them the same class is plain AdamW
(algorithms.md §4.6: the released FedFTG code builds it that way, so GaLore never engages).
``galore_adamw`` puts the 2-D weight matrices in a keyed group and everything else (the head) in
a plain one. ``CheckpointableGaLoreAdamW`` stores each projector as its orthonormal matrix, so
the optimizer state is tensors only: it can be kept between rounds, checkpointed as safetensors
and restored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from galore_torch import GaLoreAdamW
from galore_torch.galore_projector import GaLoreProjector

from fedlora.config import TrainConfig
from fedlora.training import parameter_groups

if TYPE_CHECKING:
    from fedlora.methods.fedftg import ProjectionType

PROJECTION_KEYS = ("rank", "update_proj_gap", "scale", "proj_type")


class CheckpointableGaLoreAdamW(GaLoreAdamW):
    """galore-torch's AdamW, with the projector objects in its state dict as tensors."""

    def state_dict(self) -> dict[str, Any]:
        packed = super().state_dict()
        packed["state"] = {
            index: {
                key: value.ortho_matrix.contiguous()
                if isinstance(value, GaLoreProjector)
                else value
                for key, value in entry.items()
            }
            for index, entry in packed["state"].items()
        }
        return packed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for parameter in group["params"]:
                entry = self.state.get(parameter, {})
                if "step" in entry:  # galore-torch counts steps in a Python int
                    entry["step"] = int(entry["step"])
                if torch.is_tensor(entry.get("projector")):
                    projector = GaLoreProjector(
                        group["rank"],
                        update_proj_gap=group["update_proj_gap"],
                        scale=group["scale"],
                        proj_type=group["proj_type"],
                    )
                    projector.ortho_matrix = entry["projector"]
                    entry["projector"] = projector


def galore_adamw(
    params: list[tuple[str, torch.nn.Parameter]],
    projected: set[str],
    config: TrainConfig,
    rank: int,
    update_proj_gap: int,
    scale: float,
    proj_type: ProjectionType,
) -> CheckpointableGaLoreAdamW:
    """GaLore-AdamW with the projection engaged on the ``projected`` matrices (the target
    weights); the rest (the head) goes in plain AdamW groups, split as every method's optimizer
    is (``parameter_groups``: ``train.head_lr`` if given).
    eps = 1e-8 as torch's AdamW, so against direct weight averaging with AdamW the projection
    is the only difference."""
    matrices = [p for name, p in params if name in projected]
    others = [(name, p) for name, p in params if name not in projected]
    keys = dict(zip(PROJECTION_KEYS, (rank, update_proj_gap, scale, proj_type), strict=True))
    groups: list[dict[str, Any]] = [{"params": matrices, **keys}]
    groups += [group for group in parameter_groups(others, config) if group["params"]]
    return CheckpointableGaLoreAdamW(
        groups,
        lr=config.lr,
        eps=1e-8,
        weight_decay=config.weight_decay,
        no_deprecation_warning=True,
    )
