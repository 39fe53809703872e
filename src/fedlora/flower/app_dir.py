"""``fedlora flower-app CONFIG --out APPDIR``: a runnable Flower app for one fedlora config.

The app directory holds only a ``pyproject.toml``: its ``[tool.flwr.app.components]`` point at
fedlora's own ServerApp and ClientApp, and its run config carries the resolved fedlora config
as TOML text (so every SuperNode rebuilds the same experiment without a shared file system),
the run directory the ServerApp writes, and the timeouts. ``flwr run APPDIR CONNECTION`` runs
it; ``fedlora flower-run`` does too and then fails when the run did.

Only methods whose rounds are the server round fit; the others are refused here, before
anything starts, naming the engines that run them. Nothing here imports Flower or torch.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import tomli_w

from fedlora.config import Config, ConfigError, load_config
from fedlora.extras import require
from fedlora.flower.protocol import (
    CONFIG_TEXT,
    NODE_WAIT,
    REPLY_TIMEOUT,
    RESUME,
    RUN_DIR,
    RUN_KEY,
)
from fedlora.methods import method_class

PYPROJECT = "pyproject.toml"


def refuse(config: Config) -> None:
    """What the Flower deployment cannot run, refused with the engines that can."""
    from fedlora.engines.capabilities import placement_refusal

    name, cls = config.method.name, method_class(config.method.name)
    refusal = placement_refusal(config, "flower")
    if refusal is not None:
        raise ConfigError(refusal)
    if cls.pooled_data or not cls.communicates:
        raise ConfigError(
            f"method {name!r} has no server-client messages to deploy; run it with "
            "`fedlora run --engine simulation`"
        )
    if config.compute.workers not in (1, "auto"):
        raise ConfigError(
            f"compute.workers = {config.compute.workers} is for `fedlora run`; on Flower each "
            "SuperNode trains its own clients: start more SuperNodes instead"
        )


def config_text(config: Config) -> str:
    """The resolved config as the run directory's config.toml holds it."""
    return tomli_w.dumps(config.model_dump(exclude_none=True))


@contextmanager
def config_from_text(text: str) -> Iterator[tuple[Config, Path]]:
    """The config a run config carries, and a file holding it while in use (the run functions
    read configs from files)."""
    with tempfile.TemporaryDirectory(prefix="fedlora-") as folder:
        path = Path(folder) / "config.toml"
        path.write_text(text)
        yield load_config(path), path


def run_key(run_dir: Path) -> str:
    """The name of the run's directory on the nodes: the run directory's name and a digest of
    its path (two apps writing to one run directory are one run, to be resumed)."""
    where = str(run_dir.resolve())
    name = "".join(c if c.isalnum() else "-" for c in run_dir.name)
    return f"{name}-{hashlib.sha256(where.encode()).hexdigest()[:12]}"


def write_app(
    config_file: Path,
    overrides: list[str],
    appdir: Path,
    run_dir: Path,
    reply_timeout: float,
    node_wait: float,
) -> Path:
    """Write the app directory for ``config_file`` (with ``overrides``); returns its pyproject."""
    from fedlora.preflight import check_config

    require("flwr", "flower", "fedlora flower-app")
    config = load_config(config_file, overrides)
    check_config(config)
    refuse(config)
    if appdir.exists() and not appdir.is_dir():
        raise ConfigError(f"--out {appdir} is a file, not a directory")
    appdir.mkdir(parents=True, exist_ok=True)
    name = "fedlora-" + "".join(c if c.isalnum() else "-" for c in config.experiment.name)
    pyproject = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": name.lower(),
            "version": "1.0.0",
            "description": f"fedlora experiment {config.experiment.name!r} as a Flower app",
            "license": "Apache-2.0",
            # fedlora (and flwr) must be installed on every machine already: runtime
            # dependency installation is to be disabled (offline), so nothing is listed.
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedlora",
                    "components": {
                        "serverapp": "fedlora.flower.server_app:app",
                        "clientapp": "fedlora.flower.client_app:app",
                    },
                    "config": {
                        CONFIG_TEXT: config_text(config),
                        RUN_DIR: str(run_dir.resolve()),
                        RUN_KEY: run_key(run_dir),
                        RESUME: False,  # fedlora flower-run --resume sets it
                        REPLY_TIMEOUT: reply_timeout,
                        NODE_WAIT: node_wait,
                    },
                }
            }
        },
    }
    path = appdir / PYPROJECT
    path.write_text(tomli_w.dumps(pyproject, multiline_strings=True))
    return path
