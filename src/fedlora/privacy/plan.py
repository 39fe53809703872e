"""A run's ``[privacy]`` table resolved into numbers before training: the noise multiplier (given,
or solved from ``target_epsilon``), δ, and the sampled Gaussian step each party's releases are
accounted as.

- ``dp_sgd``: the parties are the clients; client i's step samples L = ``batch_size ·
  grad_accum`` of its n_i examples (``privacy.sampling``). δ defaults to 1/n with n the run's
  training examples of all clients together, so δ ≤ 1/n_i for every client.
- ``central``: one party, the population of N clients; a round samples m of them (all: the
  Gaussian mechanism under add/remove-one-client; m < N: the engine draws a fixed-size sample
  without replacement, accounted under replace-one-client). δ defaults to 1/N.

``target_epsilon`` is solved for the run as planned, assuming the worst case for every party:
each client trains in every round (a client the server does not sample, or that drops out,
spends nothing and ends below the target), and the server releases a mean every round. With
several client sizes the largest of their solutions is taken, so every client meets the
target.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedlora.config import Config
from fedlora.privacy.accounting import Sampling, solve_for_all
from fedlora.privacy.central import AdaptiveClipping, CentralDP
from fedlora.privacy.dp_sgd import DpSgd
from fedlora.privacy.settings import check_adaptive, count_stddev, expected_clients
from fedlora.training import deadline_steps

SERVER = 0  # the one accounted party of central DP


@dataclass(frozen=True)
class PrivacyPlan:
    mechanism: str  # "dp_sgd" or "central"
    clip_norm: float
    noise_multiplier: float
    solved: bool  # from target_epsilon
    delta: float
    delta_basis: str  # where δ came from, for the summary
    samplings: dict[int, Sampling]  # per accounted party (client, or SERVER)
    rounds: int
    max_epsilon: float | None
    min_replies: int  # central: a round with fewer replies releases nothing

    @property
    def adjacency(self) -> str:
        unit = "example" if self.mechanism == "dp_sgd" else "client"
        return f"{next(iter(self.samplings.values())).adjacency} {unit}"


def plan_privacy(config: Config, sizes: list[int]) -> PrivacyPlan | None:
    """The plan for clients of ``sizes`` training examples, or None without a mechanism."""
    privacy = config.privacy
    if privacy.mechanism == "none":
        return None
    rounds = config.experiment.rounds
    if privacy.mechanism == "dp_sgd":
        train = config.train
        deadline = config.federation.deadline_steps
        batch = train.batch_size * train.grad_accum
        samplings = {c: Sampling(privacy.sampling, n, batch) for c, n in enumerate(sizes)}
        steps = {c: deadline_steps(train, n, deadline) for c, n in enumerate(sizes)}
        default_delta, basis = 1 / sum(sizes), f"1/n, n = {sum(sizes)} training examples"
    else:
        clients, m = len(sizes), expected_clients(config)
        samplings = {SERVER: Sampling("poisson" if m == clients else "fixed", clients, m)}
        steps = {SERVER: 1}
        default_delta, basis = 1 / clients, f"1/N, N = {clients} clients"
    delta = privacy.delta if privacy.delta is not None else default_delta
    basis = "privacy.delta" if privacy.delta is not None else basis
    noise = privacy.noise_multiplier
    if noise is None:
        assert privacy.target_epsilon is not None  # the schema insists on one of them
        plans = {(samplings[p], steps[p] * rounds) for p in samplings}
        noise = solve_for_all(plans, privacy.target_epsilon, delta)
    if privacy.mechanism == "central":
        check_adaptive(config, noise)
    return PrivacyPlan(
        mechanism=privacy.mechanism,
        clip_norm=privacy.clip_norm,
        noise_multiplier=noise,
        solved=privacy.noise_multiplier is None,
        delta=delta,
        delta_basis=basis,
        samplings=samplings,
        rounds=rounds,
        max_epsilon=privacy.max_epsilon,
        min_replies=config.federation.min_replies,
    )


def dp_sgd_of(plan: PrivacyPlan | None, config: Config, causal_attention: bool) -> DpSgd | None:
    """What the local trainer needs of a DP-SGD plan."""
    if plan is None or plan.mechanism != "dp_sgd":
        return None
    return DpSgd(plan.clip_norm, plan.noise_multiplier, config.privacy.sampling, causal_attention)


def central_of(plan: PrivacyPlan | None, config: Config) -> CentralDP | None:
    """The server's mechanism of a central-DP plan."""
    if plan is None or plan.mechanism != "central":
        return None
    privacy = config.privacy
    adaptive = (
        AdaptiveClipping(privacy.target_quantile, privacy.clip_learning_rate, count_stddev(config))
        if privacy.adaptive_clipping
        else None
    )
    return CentralDP(
        plan.clip_norm,
        plan.noise_multiplier,
        expected_clients(config),
        config.experiment.seed,
        adaptive,
    )
