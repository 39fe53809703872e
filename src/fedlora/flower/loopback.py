"""A real Flower federation on loopback, for the tests and the benchmarks: one
``flower-superlink`` and N ``flower-supernode`` subprocesses on free ports of 127.0.0.1, each in
its own process group (the SuperNode's SuperExec and ClientApp processes are its children), all
stopped by pid when the ``federation`` block ends. A Flower config in a private ``FLWR_HOME``
names the SuperLink as the default connection, so ``fedlora flower-run APPDIR`` (run with
``Federation.env``) finds it. Not for production: docs/flower.md shows a real deployment's commands.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fedlora.engines.launch import free_port
from fedlora.flower.launch import OFFLINE, supernode_command

BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr, fedlora


@dataclass
class Federation:
    home: Path
    env: dict[str, str]
    link_port: int
    tls: dict[str, Path] | None
    poll: float | None = None  # the SuperNodes' waits capped (``fedlora.flower.supernode``)
    nodes: dict[int, subprocess.Popen] = field(default_factory=dict)  # by partition
    processes: list[subprocess.Popen] = field(default_factory=list)

    def start(
        self, name: str, command: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        log = open(self.home / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        process = subprocess.Popen(
            command,
            env={**self.env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.processes.append(process)
        return process

    def node(
        self,
        partition: int,
        partitions: int,
        key: Path | None = None,
        tag: str = "",
        warm: bool = True,
        drill: str | None = None,
    ) -> subprocess.Popen:
        """Start a SuperNode hosting ``partition`` (with ``key``: authenticating with it);
        ``warm``: with its fedlora runtime (``fedlora flower-node``), else the bare SuperNode,
        whose ClientApps build the experiment for every message; ``drill``: its runtime's fault
        drill (``FEDLORA_DRILL_EXIT``, STEP@ROUND)."""
        state = self.home / f"node{partition}{tag}"
        command = ["--superlink", f"127.0.0.1:{self.link_port}", "--port", str(free_port())]
        if self.tls is None:
            command += ["--insecure"]
        else:
            command += ["--root-certificates", str(self.tls["ca"])]
        if key is not None:
            command += ["--auth-supernode-private-key", str(key)]
        if warm:
            poll = ["--poll-interval", str(self.poll)] if self.poll else []
            command = [
                str(BIN / "fedlora"), "flower-node", "--partition-id", str(partition),
                "--num-partitions", str(partitions), "--state-dir", str(state), *poll, *command,
            ]  # fmt: skip
        else:
            config = f'partition-id={partition} num-partitions={partitions} state-dir="{state}"'
            command = [*supernode_command(self.poll), *command, "--node-config", config]
        drilled = {"FEDLORA_DRILL_EXIT": drill} if drill else None
        process = self.start(f"node{partition}{tag}", command, drilled)
        self.nodes[partition] = process
        return process

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """A ``flwr`` CLI command against this SuperLink (the default connection)."""
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def log(self, name: str) -> str:
        return (self.home / f"{name}.log").read_text(errors="replace")


def stop(process: subprocess.Popen) -> None:
    """Stop ``process`` and its children (its process group), by its pid."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)
    # what is left of the group (children outlive a leader that exited by itself), at once
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the SuperLink exited"
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


@contextmanager
def federation(
    home: Path, tls: dict[str, Path] | None = None, auth: bool = False, poll: float | None = None
) -> Iterator[Federation]:
    """A SuperLink (TLS with ``tls``'s ca/cert/key, SuperNode authentication with ``auth``);
    the test starts its SuperNodes with ``Federation.node`` (their waits capped at ``poll``
    seconds, else flwr's own)."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, **OFFLINE, "FLWR_HOME": str(home / "flwr")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    (home / "flwr").mkdir()
    security = "insecure = true" if tls is None else f'root-certificates = "{tls["ca"]}"'
    (home / "flwr" / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{port}"\n'
        f"{security}\n"
    )
    fed = Federation(home, env, port, tls, poll)
    command = [str(BIN / "flower-superlink"), "--port", str(port)]
    if tls is None:
        command += ["--insecure"]
    else:
        command += ["--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile", str(tls["cert"])]
        command += ["--ssl-keyfile", str(tls["key"])]
    command += ["--enable-supernode-auth"] if auth else []
    try:
        link = fed.start("superlink", command)
        wait_for_port(port, link)
        yield fed
    finally:
        for process in reversed(fed.processes):
            stop(process)
