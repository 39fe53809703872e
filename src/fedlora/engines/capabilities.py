"""What each placement can run: the topologies it carries and whether it carries secure
aggregation's masking protocol, checked once at config time (light: no torch).

A config that asks a placement for anything else is one ``ConfigError`` naming the placements
that can run it, never a traceback from deep inside a run.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedlora.config import Config
from fedlora.methods import method_class

TOPOLOGY_NAMES = {"simulation": "server rounds", "gossip": "gossip", "split": "cloud-edge split"}


@dataclass(frozen=True)
class Capabilities:
    """One placement's abilities."""

    topologies: frozenset[str]  # by ``Method.engine``
    secure_aggregation: bool
    how: str  # how to ask for it, for messages


PLACEMENTS = {
    "in-process": Capabilities(
        frozenset({"simulation", "gossip", "split"}), True, "--engine simulation"
    ),
    "pool": Capabilities(frozenset({"simulation", "gossip"}), True, "compute.workers > 1"),
    "distributed": Capabilities(
        frozenset({"simulation", "gossip", "split"}), True, "--engine distributed --nproc N"
    ),
    "flower": Capabilities(frozenset({"simulation"}), True, "fedlora flower-app"),
}


def placement_refusal(config: Config, placement: str) -> str | None:
    """Why ``placement`` cannot run ``config``, naming the placements that can; None if it can."""
    engine = method_class(config.method.name).engine
    able = PLACEMENTS[placement]
    if engine not in able.topologies:
        where = [p.how for p in PLACEMENTS.values() if engine in p.topologies]
        return (
            f"method {config.method.name!r} runs on the {engine!r} engine "
            f"({TOPOLOGY_NAMES[engine]}), which the {placement} placement does not run; it runs "
            f"with {' or '.join(where)}"
        )
    if config.privacy.secure_aggregation and not able.secure_aggregation:
        where = [p.how for p in PLACEMENTS.values() if p.secure_aggregation]
        return (
            f"privacy.secure_aggregation: the {placement} placement does not carry the masking "
            f"protocol between its processes; it runs with {' or '.join(where)}"
        )
    return None
