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
from fedlora.engines.loop import RunResult
from fedlora.engines.placements import LoopFactory, local_loop
from fedlora.privacy.accounting import format_epsilon
from fedlora.privacy.budget import LARGE_DELTA
from fedlora.report import QUALITY_KEYS
from fedlora.tables import print_table
from fedlora.trackers import open_trackers


def configure_runtime(compute: Compute | None = None) -> None:
    """Deterministic kernels and quiet libraries: same config and seed, same numbers."""
    configure_determinism(compute.device if compute else torch.device("cpu"))
    # absl: dp-accounting's notes on RDP orders it drops from a bound (the bound stays valid).
    for noisy in ("transformers", "datasets", "peft", "bitsandbytes", "absl"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()


SHOWN = QUALITY_KEYS  # test metrics, then validation ones
# What the nodes' own models score: the table's columns where no process averages them (a
# distributed gossip deployment evaluates each node on its own rank).
NODES_SHOWN = ("node_accuracy", "node_macro_f1", "node_rouge_l", "node_perplexity", "node_loss")


def shown_keys(metrics: list[dict], names: tuple[str, ...]) -> list[str]:
    evaluated = [m for m in metrics if any(k in m for k in names)]
    return [k for k in names if evaluated and k in evaluated[-1]]


def final_table(result: RunResult, notes: tuple[str, ...] = ()) -> Table:
    keys = shown_keys(result.metrics, SHOWN) or shown_keys(result.metrics, NODES_SHOWN)
    private = any("epsilon" in m for m in result.metrics)
    privacy = ["ε", "δ"] if private else []
    table = Table(
        "round", "train loss", *keys, *privacy, "bytes (cum.)", "seconds", title="results"
    )
    for m in result.metrics:  # round 0 (the initial model) has no training nor privacy spent
        spent = [format_epsilon(m["epsilon"]), f"{m['delta']:.3g}"] if "epsilon" in m else ["", ""]
        table.add_row(
            str(m["round"]),
            f"{m['train_loss']:.4f}" if "train_loss" in m else "",
            *[f"{m[k]:.4f}" if k in m else "" for k in keys],
            *(spent if private else []),
            f"{m['cumulative_bytes']:,}",
            f"{m['seconds']:.1f}",
        )
    caption = [f"stopped: {result.stopped}"] if result.stopped else []
    if caption or notes:
        table.caption = "\n".join([*caption, *notes])
    return table


def run_experiment(
    config_file: Path,
    overrides: list[str],
    out: Path | None,
    resume: bool,
    console: Console,
    show_progress: bool = True,
    build: LoopFactory | None = None,
    default_threads: int | None = None,
    deployed: bool = False,
) -> RunResult:
    """``build``: the run loop with its round and placement (default: this process, or a
    pool of workers; a distributed rank and the Flower ServerApp pass their own);
    ``default_threads``: CPU threads unless ``compute.threads`` says (a rank's 1);
    ``deployed``: the parties are separate processes (``experiment.build``)."""
    config = load_config(config_file, overrides)
    compute = experiments.validate(config)
    configure_threads(config.compute, default_threads)
    configure_runtime(compute)
    out = rundir.out_dir(out, config)
    rundir.prepare(out, config, resume)
    console.print(
        f"[bold]{config.experiment.name}[/]: method {config.method.name}, model "
        f"{config.model.name}, data {config.data.dataset}, on {compute.describe()} -> {out}",
        highlight=False,
        soft_wrap=True,
    )
    trackers = open_trackers(config, out, resume)  # before the model: a login error is quick
    try:
        experiment = experiments.build(config, deployed)
        loop = (build or local_loop)(experiment, out, console)
        loop.round_listeners.append(trackers.log_round)
        start = loop.resume() if resume else 0
        if start:
            console.print(f"resuming after round {start}")
        result = loop.run(start, show_progress=show_progress)
        rundir.finish(experiment, result, out)
    except BaseException:
        trackers.finish({}, failed=True)
        raise
    trackers.finish(result.ledger.totals())
    plan = experiment.privacy.plan if experiment.privacy is not None else None
    notes = (LARGE_DELTA,) if plan is not None and plan.large_delta else ()
    print_table(console, final_table(result, notes))
    console.print(f"run directory: {out}")
    return result
