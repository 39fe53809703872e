"""fedlora's Flower ServerApp: the whole run, as ``fedlora run`` does it, on Flower's Grid.

It reads the fedlora config and the run directory from the run config (``fedlora flower-app``
writes both), runs the experiment with the SuperNodes as the placement (``FlowerHosts``: the
same loop, round, evaluation, ledger, checkpoints and run-directory files as in one process) and
records how it ended in
``<run dir>/flower-status.json``: ``flwr run`` reports success even when a ServerApp failed, so
``fedlora flower-run`` reads this file instead. The file also has the bytes Flower moved per
message type (``flower_bytes``: messages, down, up), to set beside the ledger.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from fedlora.flower.app_dir import config_from_text, refuse
from fedlora.flower.hosts import FlowerHosts
from fedlora.flower.protocol import (
    CONFIG_TEXT,
    NODE_WAIT,
    REPLY_TIMEOUT,
    RESUME,
    RUN_DIR,
    STATUS_FILE,
)

THREADS = 1  # as a distributed rank: the in-process reference matches with one thread too

app = ServerApp()


def write_status(run_dir: Path, status: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / STATUS_FILE).write_text(json.dumps(status, indent=1) + "\n")


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedlora.engines.client import ClientRuntime
    from fedlora.engines.loop import RunLoop
    from fedlora.engines.server_round import ServerRound
    from fedlora.experiment import Experiment
    from fedlora.session import run_experiment

    run_config = context.run_config
    run_dir = Path(str(run_config[RUN_DIR]))
    run = {"run_id": context.run_id}
    try:
        with config_from_text(str(run_config[CONFIG_TEXT])) as (config, path):
            refuse(config)
            hosts: list[FlowerHosts] = []

            def build(experiment: Experiment, out: Path, console: Console) -> RunLoop:
                hosts.append(
                    FlowerHosts(
                        experiment,
                        console,
                        grid=grid,
                        reply_timeout=float(run_config[REPLY_TIMEOUT]),
                        node_wait=float(run_config[NODE_WAIT]),
                    )
                )
                runtime = ClientRuntime(experiment)  # holds no client: the nodes do
                return RunLoop(ServerRound(experiment, runtime, hosts[0]), out, console)

            result = run_experiment(
                path,
                [],
                run_dir,
                bool(run_config.get(RESUME, False)),
                Console(),
                False,
                build,
                THREADS,
                deployed=True,
            )
    except Exception as error:
        write_status(
            run_dir,
            {
                **run,
                "status": "failed",
                "error": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc(),
            },
        )
        raise
    trained = sum(1 for record in result.metrics if record["round"] > 0)  # round 0: the init
    wire = hosts[0].wire
    write_status(run_dir, {**run, "status": "completed", "rounds": trained, "flower_bytes": wire})
