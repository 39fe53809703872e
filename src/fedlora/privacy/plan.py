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

from fedlora.config import Config, ConfigError
from fedlora.privacy.accounting import Sampling, solve_for_all
from fedlora.privacy.central import AdaptiveClipping, CentralDP
from fedlora.privacy.dp_sgd import DpSgd
from fedlora.privacy.noise import NoiseSeeds, NoiseSource, resolve_source
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
    large_delta: bool  # δ ≥ 1/n, accepted by privacy.allow_large_delta
    samplings: dict[int, Sampling]  # per accounted party (client, or SERVER)
    rounds: int
    max_epsilon: float | None
    min_replies: int  # central: a round with fewer replies releases nothing
    noise_source: NoiseSource  # privacy.noise_source as resolved for this placement
    run_seed: int

    @property
    def seeds(self) -> NoiseSeeds:
        return NoiseSeeds(self.noise_source, self.run_seed)

    @property
    def adjacency(self) -> str:
        unit = "example" if self.mechanism == "dp_sgd" else "client"
        return f"{next(iter(self.samplings.values())).adjacency} {unit}"


def default_delta(n: int) -> float:
    """δ well below 1/n: min(1e-5, 1/(10·n)). A δ of 1/n is met by a mechanism that publishes
    one random member's data outright; 1/(10·n) leaves an order of magnitude, and 1e-5 is the
    usual ceiling for small n."""
    return min(1e-5, 1 / (10 * n))


def plan_privacy(config: Config, sizes: list[int], deployed: bool = False) -> PrivacyPlan | None:
    """The plan for clients of ``sizes`` training examples, or None without a mechanism;
    ``deployed``: the parties are separate processes (``privacy.noise_source = "auto"``)."""
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
        n = min(size for size in sizes if size > 0)
        covered = f"n = {n} training examples of the smallest client"
    else:
        clients, m = len(sizes), expected_clients(config)
        samplings = {SERVER: Sampling("poisson" if m == clients else "fixed", clients, m)}
        steps = {SERVER: 1}
        n, covered = clients, f"n = {clients} clients"
    if privacy.delta is None:
        delta, basis = default_delta(n), f"min(1e-5, 1/(10·n)), {covered}"
    else:
        delta, basis = privacy.delta, f"privacy.delta ({covered})"
    large = delta >= 1 / n
    if large and not privacy.allow_large_delta:
        raise ConfigError(
            f"privacy.delta = {delta:g} is at least 1/n = {1 / n:.3g} ({covered}): a mechanism "
            "that publishes one member's data outright meets such a δ. Use a smaller δ (the "
            f"default would be {default_delta(n):.3g}), or set privacy.allow_large_delta = true"
        )
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
        large_delta=large,
        samplings=samplings,
        rounds=rounds,
        max_epsilon=privacy.max_epsilon,
        min_replies=config.federation.min_replies,
        noise_source=resolve_source(privacy.noise_source, deployed),
        run_seed=config.experiment.seed,
    )


def dp_sgd_of(plan: PrivacyPlan | None, config: Config, causal_attention: bool) -> DpSgd | None:
    """What the local trainer needs of a DP-SGD plan."""
    if plan is None or plan.mechanism != "dp_sgd":
        return None
    return DpSgd(
        plan.clip_norm, plan.noise_multiplier, config.privacy.sampling, causal_attention, plan.seeds
    )


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
        plan.seeds,
        adaptive,
    )
