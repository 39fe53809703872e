"""The ``fedlora`` command: run, flower-app, flower-run, report, evaluate, methods."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedlora import __version__
from fedlora.config import ConfigError
from fedlora.errors import RunError
from fedlora.tables import print_table

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated LoRA fine-tuning.")
console = Console()


def show_version(asked: bool) -> None:
    if asked:
        console.print(f"fedlora {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=show_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """Federated LoRA fine-tuning."""


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def run(
    config_file: Annotated[Path, typer.Argument(help="experiment config (TOML)")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override: section.key=value")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="run directory (default runs/<experiment.name>)")
    ] = None,
    resume: Annotated[bool, typer.Option(help="continue from the last completed round")] = False,
    quiet: Annotated[bool, typer.Option(help="no progress bars")] = False,
    engine: Annotated[
        str,
        typer.Option(
            help="simulation: every party in this process; distributed: one rank per process "
            "(--nproc, or under torchrun)"
        ),
    ] = "simulation",
    nproc: Annotated[
        int | None, typer.Option(help="distributed: processes to start on this machine")
    ] = None,
    observer: Annotated[
        bool,
        typer.Option(
            help="distributed: rank 0 also receives every client's state after each round and "
            "evaluates and checkpoints everything (bit-identical to --engine simulation); "
            "default: each rank keeps its own clients' state"
        ),
    ] = False,
    timeout: Annotated[
        float,
        typer.Option(
            help="distributed: seconds a rank waits for a peer before giving up (longer than a "
            "client's local round and an evaluation)"
        ),
    ] = 600.0,
) -> None:
    """Run an experiment from a config file."""
    from fedlora.api import run as run_config

    try:
        run_config(
            config_file,
            out,
            resume,
            set_ or [],
            engine=engine,
            nproc=nproc,
            observer=observer,
            timeout=timeout,
            progress=not quiet,
            console=console,
        )
    except ConfigError as error:
        fail(str(error))
    except RunError as error:  # gloo's and workers' texts have [brackets]: escape
        console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


@app.command("flower-app")
def flower_app(
    config_file: Annotated[Path, typer.Argument(help="experiment config (TOML)")],
    out: Annotated[Path, typer.Option(help="the Flower app directory to write")],
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="override: section.key=value")
    ] = None,
    run_dir: Annotated[
        Path | None,
        typer.Option(help="where the ServerApp writes the run (default runs/<experiment.name>)"),
    ] = None,
    reply_timeout: Annotated[
        float, typer.Option(help="seconds a round waits for the SuperNodes' replies")
    ] = 600.0,
    node_wait: Annotated[
        float, typer.Option(help="seconds the ServerApp waits for every partition's SuperNode")
    ] = 300.0,
) -> None:
    """Write a Flower app (pyproject.toml) that runs CONFIG on a SuperLink and SuperNodes."""
    from fedlora.config import load_config
    from fedlora.flower.app_dir import write_app
    from fedlora.rundir import out_dir

    try:
        target = run_dir or out_dir(None, load_config(config_file, set_ or []))
        path = write_app(config_file, set_ or [], out, target, reply_timeout, node_wait)
    except ConfigError as error:
        fail(str(error))
    console.print(f"written: {path} (run directory {target.resolve()})", highlight=False)
    console.print(f"run it: fedlora flower-run {out} [CONNECTION]", highlight=False)


@app.command("flower-run")
def flower_run(
    appdir: Annotated[Path, typer.Argument(help="an app written by `fedlora flower-app`")],
    connection: Annotated[
        str | None,
        typer.Argument(help="SuperLink connection in Flower's config (default: its default)"),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="continue the app's run from its last completed round")
    ] = False,
) -> None:
    """`flwr run APPDIR --stream`, offline, failing when the run failed (flwr run does not)."""
    from fedlora.flower.launch import RunFailed
    from fedlora.flower.launch import flower_run as run_app

    try:
        out = run_app(appdir, connection, resume)
    except ConfigError as error:
        fail(str(error))
    except RunFailed as error:
        console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    console.print(f"run directory: {out}", highlight=False)


@app.command(
    "flower-node", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def flower_node(
    context: typer.Context,
    partition_id: Annotated[int, typer.Option(help="the partition this node hosts (0..N-1)")],
    num_partitions: Annotated[int, typer.Option(help="N: how many partitions the run has")],
    state_dir: Annotated[
        Path | None,
        typer.Option(help="the node's state (default ~/.fedlora/flower/partition-<id>)"),
    ] = None,
    poll_interval: Annotated[
        float | None,
        typer.Option(
            help="cap the SuperNode's waits between polls at this many seconds (flwr's own: "
            "3 s when idle, 0.5 s for a reply)"
        ),
    ] = None,
) -> None:
    """Start a SuperNode with its warm fedlora runtime: `flower-supernode` with this partition's
    node config and the remaining arguments (e.g. --superlink HOST:PORT --insecure)."""
    from fedlora.drill import drills_from_env
    from fedlora.flower.launch import run_node

    try:
        drills_from_env()  # its runtime would refuse it; say so before anything starts
    except ConfigError as error:
        fail(str(error))
    if not 0 <= partition_id < num_partitions:
        fail(f"--partition-id {partition_id} is outside 0..{num_partitions - 1}")
    if poll_interval is not None and not poll_interval > 0:
        fail(f"--poll-interval must be a positive number of seconds, got {poll_interval}")
    arguments = list(context.args)
    raise typer.Exit(run_node(partition_id, num_partitions, state_dir, arguments, poll_interval))


@app.command("flower-runtime")
def flower_runtime(
    state_dir: Annotated[Path, typer.Option(help="the node's state directory (its node config's)")],
) -> None:
    """The warm fedlora runtime alone, for a SuperNode started by hand: it listens on
    STATE_DIR/runtime.sock until stopped."""
    from fedlora.flower.node_runtime import run_runtime

    try:
        run_runtime(state_dir.expanduser())
    except ConfigError as error:
        fail(str(error))


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="run directories")],
    out: Annotated[Path, typer.Option(help="where the table and plots go")] = Path("report"),
) -> None:
    """Put several runs side by side: a Markdown table and, per metric, the figures a study
    gets (runs differing only in the seed are one arm)."""
    from fedlora.report import compare

    try:
        table = compare(runs, out)
    except FileNotFoundError as error:
        fail(str(error))
    console.print(table, highlight=False)
    console.print(f"written: {out}/comparison.md and figures")


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="a finished run's directory")],
    tasks: Annotated[
        str, typer.Option(help="lm-eval task, group or tag names (or task YAMLs), comma-separated")
    ],
    limit: Annotated[int | None, typer.Option(help="items per task (default: all)")] = None,
    adapter: Annotated[
        str | None,
        typer.Option(
            help="global, client_K or all (default: the model(s) the run evaluated: each "
            "client's own for per-client methods, else the global one)"
        ),
    ] = None,
    include_path: Annotated[
        Path | None, typer.Option(help="a directory of local lm-eval task YAMLs (works offline)")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="lm-eval batch size (default: the run's eval.batch_size)")
    ] = None,
) -> None:
    """Score a run's adapter with lm-evaluation-harness on its base model; the results go into
    RUN_DIR/lm_eval/<adapter>.json and summary.md."""
    for name, value in (("--limit", limit), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            fail(f"{name} must be at least 1, not {value}")
    from fedlora.harness import Tasks, evaluate_run
    from fedlora.report import lm_eval_rows

    names = tuple(name.strip() for name in tasks.split(",") if name.strip())
    try:
        written = evaluate_run(run_dir, Tasks(names, limit, include_path), adapter, batch_size)
    except ConfigError as error:
        fail(str(error))
    table = Table("adapter", "task", "metric", "value", "stderr", "items", title="lm-eval")
    for path in written:
        for row in lm_eval_rows(json.loads(path.read_text())):
            table.add_row(*row)
    print_table(console, table)
    console.print(f"written: {', '.join(map(str, written))} and {run_dir / 'summary.md'}")


@app.command()
def methods() -> None:
    """List the available methods."""
    from fedlora.methods import registry

    table = Table("method", "what it does")
    for name, cls in registry().items():
        table.add_row(name, cls.summary)
    print_table(console, table)


def main() -> None:
    app()
