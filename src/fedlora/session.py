"""One ``fedlora run``: config -> experiment -> engine -> run directory, with a final table."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from fedlora import experiment as experiments
from fedlora import rundir
from fedlora.compute import Compute, configure_determinism, configure_threads
from fedlora.config import load_config
from fedlora.engines.gossip import GossipEngine
from fedlora.engines.simulation import RunResult, SimulationEngine
from fedlora.engines.split import SplitEngine
from fedlora.report import QUALITY_KEYS

# by ``Method.engine``
ENGINES: dict[str, type[SimulationEngine]] = {
    "simulation": SimulationEngine,
    "gossip": GossipEngine,
    "split": SplitEngine,
}


def configure_runtime(compute: Compute | None = None) -> None:
    """Deterministic kernels and quiet libraries: same config and seed, same numbers."""
    configure_determinism(compute.device if compute else torch.device("cpu"))
    for noisy in ("transformers", "datasets", "peft", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()


def final_table(result: RunResult) -> Table:
    evaluated = [m for m in result.metrics if any(k in m for k in ("accuracy", "test_loss"))]
    keys = [k for k in QUALITY_KEYS if evaluated and k in evaluated[-1]]
    table = Table("round", "train loss", *keys, "bytes (cum.)", "seconds", title="results")
    for m in result.metrics:
        table.add_row(
            str(m["round"]),
            f"{m['train_loss']:.4f}",
            *[f"{m[k]:.4f}" if k in m else "" for k in keys],
            f"{m['cumulative_bytes']:,}",
            f"{m['seconds']:.1f}",
        )
    return table


def run_experiment(
    config_file: Path,
    overrides: list[str],
    out: Path | None,
    resume: bool,
    console: Console,
    show_progress: bool = True,
    engines: dict[str, type[SimulationEngine]] = ENGINES,
    default_threads: int | None = None,
) -> RunResult:
    """``engines``: the engine per ``Method.engine`` (the distributed engine passes its own);
    ``default_threads``: CPU threads unless ``compute.threads`` says (a rank's 1)."""
    config = load_config(config_file, overrides)
    compute = experiments.validate(config)
    configure_threads(config.compute, default_threads)
    configure_runtime(compute)
    out = out or Path("runs") / config.experiment.name
    rundir.prepare(out, config, resume)
    console.print(
        f"[bold]{config.experiment.name}[/]: method {config.method.name}, model "
        f"{config.model.name}, data {config.data.dataset}, on {compute.describe()} -> {out}",
        highlight=False,
        soft_wrap=True,
    )
    experiment = experiments.build(config)
    engine = engines[experiment.method.engine](experiment, out, console)
    start = engine.resume() if resume else 0
    if start:
        console.print(f"resuming after round {start}")
    result = engine.run(start, show_progress=show_progress)
    rundir.finish(experiment, result, out)
    console.print(final_table(result))
    console.print(f"run directory: {out}")
    return result
