"""Kill-and-Revive (algorithms.md §3.2): which LoRA modules of one user train at each step.

The paper states only the idea (kill modules whose parameters change little, by the l2 norm of
the change; revive killed ones later). The rule below is our reconstruction, with every choice
a knob: the check period τ, kill by a threshold δ or down to a budget ρ·|M|, relative or
absolute change, how many modules to revive per check and in which order.

The state is a handful of tensors, so it checkpoints as safetensors and a resumed run takes
the same decisions (the random policy draws from a generator seeded by (seed, step)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedlora.lazy import torch
from fedlora.tensors import TensorDict
from fedlora.training import derived_seed

Norm = Literal["relative", "absolute"]
RevivePolicy = Literal["random", "longest_killed_first", "round_robin"]
EPS = 1e-12


@dataclass(frozen=True)
class KillReviveRule:
    tau: int  # check every tau optimizer steps
    budget: float  # fraction of modules left active after the kills (ignored if threshold set)
    threshold: float | None  # kill every active module whose variation is below this
    norm: Norm
    revive: int  # modules revived per check
    policy: RevivePolicy
    seed: int


@dataclass(frozen=True)
class Decision:
    step: int
    variation: dict[int, float]  # per module checked (the active ones)
    killed: list[int]
    revived: list[int]


class KillRevive:
    """The active set S of one user's modules, their snapshots θ_old and their kill times."""

    def __init__(self, count: int, rule: KillReviveRule) -> None:
        self.rule = rule
        self.active = torch.ones(count, dtype=torch.bool)
        self.killed_at = torch.full((count,), -1, dtype=torch.long)
        self.cursor = torch.zeros((), dtype=torch.long)  # round-robin position
        self.snapshots: dict[int, torch.Tensor] = {}

    @property
    def count(self) -> int:
        return len(self.active)

    def active_indices(self) -> list[int]:
        return [int(i) for i in torch.nonzero(self.active).flatten()]

    def start(self, current: list[torch.Tensor]) -> None:
        """θ_old ← θ for every module (before the first step)."""
        self.snapshots = {i: current[i].clone() for i in range(self.count)}

    def due(self, step: int) -> bool:
        """Whether a check follows optimizer step ``step`` (counted from 1)."""
        return step % self.rule.tau == 0

    def variation(self, index: int, current: torch.Tensor) -> float:
        old = self.snapshots[index]
        change = float(torch.linalg.vector_norm(current - old))
        if self.rule.norm == "absolute":
            return change
        return change / (float(torch.linalg.vector_norm(old)) + EPS)

    def check(self, step: int, current: list[torch.Tensor]) -> Decision:
        """Kill by threshold or budget, revive by policy, then re-snapshot the active set.

        ``current[i]`` is module i's parameters (A and B) flattened into one vector. Modules
        killed in this very check are not revive candidates: reviving them at once would undo
        the kill, so revival draws from those killed at earlier checks.
        """
        rule = self.rule
        checked = self.active_indices()
        variation = {i: self.variation(i, current[i]) for i in checked}
        earlier = [i for i in range(self.count) if not self.active[i]]
        if rule.threshold is not None:
            killed = [i for i in checked if variation[i] < rule.threshold]
        else:
            keep = math.ceil(rule.budget * self.count - 1e-9)
            by_change = sorted(checked, key=lambda i: (variation[i], i))
            killed = by_change[: max(0, len(checked) - keep)]
        for i in killed:
            self.active[i] = False
            self.killed_at[i] = step
        revived = self._choose(earlier, step)
        for i in revived:
            self.active[i] = True
            self.killed_at[i] = -1
        for i in self.active_indices():
            self.snapshots[i] = current[i].clone()
        return Decision(step, variation, sorted(killed), revived)

    def _choose(self, candidates: list[int], step: int) -> list[int]:
        count = min(self.rule.revive, len(candidates))
        if count == 0:
            return []
        if self.rule.policy == "random":
            rng = np.random.default_rng(derived_seed(self.rule.seed, step, 0x4B52))
            return sorted(int(i) for i in rng.choice(candidates, size=count, replace=False))
        if self.rule.policy == "longest_killed_first":
            return sorted(candidates, key=lambda i: (int(self.killed_at[i]), i))[:count]
        chosen: list[int] = []
        start = int(self.cursor)
        for offset in range(self.count):
            index = (start + offset) % self.count
            if index in candidates:
                chosen.append(index)
                if len(chosen) == count:
                    break
        self.cursor.fill_((chosen[-1] + 1) % self.count)
        return chosen

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> TensorDict:
        state: TensorDict = {
            "active": self.active.to(torch.uint8),
            "killed_at": self.killed_at,
            "cursor": self.cursor.clone(),
        }
        state.update({f"snapshot.{i}": t for i, t in self.snapshots.items()})
        return state

    def load_state_dict(self, state: TensorDict) -> None:
        self.active = state["active"].to(torch.bool).clone()
        self.killed_at = state["killed_at"].clone()
        self.cursor = state["cursor"].clone()
        self.snapshots = {
            int(k.split(".", 1)[1]): v.clone()
            for k, v in state.items()
            if k.startswith("snapshot.")
        }
