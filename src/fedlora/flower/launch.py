"""``fedlora flower-run APPDIR [CONNECTION]``: ``flwr run --stream``, then the run's real outcome;
``fedlora flower-node``: a SuperNode with its warm fedlora runtime.

``flwr run`` exits 0 even when the ServerApp failed, so this reads the status the ServerApp
wrote in the run directory (``flower-status.json``) and exits non-zero unless it says the run
completed. Both run Flower offline: runtime dependency installation and telemetry off.
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
from fedlora.flower import node_runtime, node_state
from fedlora.flower.app_dir import PYPROJECT
from fedlora.flower.protocol import PARTITION, PARTITIONS, RESUME, RUN_DIR, STATE_DIR, STATUS_FILE

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


def flwr_command(name: str = "flwr") -> str:
    """A Flower command of this environment (beside this Python), else the one on PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        raise ConfigError(f"`{name}` is not installed: pip install -e .[flower]")
    return found


def supernode_command(poll_interval: float | None) -> list[str]:
    """``flower-supernode``, or with ``poll_interval`` the same SuperNode with its waits capped
    at that many seconds (``fedlora.flower.supernode``)."""
    if poll_interval is None:
        return [flwr_command("flower-supernode")]
    return [sys.executable, "-m", "fedlora.flower.supernode", str(poll_interval)]


def run_node(
    partition: int,
    partitions: int,
    state_dir: Path | None,
    arguments: list[str],
    poll_interval: float | None = None,
) -> int:
    """``fedlora flower-node``: the node's runtime, then ``flower-supernode`` with this
    partition's node config and ``arguments`` (its waits capped at ``poll_interval``); the
    runtime stops with the SuperNode. Returns the SuperNode's exit code."""
    require("flwr", "flower", "fedlora flower-node")
    root = node_state.node_root(str(state_dir) if state_dir else None, partition)
    config = f'{PARTITION}={partition} {PARTITIONS}={partitions} {STATE_DIR}="{root}"'
    supernode = [*supernode_command(poll_interval), *arguments, "--node-config", config]
    environment = {**os.environ, **OFFLINE}
    runtime = subprocess.Popen(
        [sys.executable, "-m", "fedlora", "flower-runtime", "--state-dir", str(root)],
        env=environment,
    )
    try:
        node_runtime.wait_for(root, lambda: runtime.poll() is None)
        return subprocess.run(supernode, env=environment, check=False).returncode
    finally:
        runtime.terminate()
        try:
            runtime.wait(10)
        except subprocess.TimeoutExpired:
            runtime.kill()
            runtime.wait()


def flower_run(appdir: Path, connection: str | None, resume: bool = False) -> Path:
    """Run the app on the SuperLink ``connection`` names (Flower's config, or its default);
    with ``resume``, continue its run directory's checkpoint (the nodes keep their clients'
    state under the run's key). Returns the run directory, or raises ``RunFailed``."""
    require("flwr", "flower", "fedlora flower-run")
    run_dir = run_dir_of(appdir)
    held = (run_dir / CHECKPOINT).is_file()
    if held and not resume:
        raise ConfigError(
            f"{run_dir} already holds a run: continue it with --resume, or make the app again "
            "with another --run-dir"
        )
    if resume and not held:
        raise ConfigError(f"--resume: {run_dir} holds no checkpoint to continue")
    status = run_dir / STATUS_FILE
    status.unlink(missing_ok=True)
    command = [
        flwr_command(),
        "run",
        str(appdir),
        *([connection] if connection else []),
        "--stream",
        *(["--run-config", f"{RESUME}=true"] if resume else []),
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
