"""Has a run stopped improving, and what does a comparison of two arms over seeds say?

Two stated rules, so that a study's verdicts rest on trained models and on the spread over seeds
rather than on a reader's eye (``benchmarks/study.py`` applies them to every study):

Plateau. A run has plateaued when the best value of its metric over the last third of its
rounds beats the best value before that by at most ``tolerance`` (default 0.005: half a point of
accuracy). The rule looks for improvement late in the budget; "the best of the last third within
0.5 points of the best overall" would hold for every curve that is still rising (its best *is*
in the last third), so the last third is compared with what came before it instead. With no
evaluation in the last third, or none before it, the rule cannot say (``None``), which counts
as not plateaued.

Verdict. The effect is mean(arm) − mean(reference) of the final metric over seeds, signed so that
positive is better, with the standard error of a difference of two means,
se = sqrt(s_arm²/n_arm + s_ref²/n_ref) (sample standard deviations). A ``better`` claim (the arm
beats the reference by more than ``margin``) is reproduced when effect − 2·se > margin and not
reproduced when effect + 2·se < margin; a ``within`` claim (the two are within ``margin``) is
reproduced when |effect| + 2·se ≤ margin and not reproduced when |effect| − 2·se > margin.
Anything else, fewer than two seeds on a side, or an arm that has not plateaued, is
inconclusive: a gap between models still training says nothing about the methods.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

PLATEAU_TOLERANCE = 0.005
ClaimKind = Literal["better", "within"]


def plateaued(
    curve: Sequence[tuple[int, float]],
    rounds: int,
    tolerance: float = PLATEAU_TOLERANCE,
    lower_is_better: bool = False,
) -> bool | None:
    """The plateau rule on (round, value) evaluations of a run of ``rounds`` rounds; None when
    there are not evaluations on both sides of the last third (non-finite values ignored)."""
    sign = -1.0 if lower_is_better else 1.0
    cut = rounds * 2 / 3
    before = [sign * v for r, v in curve if r <= cut and math.isfinite(v)]
    last = [sign * v for r, v in curve if r > cut and math.isfinite(v)]
    if not before or not last:
        return None
    return max(last) - max(before) <= tolerance


@dataclass(frozen=True)
class Verdict:
    verdict: Literal["reproduced", "not reproduced", "inconclusive"]
    effect: float  # arm − reference, positive = the arm is better
    se: float  # standard error of the effect
    why: str


def verdict(
    kind: ClaimKind,
    margin: float,
    arm: Sequence[float],
    reference: Sequence[float],
    lower_is_better: bool = False,
    not_plateaued: Sequence[str] = (),
) -> Verdict:
    """The verdict rule on the final metric per seed of an arm and of its reference;
    ``not_plateaued`` names the compared arms that have not plateaued (any makes it
    inconclusive)."""
    sign = -1.0 if lower_is_better else 1.0
    if len(arm) < 2 or len(reference) < 2:
        nan = float("nan")
        return Verdict("inconclusive", nan, nan, "fewer than two seeds on a side")
    effect = sign * (statistics.mean(arm) - statistics.mean(reference))
    se = math.sqrt(
        statistics.variance(arm) / len(arm) + statistics.variance(reference) / len(reference)
    )
    low, high = effect - 2 * se, effect + 2 * se
    if not_plateaued:
        return Verdict("inconclusive", effect, se, f"not plateaued: {', '.join(not_plateaued)}")
    if kind == "better":
        if low > margin:
            return Verdict("reproduced", effect, se, f"effect − 2·se > {margin:g}")
        if high < margin:
            return Verdict("not reproduced", effect, se, f"effect + 2·se < {margin:g}")
        return Verdict("inconclusive", effect, se, f"effect ± 2·se straddles {margin:g}")
    if abs(effect) + 2 * se <= margin:
        return Verdict("reproduced", effect, se, f"|effect| + 2·se ≤ {margin:g}")
    if abs(effect) - 2 * se > margin:
        return Verdict("not reproduced", effect, se, f"|effect| − 2·se > {margin:g}")
    return Verdict("inconclusive", effect, se, f"|effect| ± 2·se straddles {margin:g}")
