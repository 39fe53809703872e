"""The record of Kill-and-Revive: which modules were active at each step, as JSON and as a
module x step heat map."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt
import torch

from fedlora.dlora.split import PEFT_PREFIX


def short_names(keys: list[str]) -> list[str]:
    """Module keys without the wrapper prefix and the path every key shares."""
    parts = [k.removeprefix(PEFT_PREFIX).split(".") for k in keys]
    shared = 0
    while all(len(p) > shared + 1 and p[shared] == parts[0][shared] for p in parts):
        shared += 1
    return [".".join(p[shared:]) for p in parts]


def write_schedule(path: Path, keys: list[str], schedules: dict[int, torch.Tensor]) -> None:
    """``schedules[user]`` is a steps x modules bool mask; written as the active module
    indices per step (step 1 first), plus the module names."""
    body = {
        "modules": keys,
        "users": {
            str(user): [torch.nonzero(row).flatten().tolist() for row in mask]
            for user, mask in schedules.items()
        },
    }
    path.write_text(json.dumps(body))


def plot_schedule(path: Path, keys: list[str], mask: torch.Tensor, title: str) -> None:
    steps = mask.shape[0]
    width = min(14.0, max(6.0, 4 + steps / 40))
    figure, axis = plt.subplots(figsize=(width, min(12.0, 2 + len(keys) / 5)))
    axis.imshow(
        mask.T.float().numpy(),
        aspect="auto",
        interpolation="nearest",
        cmap="Greens",
        vmin=0,
        vmax=1,
        extent=(0.5, steps + 0.5, len(keys) - 0.5, -0.5),
    )
    every = max(1, len(keys) // 40)
    axis.set_yticks(range(0, len(keys), every))
    axis.set_yticklabels(short_names(keys)[::every], fontsize=6)
    axis.set_xlabel("training step")
    share = float(mask.float().mean())
    axis.set_title(f"{title}: active modules (dark), {share:.1%} of module-steps", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
