"""fedlora from Python: ``fedlora.run`` and ``fedlora.load_run``, what ``fedlora run`` does.

The CLI's ``run`` command is a thin shell over ``run`` here, so a notebook gets the same
validation, the same run directory and the same messages: every user-facing failure is a
``FedloraError`` whose text is what the CLI prints after "error:".

    import fedlora

    result = fedlora.run("configs/tiny/fedit.toml", out="runs/api", overrides=["train.lr=1e-3"])
    result.frame[["round", "accuracy"]]  # pandas
    result.adapter                        # the final PEFT adapter directory
    again = fedlora.load_run("runs/api")  # the same object for a finished run
"""

from __future__ import annotations

import json
import tempfile
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomli_w
from rich.console import Console

from fedlora.config import Config, ConfigError, config_from_dict, load_config
from fedlora.errors import FedloraError, RunError

if TYPE_CHECKING:
    import pandas

ConfigSource = str | Path | Mapping[str, Any] | Config
ENGINES = ("simulation", "distributed")


@dataclass(frozen=True)
class RunOutcome:
    """A run directory, read back: what a finished (or interrupted) run left."""

    directory: Path
    config: dict[str, Any]  # the resolved config (config.toml)
    metrics: list[dict[str, Any]]  # one record per round, round 0 being the initial model
    bytes: dict[str, int]  # total_bytes_up, total_bytes_down, total_bytes (the ledger's totals)
    adapter: Path | None  # the final global adapter (PEFT format), if the method has one
    client_adapters: list[Path]  # adapters/client_<i>, for methods whose clients keep their own

    @property
    def frame(self) -> pandas.DataFrame:
        """The metrics as a DataFrame, one row per round."""
        import pandas

        return pandas.DataFrame.from_records(self.metrics)

    def final(self, key: str) -> float | None:
        """The last recorded value of a metric (None if it was never recorded)."""
        values = [record[key] for record in self.metrics if key in record]
        return values[-1] if values else None


def load_run(directory: str | Path) -> RunOutcome:
    """A run directory written by ``fedlora run`` (CLI or Python, any engine)."""
    from fedlora.channel import Ledger

    directory = Path(directory)
    metrics_file, config_file = directory / "metrics.jsonl", directory / "config.toml"
    if not metrics_file.is_file() or not config_file.is_file():
        raise FedloraError(
            f"{directory} is not a run directory: it needs metrics.jsonl and config.toml"
        )
    try:
        metrics = [json.loads(line) for line in metrics_file.read_text().splitlines() if line]
        config = tomllib.loads(config_file.read_text())
        ledger_file = directory / "ledger.jsonl"
        rows = ledger_file.read_text().splitlines() if ledger_file.is_file() else []
        ledger = Ledger.from_json([json.loads(row) for row in rows if row])
    except (ValueError, TypeError) as error:  # JSON, TOML or a ledger row of the wrong shape
        raise FedloraError(f"{directory}: a run file is damaged: {error}") from None
    adapter = directory / "adapter"
    clients = directory / "adapters"
    return RunOutcome(
        directory,
        config,
        metrics,
        ledger.totals(),
        adapter if adapter.is_dir() else None,
        sorted(clients.glob("client_*"), key=lambda p: int(p.name.split("_")[1]))
        if clients.is_dir()
        else [],
    )


@contextmanager
def config_path(config: ConfigSource) -> Iterator[Path]:
    """A TOML file holding ``config``: the file itself, or a validated dict or ``Config``
    written to a temporary file (a distributed run's ranks read the config from a file)."""
    if isinstance(config, str | Path):
        yield Path(config)
        return
    if isinstance(config, Mapping):
        config = config_from_dict(dict(config))
    if not isinstance(config, Config):
        raise ConfigError(
            f"config must be a path to a TOML file, a dict or a fedlora Config, not "
            f"{type(config).__name__}"
        )
    with tempfile.TemporaryDirectory(prefix="fedlora-config-") as folder:
        path = Path(folder) / "config.toml"
        path.write_text(tomli_w.dumps(config.model_dump(exclude_none=True)))
        yield path


def run(
    config: ConfigSource,
    out: str | Path | None = None,
    resume: bool = False,
    overrides: Sequence[str] = (),
    *,
    engine: str = "simulation",
    nproc: int | None = None,
    observer: bool = False,
    timeout: float = 600.0,
    progress: bool = True,
    console: Console | None = None,
) -> RunOutcome:
    """Run an experiment and return its run directory, read back (``load_run``).

    ``config``: a TOML file, a dict shaped like one, or a ``Config``; ``overrides``: strings
    as ``--set`` takes them (``"train.lr=1e-3"``); ``out``: the run directory (default
    ``runs/<experiment.name>``). ``engine``, ``nproc``, ``observer`` and ``timeout`` are the
    CLI's options of the same names. Raises ``FedloraError`` (``ConfigError`` for a mistake found
    before training) with the message the CLI prints.
    """
    console = console or Console()
    out_path = Path(out) if out is not None else None
    if engine not in ENGINES:
        raise ConfigError(f"--engine must be simulation or distributed, not {engine!r}")
    with config_path(config) as path:
        loaded = load_config(path, list(overrides))  # the schema: pydantic only
        from fedlora.preflight import preflight

        # check_config (methods, options, ranks, aggregators: no torch), then the machine's
        # devices (torch, not yet transformers or peft)
        preflight(loaded)
        if engine == "simulation":
            if nproc is not None:
                raise ConfigError("--nproc needs --engine distributed")
            if observer:
                raise ConfigError(
                    "--observer needs --engine distributed (one process sees every party)"
                )
            run_simulation(path, list(overrides), out_path, resume, console, progress)
        else:
            if loaded.compute.workers not in (1, "auto"):
                raise ConfigError(
                    f"compute.workers = {loaded.compute.workers} is for --engine simulation; "
                    "with --engine distributed, --nproc sets how many processes host clients"
                )
            run_distributed(
                path, list(overrides), out_path, resume, nproc, timeout, console, progress, observer
            )
        from fedlora.rundir import out_dir

        return load_run(out_dir(out_path, loaded))


def run_simulation(
    path: Path,
    overrides: list[str],
    out: Path | None,
    resume: bool,
    console: Console,
    progress: bool,
) -> None:
    from fedlora.channel import MessageError
    from fedlora.engines.pool import PoolError
    from fedlora.session import run_experiment

    try:
        run_experiment(path, overrides, out, resume, console, show_progress=progress)
    except MessageError as error:  # a step that cannot go on without the message
        raise RunError(f"a party refused a message it needed: {error}") from None
    except PoolError as error:  # a worker process died (killed, out of memory)
        raise RunError(str(error)) from None


def run_distributed(
    path: Path,
    overrides: list[str],
    out: Path | None,
    resume: bool,
    nproc: int | None,
    timeout: float,
    console: Console,
    progress: bool,
    observer: bool,
) -> None:
    from fedlora.engines.launch import LaunchError, launch
    from fedlora.engines.transport import PeerError

    try:
        launch(path, overrides, out, resume, nproc, timeout, console, progress, observer)
    except (LaunchError, PeerError) as error:
        raise RunError(str(error)) from None
