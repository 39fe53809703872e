"""Has a run stopped improving, did it train at all, and what does a comparison of two arms over
seeds say?

Three stated rules, so that a study's verdicts rest on trained models and on the spread over
seeds rather than on a reader's eye (``benchmarks/study.py`` applies them to every study):

Plateau. Take a run's evaluations after round 0 in round order, n of them, and k = n // 3 (at
least 2). The run has plateaued when the mean of its last k evaluations beats the mean of the k
before them by at most ``tolerance`` plus twice the standard error of that difference,
sqrt(s_last²/k + s_before²/k) (sample standard deviations). Comparing means of windows, with
their spread, is what keeps evaluation noise from reading as progress: a single late lucky
evaluation moves a mean of k by 1/k of its luck, and a curve that swings widely has a wide
standard error. The price is stated too: a rise smaller than the swings between evaluations
cannot be told from noise and counts as a plateau. Fewer than 4 evaluations, or a non-finite
value among the compared ones (a diverged run), and the rule cannot say (``None``), which
counts as not plateaued.

Trained. A run trained when its final value beats every untrained level by more than
``TRAINED_MARGIN``: its own round-0 value (the initial model) and, for classification, the
majority-class level (what always answering the most frequent class scores). A flat curve at
such a level "plateaus" under any noise rule, and two such arms are "within a margin" of each
other: neither says anything about the methods, so a verdict that rests on an arm that did not
train is void.

Verdict. Where two arms share seeds and data layout (seed k gives both the same split,
partition and initial adapter), the effect is the mean over seeds of the per-seed difference
arm − reference, signed so that positive is better, with se = s_d/√n and n − 1 degrees of
freedom: a paired t-test. Where pairing does not apply (a centralized arm against decentralized
ones, different seeds), Welch's unpaired difference of means and its degrees of freedom. Either
way the 95% interval is effect ± t(0.975, df)·se. A ``better`` claim (the arm beats the
reference by more than ``margin``) is reproduced when the interval lies above the margin and
not reproduced when it lies below; a ``within`` claim (the two are within ``margin``) is
reproduced when the interval lies inside ±margin and not reproduced when it lies outside it.
Anything else, fewer than two seeds on a side, or an arm that has not plateaued, is
inconclusive: a gap between models still training says nothing about the methods. An arm that
did not train makes the verdict void.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from scipy import stats

PLATEAU_TOLERANCE = 0.005
TRAINED_MARGIN = 0.01  # a point of accuracy above the untrained levels
ClaimKind = Literal["better", "within"]
Outcome = Literal["reproduced", "not reproduced", "inconclusive", "void"]


def plateaued(
    curve: Sequence[tuple[int, float]],
    tolerance: float = PLATEAU_TOLERANCE,
    lower_is_better: bool = False,
) -> bool | None:
    """The plateau rule on (round, value) evaluations; round 0 (the initial model) is left
    out. None when there are too few evaluations or the compared ones are not finite."""
    sign = -1.0 if lower_is_better else 1.0
    values = [sign * value for round_index, value in sorted(curve) if round_index > 0]
    window = max(2, len(values) // 3)
    if len(values) < 2 * window:
        return None
    before, last = values[-2 * window : -window], values[-window:]
    if not all(math.isfinite(v) for v in (*before, *last)):
        return None
    gain = statistics.mean(last) - statistics.mean(before)
    se = math.sqrt(statistics.variance(last) / window + statistics.variance(before) / window)
    return gain <= tolerance + 2 * se


def trained(
    final: float,
    untrained: Sequence[float],
    margin: float = TRAINED_MARGIN,
    lower_is_better: bool = False,
) -> bool:
    """Whether ``final`` beats every untrained level (round 0, the majority class) by more
    than ``margin``; a non-finite final never trained."""
    if not math.isfinite(final):
        return False
    sign = -1.0 if lower_is_better else 1.0
    return all(sign * (final - level) > margin for level in untrained if math.isfinite(level))


def majority_levels(counts: Sequence[int]) -> dict[str, float]:
    """Accuracy and macro-F1 of always answering the most frequent class, for a test set with
    these per-class counts: accuracy p (the largest share); F1 2p/(1 + p) on that class and 0
    on the others, so macro-F1 2p/((1 + p)·C) over C classes."""
    total, classes = sum(counts), len(counts)
    if total == 0 or classes == 0:
        raise ValueError("majority_levels needs at least one example")
    share = max(counts) / total
    return {"accuracy": share, "macro_f1": 2 * share / ((1 + share) * classes)}


@dataclass(frozen=True)
class Effect:
    """arm − reference on the final metric, positive = the arm is better."""

    effect: float
    se: float
    df: float  # degrees of freedom of the t statistic
    n: int  # seeds compared: pairs when paired, else both arms' seeds together
    paired: bool

    @property
    def half_width(self) -> float:
        """Half the 95% interval: t(0.975, df)·se."""
        return float(stats.t.ppf(0.975, self.df)) * self.se

    @property
    def p_value(self) -> float:
        """Two-sided p-value of "no difference" (the t-test)."""
        if self.se == 0:
            return 1.0 if self.effect == 0 else 0.0
        return float(2 * stats.t.sf(abs(self.effect / self.se), self.df))

    @property
    def statistics(self) -> str:
        return f"paired, {self.n} seeds" if self.paired else f"unpaired (Welch), {self.n} runs"


def paired_effect(
    arm: Mapping[int, float], reference: Mapping[int, float], lower_is_better: bool = False
) -> Effect | None:
    """The per-seed differences over the seeds both arms ran; None with fewer than two."""
    sign = -1.0 if lower_is_better else 1.0
    seeds = sorted(set(arm) & set(reference))
    if len(seeds) < 2:
        return None
    differences = [sign * (arm[seed] - reference[seed]) for seed in seeds]
    n = len(differences)
    se = statistics.stdev(differences) / math.sqrt(n)
    return Effect(statistics.mean(differences), se, n - 1, n, True)


def unpaired_effect(
    arm: Sequence[float], reference: Sequence[float], lower_is_better: bool = False
) -> Effect | None:
    """Welch's difference of means; None with fewer than two runs on a side."""
    if len(arm) < 2 or len(reference) < 2:
        return None
    sign = -1.0 if lower_is_better else 1.0
    a, b = statistics.variance(arm) / len(arm), statistics.variance(reference) / len(reference)
    se = math.sqrt(a + b)
    # Welch–Satterthwaite; two constant arms have no spread to weigh: take the smaller df.
    denominator = a**2 / (len(arm) - 1) + b**2 / (len(reference) - 1)
    df = (a + b) ** 2 / denominator if denominator > 0 else min(len(arm), len(reference)) - 1
    effect = sign * (statistics.mean(arm) - statistics.mean(reference))
    return Effect(effect, se, df, len(arm) + len(reference), False)


@dataclass(frozen=True)
class Verdict:
    verdict: Outcome
    effect: Effect | None
    why: str


def verdict(
    kind: ClaimKind,
    margin: float,
    effect: Effect | None,
    not_plateaued: Sequence[str] = (),
    not_trained: Sequence[str] = (),
) -> Verdict:
    """The verdict rule on an effect (``paired_effect`` or ``unpaired_effect``);
    ``not_plateaued`` and ``not_trained`` name the compared arms that have not plateaued or
    did not train."""
    if not_trained:
        return Verdict("void", effect, f"did not train: {', '.join(not_trained)}")
    if effect is None:
        return Verdict("inconclusive", None, "fewer than two seeds on a side")
    if not_plateaued:
        return Verdict("inconclusive", effect, f"not plateaued: {', '.join(not_plateaued)}")
    low, high = effect.effect - effect.half_width, effect.effect + effect.half_width
    interval = f"95% interval [{low:+.4f}, {high:+.4f}]"
    if kind == "better":
        if low > margin:
            return Verdict("reproduced", effect, f"{interval} above {margin:g}")
        if high < margin:
            return Verdict("not reproduced", effect, f"{interval} below {margin:g}")
        return Verdict("inconclusive", effect, f"{interval} straddles {margin:g}")
    if -margin <= low and high <= margin:
        return Verdict("reproduced", effect, f"{interval} inside ±{margin:g}")
    if low > margin or high < -margin:
        return Verdict("not reproduced", effect, f"{interval} outside ±{margin:g}")
    return Verdict("inconclusive", effect, f"{interval} straddles ±{margin:g}")
