"""The builders that put a run together: a topology's round, the placement it runs on, the run
loop around it.

A round is written once per topology (``server_round``, ``gossip``, ``split``); a placement
supplies where client work runs and how bytes travel (``Hosts`` for server rounds, ``Peers``
for gossip, the cloud-edge link for the split), and a ``Keeper`` where the clients' state is
checkpointed. What each placement can run is checked at config time
(``fedlora.engines.capabilities``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from fedlora.engines.client import ClientRuntime
from fedlora.engines.gossip import GossipRound, LocalPeers
from fedlora.engines.loop import RunLoop
from fedlora.engines.pool import Pool, PoolHosts
from fedlora.engines.server_round import LocalHosts, ServerRound
from fedlora.engines.split import SplitRound
from fedlora.experiment import Experiment


# -- one machine ---------------------------------------------------------------------------------
def local_loop(
    experiment: Experiment, run_dir: Path, console: Console | None = None, pooled: bool = True
) -> RunLoop:
    """A run in this process: its clients in turn, or on a pool of forked workers where
    ``compute.workers`` asks for one (server rounds and gossip; ``pooled = False``: never)."""
    from fedlora.compute import pool_size

    runtime = ClientRuntime(experiment)
    workers, threads = pool_size(experiment.config, experiment.compute.device)
    workers = workers if pooled else 1
    engine = experiment.method.engine
    if engine == "simulation":
        pooled = workers > 1
        hosts = PoolHosts(Pool(runtime, workers, threads)) if pooled else LocalHosts(runtime)
        round_: ServerRound | GossipRound | SplitRound = ServerRound(experiment, runtime, hosts)
    elif engine == "gossip":
        pool = Pool(runtime, workers, threads) if workers > 1 else None
        round_ = GossipRound(experiment, runtime, LocalPeers(runtime, pool))
    else:
        round_ = SplitRound(experiment, runtime, run_dir)
    return RunLoop(round_, run_dir, console)


LoopFactory = Callable[[Experiment, Path, Console], RunLoop]
