"""The ``fedlora`` command: run, report, methods."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedlora.config import ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated LoRA fine-tuning.")
console = Console()


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
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
    try:
        # The config's own mistakes first, before the heavy stack is imported (fast answers).
        from fedlora.config import load_config

        config = load_config(config_file, set_ or [])  # the schema: pydantic only
        from fedlora.preflight import check_config, preflight

        check_config(config)  # methods, options, ranks, aggregators: still no torch
        preflight(config)  # the machine's devices: torch, not yet transformers or peft
        if engine == "simulation":
            if nproc is not None:
                fail("--nproc needs --engine distributed")
            if observer:
                fail("--observer needs --engine distributed (one process sees every party)")
            from fedlora.channel import MessageError
            from fedlora.session import run_experiment

            try:
                run_experiment(
                    config_file, set_ or [], out, resume, console, show_progress=not quiet
                )
            except MessageError as error:  # a step that cannot go on without the message
                message = f"[bold red]error:[/] a party refused a message it needed: {error}"
                console.print(message, highlight=False, soft_wrap=True)
                raise typer.Exit(1) from None
        elif engine == "distributed":
            from fedlora.engines.distributed import LaunchError, launch
            from fedlora.engines.transport import PeerError

            try:
                launch(
                    config_file,
                    set_ or [],
                    out,
                    resume,
                    nproc,
                    timeout,
                    console,
                    not quiet,
                    observer,
                )
            except (LaunchError, PeerError) as error:  # gloo's text has [brackets]: escape
                message = f"[bold red]error:[/] {escape(str(error))}"
                console.print(message, highlight=False, soft_wrap=True)
                raise typer.Exit(1) from None
        else:
            fail(f"--engine must be simulation or distributed, not {engine!r}")
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
def methods() -> None:
    """List the available methods."""
    from fedlora.methods import registry

    table = Table("method", "what it does")
    for name, cls in registry().items():
        table.add_row(name, cls.summary)
    console.print(table)


def main() -> None:
    app()
