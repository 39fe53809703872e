"""What each party has spent, round by round, and ``privacy.max_epsilon``'s stop rule.

Charges are a pure function of the config and the round: DP-SGD charges each client the engine
schedules to train (sampled, not dropped out; its steps, cut at the deadline), central DP charges
one release for every round that is not known in advance to be skipped (fewer scheduled clients
than ``federation.min_replies``). So every process of a distributed run agrees on the budget
without exchanging a message, and a resumed run recomputes it from the completed rounds. The one
conservative case: a client whose download is refused is charged for steps it never ran, and a
round skipped because replies were refused is charged for a release that never happened.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from fedlora.privacy.accounting import StepAccountant, format_epsilon
from fedlora.privacy.central import CentralDP
from fedlora.privacy.plan import SERVER, PrivacyPlan

LARGE_DELTA = (
    "**δ ≥ 1/n**, accepted by privacy.allow_large_delta: a mechanism that publishes one "
    "member's data outright meets such a δ, so this (ε, δ) promises little."
)


def noise_source_line(plan: PrivacyPlan) -> str:
    """Which randomness the noise used, and against whom the reported ε therefore holds."""
    if plan.noise_source == "secure":
        return (
            "Noise and samples: **secure** (fresh secret seeds from the OS's cryptographic "
            "generator, never stored nor sent): the ε holds against the server, the other "
            "clients and readers of the model; the run is not bit-reproducible."
        )
    return (
        "Noise and samples: **seeded** from experiment.seed, reproducible from config.toml: "
        "the ε holds against other clients and readers of the model who do not hold the "
        "config, **not against the server** or anyone with config.toml, who can replay the "
        'noise (set privacy.noise_source = "secure" for a deployment).'
    )


class PrivacyBudget:
    """A run's accountant per party (one per distinct sampling), its per-round metrics, stop
    rule and summary; ``central``, the server's mechanism, whose released clip norms it
    reports."""

    def __init__(self, plan: PrivacyPlan, central: CentralDP | None = None):
        self.plan = plan
        self.central = central
        by_sampling = {
            s: StepAccountant(s, plan.noise_multiplier) for s in set(plan.samplings.values())
        }
        self.accountants = {party: by_sampling[s] for party, s in plan.samplings.items()}

    def charge(self, scheduled: dict[int, int]) -> dict[int, int]:
        """The steps a round charges, from the clients scheduled to train and their steps."""
        if self.plan.mechanism == "dp_sgd":
            return dict(scheduled)
        return {SERVER: 1} if len(scheduled) >= self.plan.min_replies else {}

    @staticmethod
    def total(charges: Iterable[dict[int, int]]) -> dict[int, int]:
        spent: Counter[int] = Counter()
        for charge in charges:
            spent.update(charge)
        return dict(spent)

    def epsilons(self, spent: dict[int, int]) -> dict[int, float]:
        """Every party's ε at δ after the steps ``spent``."""
        delta = self.plan.delta
        return {
            party: accountant.epsilon(spent.get(party, 0), delta)
            for party, accountant in self.accountants.items()
        }

    def refusal(self, round_index: int, spent: dict[int, int]) -> str | None:
        """Why the round may not run, if the steps spent through it would exceed max_epsilon."""
        limit = self.plan.max_epsilon
        if limit is None:
            return None
        over = {p: e for p, e in self.epsilons(spent).items() if e > limit}
        if not over:
            return None
        party, epsilon = max(over.items(), key=lambda item: item[1])
        who = "the clients (user level)" if self.plan.mechanism == "central" else f"client {party}"
        return (
            f"privacy.max_epsilon {limit:g}: round {round_index + 1} would bring {who} to "
            f"ε = {format_epsilon(epsilon)} (δ = {self.plan.delta:.3g}); stopped before it"
        )

    def record(self, round_index: int, spent: dict[int, int]) -> dict:
        """The round's metrics: ε (the largest over parties), δ, and per client (DP-SGD) or the
        clip norm used and the noised unclipped fraction (central)."""
        epsilons = self.epsilons(spent)
        record: dict = {"epsilon": max(epsilons.values()), "delta": self.plan.delta}
        if self.plan.mechanism == "dp_sgd":
            record["epsilon_clients"] = {str(c): e for c, e in sorted(epsilons.items())}
        if self.central is not None:
            record.update(self.central.released.get(round_index, {}))
        return record

    def summary_lines(self, metrics: list[dict], stopped: str | None) -> list[str]:
        """The summary's privacy section: the mechanism as resolved, and the ε spent."""
        plan = self.plan
        noise = f"noise multiplier z = {plan.noise_multiplier:.4g}"
        if plan.solved:
            noise += f" (solved for target ε over {plan.rounds} rounds, every party every round)"
        sampling = next(iter(plan.samplings.values()))
        if plan.mechanism == "dp_sgd":
            what = (
                f"DP-SGD: each example's gradient clipped to C = {plan.clip_norm:g}, {noise}, "
                f"{sampling.kind} sampling of {sampling.batch} examples per step"
            )
        else:
            what = (
                f"central DP: each client's update clipped to C = {plan.clip_norm:g}, {noise}, "
                f"{sampling.batch} of {sampling.population} clients per round, uniform mean"
            )
            central = self.central
            if central is not None and central.adaptive is not None:
                adaptive = central.adaptive
                what += (
                    f"; adaptive clipping from that C (target quantile "
                    f"{adaptive.target_quantile:g}, step {adaptive.learning_rate:g}, count noise "
                    f"σ_b = {adaptive.count_stddev:g}, update noise multiplier "
                    f"{central.update_multiplier:.4g})"
                )
        last = metrics[-1] if metrics else {}
        spent = format_epsilon(last["epsilon"]) if "epsilon" in last else "0 (no round ran)"
        lines = [
            "",
            "## Privacy",
            "",
            f"{what}. Accounted with dp-accounting's RDP accountant; adjacency: "
            f"{plan.adjacency}; δ = {plan.delta:.3g} ({plan.delta_basis}).",
            "",
            f"ε spent after {last.get('round', 0)} rounds: {spent}"
            + (f" (limit privacy.max_epsilon {plan.max_epsilon:g})" if plan.max_epsilon else ""),
        ]
        if "epsilon_clients" in last:
            per_client = last["epsilon_clients"].items()
            lines.append(
                "per client: " + ", ".join(f"{c}: {format_epsilon(e)}" for c, e in per_client)
            )
        lines += ["", noise_source_line(plan)]
        if plan.large_delta:
            lines += ["", LARGE_DELTA]
        if stopped:
            lines += ["", f"**Stopped early:** {stopped}."]
        return lines
