"""One config through Flower on loopback vs the in-process engine vs torch.distributed (issue 14).

    python -P benchmarks/flower_overhead.py [--config configs/tiny/fedit.toml configs/default.toml]
        [--nodes 2]

For each config, back to back on this machine, each a whole command from process start to exit:

- ``fedlora run CONFIG``: the in-process engine, its default thread count (all cores);
- the same with ``compute.threads=1`` (what the Flower and distributed results are equal to);
- ``fedlora run CONFIG --engine distributed --nproc NODES+1``: rank 0 the server, NODES ranks
  hosting the clients, one thread each;
- Flower: a SuperLink and NODES SuperNodes on 127.0.0.1 (``fedlora.flower.loopback``), then
  ``fedlora flower-run`` of the app ``fedlora flower-app`` wrote. Its wall is the
  ``flower-run`` command; starting the SuperLink and the nodes is reported apart. Twice: warm
  (each node with its fedlora runtime, ``fedlora flower-node``: the experiment built once per
  node) and cold (bare SuperNodes: every ClientApp builds the experiment for its message).
  The per-message overhead is Flower's wall minus torch.distributed's (the same parallel
  layout, one thread per party), over the messages Flower carried.

With ``--rss-rounds R`` (default 10) the first config also runs warm for R rounds, and each
node runtime's resident memory (``/proc/<pid>/status`` VmRSS) is read as each round is
recorded: flat over the rounds means one base model per node, not one per message.

Then the bytes: the ledger's total (the tensors' safetensors bytes of every message) against
the bytes Flower moved for the same messages (``flower-status.json``: each message's objects as
its Grid pushes and pulls them), and whether the Flower run's metrics equal the one-thread
in-process run's. Prints a Markdown table per config.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fedlora.flower.loopback import federation
from fedlora.flower.protocol import STATUS_FILE
from fedlora.offline import use_offline_defaults

REPO = Path(__file__).resolve().parents[1]
TIMING = ("seconds", "train_seconds", "eval_seconds", "server_seconds")


def fedlora(*args: str, env: dict[str, str] | None = None) -> float:
    """Run ``fedlora ARGS`` to completion; its wall seconds."""
    began = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "fedlora", *args],
        check=True,
        stdout=subprocess.DEVNULL,
        cwd=REPO,
        env=env,
    )
    return time.perf_counter() - began


def metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def ledger_bytes(run: Path) -> int:
    rows = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]
    return sum(row["bytes"] for row in rows)


def on_flower(
    config: Path, nodes: int, work: Path, warm: bool, *overrides: str
) -> tuple[float, float, Path, list[list[int]]]:
    """(seconds to start the SuperLink and the nodes, seconds of ``flower-run``, run dir, each
    node runtime's RSS in KiB as each round was recorded (warm only))."""
    tag = "warm" if warm else "cold"
    app, run = work / f"app-{tag}", work / f"flower-{tag}"
    sets = [arg for item in overrides for arg in ("--set", item)]
    fedlora("flower-app", str(config), "--out", str(app), "--run-dir", str(run), *sets)
    began = time.perf_counter()
    with federation(work / f"federation-{tag}") as fed:
        for partition in range(nodes):
            fed.node(partition, nodes, warm=warm)
        started = time.perf_counter() - began
        watcher = RssWatcher(run, work / f"federation-{tag}", nodes) if warm else None
        wall = fedlora("flower-run", str(app), env=fed.env)
        rss = watcher.stop() if watcher else []
    return started, wall, run, rss


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class RssWatcher:
    """Each node runtime's RSS whenever the run's metrics gain a round."""

    def __init__(self, run: Path, home: Path, nodes: int) -> None:
        self.run, self.home, self.nodes = run, home, nodes
        self.rows: list[list[int]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()

    def pids(self) -> list[int]:
        found = []
        for node in range(self.nodes):
            pattern = f"flower-runtime --state-dir {self.home / f'node{node}'}"
            out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
            found += [int(pid) for pid in out.stdout.split()[:1]]
        return found

    def watch(self) -> None:
        seen = 0
        while not self.done.is_set():
            metrics = self.run / "metrics.jsonl"
            rounds = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
            if rounds > seen:
                seen = rounds
                self.rows.append([rounds - 1, *(rss_kib(pid) for pid in self.pids())])
            time.sleep(0.2)

    def stop(self) -> list[list[int]]:
        self.done.set()
        self.thread.join()
        return self.rows


def measure(config: Path, nodes: int, work: Path) -> str:
    inproc, one = work / "inproc", work / "inproc1"
    walls = {
        "in-process, all cores": fedlora("run", str(config), "--out", str(inproc), "--quiet"),
        "in-process, 1 thread": fedlora(
            "run", str(config), "--out", str(one), "--quiet", "--set", "compute.threads=1"
        ),
        f"torch.distributed, {nodes + 1} processes": fedlora(
            "run",
            str(config),
            "--out",
            str(work / "distributed"),
            "--quiet",
            "--engine",
            "distributed",
            "--nproc",
            str(nodes + 1),
        ),
    }
    started, walls[f"Flower, {nodes} SuperNodes, warm"], run, _ = on_flower(
        config, nodes, work, True
    )
    _, walls[f"Flower, {nodes} SuperNodes, cold"], _, _ = on_flower(config, nodes, work, False)
    reference = walls["in-process, all cores"]
    lines = [f"{config.relative_to(REPO)}", "", "| placement | wall s | vs in-process |"]
    lines.append("|---|---|---|")
    lines += [f"| {name} | {wall:.1f} | {wall / reference:.2f}x |" for name, wall in walls.items()]
    flower = json.loads((run / STATUS_FILE).read_text())["flower_bytes"]
    moved = sum(c["down"] + c["up"] for kind, c in flower.items() if kind == "train")
    control = sum(c["down"] + c["up"] for kind, c in flower.items() if kind != "train")
    ledger = ledger_bytes(run)
    messages = sum(c["messages"] for c in flower.values())
    distributed = walls[f"torch.distributed, {nodes + 1} processes"]
    overhead = {
        kind: 1000 * (walls[f"Flower, {nodes} SuperNodes, {kind}"] - distributed) / messages
        for kind in ("warm", "cold")
    }
    lines += [
        "",
        f"Per message ({messages} Flower messages): warm {overhead['warm']:.0f} ms, cold "
        f"{overhead['cold']:.0f} ms over torch.distributed's wall.",
        "",
        f"Starting the SuperLink and {nodes} SuperNodes: {started:.1f} s (not in the wall above).",
        f"Bytes: ledger {ledger:,}; Flower's train messages {moved:,} "
        f"({moved / ledger:.4f}x the ledger), its other messages {control:,} "
        f"({', '.join(k for k in flower if k != 'train')}).",
        "Flower's metrics equal the one-thread in-process run's: "
        f"{metrics(run) == metrics(one)}; the ledgers are equal: "
        f"{(run / 'ledger.jsonl').read_text() == (one / 'ledger.jsonl').read_text()}.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        type=Path,
        nargs="+",
        default=[REPO / "configs" / "tiny" / "fedit.toml", REPO / "configs" / "default.toml"],
    )
    parser.add_argument("--nodes", type=int, default=2, help="SuperNodes, and distributed workers")
    parser.add_argument("--rss-rounds", type=int, default=10, help="0: no memory run")
    args = parser.parse_args()
    use_offline_defaults()
    for config in args.config:
        with tempfile.TemporaryDirectory() as work:
            print(measure(config.resolve(), args.nodes, Path(work)) + "\n", flush=True)
    if args.rss_rounds:
        with tempfile.TemporaryDirectory() as work:
            config = args.config[0].resolve()
            rounds = f"experiment.rounds={args.rss_rounds}"
            _, _, _, rows = on_flower(config, args.nodes, Path(work), True, rounds)
        print(f"{config.relative_to(REPO)}, {args.rss_rounds} rounds, warm: node runtime RSS (MiB)")
        print("| round | " + " | ".join(f"node {n}" for n in range(args.nodes)) + " |")
        print("|---|" + "---|" * args.nodes)
        for row in rows:
            print(f"| {row[0]} | " + " | ".join(f"{kib / 1024:.0f}" for kib in row[1:]) + " |")


if __name__ == "__main__":
    main()
