"""(ε, δ) of repeated sampled Gaussian steps, with Google's ``dp-accounting`` (RDP accountant).

Every private release in fedlora is one step of a sampled Gaussian mechanism: a sum of
contributions clipped to norm C, plus N(0, (z·C)²) noise, over a random sample of a population
(a client's examples for DP-SGD, the clients for central DP). Which event the accountant
composes depends on how the sample is drawn:

- ``poisson`` (each member in with probability q = batch / population): ε protects against
  adding or removing one member; per step ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``.
- ``fixed`` (``batch`` members drawn uniformly without replacement; the population size is
  public): ε protects against replacing one member; per step
  ``SampledWithoutReplacementDpEvent(population, batch, GaussianDpEvent(z / 2))``.

Replacing a member changes a clipped sum by up to 2C, so under replace-one adjacency the noise is
z/2 times the sensitivity (Wang, Balle and Kasiviswanathan 2019 analyse sampling without
replacement under exactly that adjacency; the library asks for the noise-to-sensitivity ratio).
A sample of the whole population (q = 1) is the plain Gaussian mechanism, of sensitivity C
(add or remove) or 2C (replace).

The RDP of one step is computed once per (sampling, z) and scaled by the step count: RDP composes
additively, so k steps cost one multiplication, not k compositions.

``dp-accounting`` is the ``[privacy]`` extra: it is imported when a private run first accounts,
so a run without privacy never needs it (``fedlora.preflight`` names the extra when it is
missing).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    import dp_accounting

SamplingKind = Literal["poisson", "fixed"]


@dataclass(frozen=True)
class Sampling:
    """How one private step draws its sample: ``batch`` (expected) members of ``population``."""

    kind: SamplingKind
    population: int
    batch: int

    @property
    def rate(self) -> float:
        return min(1.0, self.batch / self.population)

    @property
    def relation(self) -> dp_accounting.NeighboringRelation:
        import dp_accounting

        if self.kind == "poisson":
            return dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
        return dp_accounting.NeighboringRelation.REPLACE_ONE

    @property
    def adjacency(self) -> str:
        return "add or remove one" if self.kind == "poisson" else "replace one"

    def event(self, noise_multiplier: float) -> dp_accounting.DpEvent:
        """One step with noise std ``noise_multiplier`` · clip norm."""
        import dp_accounting

        if self.kind == "poisson":
            gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
            return dp_accounting.PoissonSampledDpEvent(self.rate, gaussian)
        return dp_accounting.SampledWithoutReplacementDpEvent(
            self.population,
            min(self.batch, self.population),
            dp_accounting.GaussianDpEvent(noise_multiplier / 2),
        )


def default_orders() -> tuple[float, ...]:
    """dp-accounting's RDP orders."""
    from dp_accounting.rdp import rdp_privacy_accountant

    return tuple(rdp_privacy_accountant.DEFAULT_RDP_ORDERS)


@dataclass(frozen=True)
class StepAccountant:
    """ε after any number of steps of one sampling at one noise multiplier."""

    sampling: Sampling
    noise_multiplier: float
    orders: tuple[float, ...] = field(default_factory=default_orders)

    @cached_property
    def step_rdp(self) -> np.ndarray:
        """The RDP of one step at every order (infinite without noise)."""
        if self.noise_multiplier == 0:
            return np.full(len(self.orders), np.inf)
        from dp_accounting.rdp import RdpAccountant

        accountant = RdpAccountant(list(self.orders), self.sampling.relation)
        return np.asarray(accountant.compose(self.sampling.event(self.noise_multiplier)).rdp)

    def rdp(self, steps: int) -> np.ndarray:
        return steps * self.step_rdp

    def epsilon(self, steps: int, delta: float) -> float:
        if steps == 0:
            return 0.0
        from dp_accounting.rdp import rdp_privacy_accountant

        epsilon, _ = rdp_privacy_accountant.compute_epsilon(self.orders, self.rdp(steps), delta)
        return float(epsilon)


def solve_noise_multiplier(
    sampling: Sampling, steps: int, target_epsilon: float, delta: float
) -> float:
    """The smallest noise multiplier (within 1e-6) whose ε after ``steps`` steps is at most
    ``target_epsilon`` at ``delta`` (dp-accounting's calibration: a bracket, then Brent)."""
    if steps == 0:
        return 0.0
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    return float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: RdpAccountant(neighboring_relation=sampling.relation),
            lambda z: dp_accounting.SelfComposedDpEvent(sampling.event(z), steps),
            target_epsilon,
            delta,
            # From a small positive multiplier: without noise the replace-one analysis divides
            # by zero instead of answering ∞.
            dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
        )
    )


def solve_for_all(
    plans: Iterable[tuple[Sampling, int]], target_epsilon: float, delta: float
) -> float:
    """The smallest noise multiplier that keeps every (sampling, steps) plan within
    ``target_epsilon``: max_i z_i. Plans are visited most-sampled first, and a plan already
    within the target at the current z (ε falls as z grows) costs one evaluation, not a solve."""
    noise = 0.0
    for sampling, steps in sorted(plans, key=lambda plan: -plan[0].rate * plan[1]):
        if noise > 0 and StepAccountant(sampling, noise).epsilon(steps, delta) <= target_epsilon:
            continue
        noise = max(noise, solve_noise_multiplier(sampling, steps, target_epsilon, delta))
    return noise


def format_epsilon(epsilon: float) -> str:
    return "∞" if math.isinf(epsilon) else f"{epsilon:.3f}"
