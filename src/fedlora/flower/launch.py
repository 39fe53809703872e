"""``fedlora flower-run APPDIR [CONNECTION]``: ``flwr run --stream``, then the run's real outcome.

``flwr run`` exits 0 even when the ServerApp failed, so this reads the status the ServerApp
wrote in the run directory (``flower-status.json``) and exits non-zero unless it says the run
completed. It also runs Flower offline: runtime dependency installation and telemetry off.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from fedlora.checkpoint import FILE as CHECKPOINT
from fedlora.config import ConfigError
from fedlora.extras import require
from fedlora.flower.app_dir import PYPROJECT
from fedlora.flower.protocol import RUN_DIR, STATUS_FILE

# What Flower must not do here: fetch the app's dependencies, or phone home.
OFFLINE = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0"}


class RunFailed(RuntimeError):
    """The Flower run did not complete; the message says why (from the ServerApp's status)."""


def run_dir_of(appdir: Path) -> Path:
    path = appdir / PYPROJECT
    if not path.is_file():
        raise ConfigError(
            f"{appdir} is not a fedlora Flower app (no {PYPROJECT}); make one with "
            "`fedlora flower-app CONFIG --out APPDIR`"
        )
    config = tomllib.loads(path.read_text()).get("tool", {}).get("flwr", {}).get("app", {})
    run_dir = config.get("config", {}).get(RUN_DIR)
    if not isinstance(run_dir, str):
        raise ConfigError(
            f"{path} has no {RUN_DIR} in [tool.flwr.app.config]; it was not "
            "written by `fedlora flower-app`"
        )
    return Path(run_dir)


def flwr_command() -> str:
    """The ``flwr`` of this environment (beside this Python), else the one on PATH."""
    beside = Path(sys.executable).with_name("flwr")
    found = str(beside) if beside.is_file() else shutil.which("flwr")
    if found is None:
        raise ConfigError("`flwr` is not installed: pip install -e .[flower]")
    return found


def flower_run(appdir: Path, connection: str | None) -> Path:
    """Run the app on the SuperLink ``connection`` names (Flower's config, or its default);
    returns the run directory, or raises ``RunFailed``."""
    require("flwr", "flower", "fedlora flower-run")
    run_dir = run_dir_of(appdir)
    if (run_dir / CHECKPOINT).is_file():
        raise ConfigError(
            f"{run_dir} already holds a run; make the app again with another --run-dir"
        )
    status = run_dir / STATUS_FILE
    status.unlink(missing_ok=True)
    command = [
        flwr_command(),
        "run",
        str(appdir),
        *([connection] if connection else []),
        "--stream",
    ]
    environment = {**os.environ, **OFFLINE}
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment.get('PATH', '')}"
    code = subprocess.run(command, env=environment, check=False).returncode
    if code != 0:
        raise RunFailed(f"`flwr run` exited with code {code}")
    if not status.is_file():
        raise RunFailed(
            f"the ServerApp wrote no {STATUS_FILE} in {run_dir}: it did not start, "
            "or it was stopped"
        )
    outcome = json.loads(status.read_text())
    if outcome.get("status") != "completed":
        raise RunFailed(f"the Flower run {outcome.get('run_id')} failed: {outcome.get('error')}")
    return run_dir
