"""Fault drills: a party that kills itself at an exact point of a round, so that a deployment
(and the tests) can watch the round recover from a client lost exactly there.

``FEDLORA_DRILL_EXIT`` holds comma-separated items ``STEP@ROUND`` or ``STEP@ROUND@rankK``.
STEP is ``train`` (after the client's reply is sent) or a step of secure aggregation's protocol
(``advertise_keys``, ``share_keys``, ``masked_input``, ``unmasking``: after the client's answer
is sent); ROUND counts from 1, as the metrics do. A Flower node's runtime takes the items
without a rank; a torch.distributed worker takes those of its own rank and those without one.
The party SIGKILLs itself, as a lost machine would end.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass

from fedlora.config import ConfigError

VARIABLE = "FEDLORA_DRILL_EXIT"
# the server's message of each protocol step, as the hosts receive it (fedlora.privacy.secagg)
ANSWERING = {"begin": "advertise_keys", "roster": "share_keys", "shares": "masked_input",
             "survivors": "unmasking"}  # fmt: skip
STEPS = ("train", *ANSWERING.values())  # in the order a round takes them


@dataclass(frozen=True)
class Drill:
    step: str
    round: int  # from 1
    rank: int | None  # a torch.distributed rank, or None: any party


def drills_from_env() -> list[Drill]:
    """The drills ``FEDLORA_DRILL_EXIT`` asks for; ``ConfigError`` naming what is allowed if
    an item is malformed."""
    text = os.environ.get(VARIABLE, "")
    drills = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        step, _, rest = item.partition("@")
        number, _, rank = rest.partition("@")
        well_formed = step in STEPS and number.isdigit() and int(number) >= 1
        if rank and not (rank.startswith("rank") and rank[4:].isdigit()):
            well_formed = False
        if not well_formed:
            raise ConfigError(
                f"{VARIABLE}={text!r}: expected items STEP@ROUND or STEP@ROUND@rankK, STEP one "
                f"of {', '.join(STEPS)}, ROUND a round number from 1"
            )
        drills.append(Drill(step, int(number), int(rank[4:]) if rank else None))
    return drills


class Drills:
    """The drills of this party: ``rank`` None for a Flower node's runtime."""

    def __init__(self, rank: int | None = None) -> None:
        every = drills_from_env()
        self.mine = [d for d in every if d.rank is None or (rank is not None and d.rank == rank)]

    def after(self, step: str, round_index: int) -> None:
        """Called once the party has answered ``step`` of round ``round_index`` (from 0)."""
        for drill in self.mine:
            if (drill.step, drill.round) == (step, round_index + 1):
                print(
                    f"fedlora: fault drill {VARIABLE}: killing this process after "
                    f"{step}@{drill.round}",
                    file=sys.stderr,
                    flush=True,
                )
                os.kill(os.getpid(), signal.SIGKILL)
