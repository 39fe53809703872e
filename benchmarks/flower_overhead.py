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
  ``flower-run`` command; starting the SuperLink and the nodes is reported apart.

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


def on_flower(config: Path, nodes: int, work: Path) -> tuple[float, float, Path]:
    """(seconds to start the SuperLink and the nodes, seconds of ``flower-run``, run dir)."""
    app, run = work / "app", work / "flower"
    fedlora("flower-app", str(config), "--out", str(app), "--run-dir", str(run))
    began = time.perf_counter()
    with federation(work / "federation") as fed:
        for partition in range(nodes):
            fed.node(partition, nodes)
        started = time.perf_counter() - began
        wall = fedlora("flower-run", str(app), env=fed.env)
    return started, wall, run


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
    started, walls[f"Flower, {nodes} SuperNodes"], run = on_flower(config, nodes, work)
    reference = walls["in-process, all cores"]
    lines = [f"{config.relative_to(REPO)}", "", "| placement | wall s | vs in-process |"]
    lines.append("|---|---|---|")
    lines += [f"| {name} | {wall:.1f} | {wall / reference:.2f}x |" for name, wall in walls.items()]
    flower = json.loads((run / STATUS_FILE).read_text())["flower_bytes"]
    moved = sum(c["down"] + c["up"] for kind, c in flower.items() if kind == "train")
    control = sum(c["down"] + c["up"] for kind, c in flower.items() if kind != "train")
    ledger = ledger_bytes(run)
    lines += [
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
    args = parser.parse_args()
    use_offline_defaults()
    for config in args.config:
        with tempfile.TemporaryDirectory() as work:
            print(measure(config.resolve(), args.nodes, Path(work)) + "\n", flush=True)


if __name__ == "__main__":
    main()
