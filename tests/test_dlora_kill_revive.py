"""Kill-and-Revive (algorithms.md §3.2, our reconstruction): budget, threshold, norms, revive
policies and checkpointing, on synthetic parameter vectors."""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.dlora.kill_revive import KillRevive, KillReviveRule

N = 16


def rule(**changes: object) -> KillReviveRule:
    base = {
        "tau": 5,
        "budget": 1 / 8,
        "threshold": None,
        "norm": "relative",
        "revive": 1,
        "policy": "longest_killed_first",
        "seed": 7,
    }
    base.update(changes)
    return KillReviveRule(**base)  # type: ignore[arg-type]


def start(kr: KillRevive) -> list[torch.Tensor]:
    params = [torch.ones(4) for _ in range(N)]
    kr.start(params)
    return params


def moved(params: list[torch.Tensor], amounts: list[float]) -> list[torch.Tensor]:
    """Module i's vector moved by amounts[i] in l2 (relative change = amount / 2)."""
    return [p + a / 2 * torch.ones(4) for p, a in zip(params, amounts, strict=True)]


def test_due_every_tau_steps() -> None:
    kr = KillRevive(N, rule(tau=5))
    assert [s for s in range(1, 21) if kr.due(s)] == [5, 10, 15, 20]


def test_budget_keeps_the_most_changed_modules() -> None:
    kr = KillRevive(N, rule())
    params = start(kr)
    amounts = [float(i % 7) + i / 100 for i in range(N)]
    decision = kr.check(5, moved(params, amounts))
    keep = math.ceil(N / 8)
    top = sorted(range(N), key=lambda i: -amounts[i])[:keep]
    assert kr.active_indices() == sorted(top)
    assert decision.revived == []  # nothing was killed before this check
    assert len(decision.killed) == N - keep
    assert decision.variation[5] == pytest.approx(amounts[5] / 2)  # ||Δθ|| / ||θ_old||


def test_threshold_kills_below_delta_and_norms_differ() -> None:
    relative = KillRevive(N, rule(threshold=0.5, revive=0))
    params = start(relative)
    amounts = [0.5 * i + 0.1 for i in range(N)]  # relative change = amount / ||θ_old|| = amount / 2
    relative.check(5, moved(params, amounts))
    assert relative.active_indices() == [i for i in range(N) if amounts[i] / 2 >= 0.5]

    absolute = KillRevive(N, rule(threshold=0.5, revive=0, norm="absolute"))
    absolute.check(5, moved(start(absolute), amounts))
    assert absolute.active_indices() == [i for i in range(N) if amounts[i] >= 0.5]


def two_checks(policy: str, revive: int = 1) -> tuple[KillRevive, list[list[int]]]:
    """Check 1 kills 14 of 16 (modules 0-13 move least); later checks revive by policy."""
    kr = KillRevive(N, rule(policy=policy, revive=revive, budget=2 / N))
    params = start(kr)
    revived = []
    amounts = [float(i) for i in range(N)]
    current = moved(params, amounts)
    kr.check(5, current)
    for step in (10, 15, 20):
        # the active modules keep moving a lot, so budget kills only revived ones
        current = [c + (10.0 if kr.active[i] else 0.0) for i, c in enumerate(current)]
        revived.append(kr.check(step, current).revived)
    return kr, revived


def test_revive_longest_killed_first() -> None:
    kr, revived = two_checks("longest_killed_first")
    # all 14 were killed at step 5: ties break by index; a revived module that is killed
    # again at the next check goes to the back of the queue
    assert revived == [[0], [1], [2]]
    assert sum(kr.active.tolist()) == 3  # budget 2 after kills + 1 revived


def test_revive_round_robin_cycles_through_module_order() -> None:
    kr, revived = two_checks("round_robin", revive=2)
    assert revived == [[0, 1], [2, 3], [4, 5]]
    assert int(kr.cursor) == 6


def test_revive_random_is_seeded_and_draws_killed_modules() -> None:
    first, revived = two_checks("random", revive=3)
    again, revived_again = two_checks("random", revive=3)
    assert revived == revived_again
    for picks in revived:
        assert len(set(picks)) == 3
    assert first.active.tolist() == again.active.tolist()


def test_state_round_trip_takes_the_same_decisions() -> None:
    kr, _ = two_checks("random", revive=2)
    copy = KillRevive(N, kr.rule)
    copy.load_state_dict(kr.state_dict())
    probe = [torch.randn(4, generator=torch.Generator().manual_seed(i)) for i in range(N)]
    assert kr.check(25, probe) == copy.check(25, probe)
    assert kr.active.tolist() == copy.active.tolist()


def test_budget_one_keeps_every_module() -> None:
    kr = KillRevive(N, rule(budget=1.0))
    params = start(kr)
    decision = kr.check(5, moved(params, [0.0] * N))
    assert decision.killed == [] and kr.active_indices() == list(range(N))
