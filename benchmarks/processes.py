"""Throughput of the distributed engine with 1, 2 and 4 processes (issue 4).

    python benchmarks/processes.py [--config configs/tiny/fedit.toml] [--nproc 1 2 4]

Each row is one ``fedlora run --engine distributed --nproc N`` of the same config with longer
rounds and evaluation only after the last one. Throughput is client-steps per second of
training time (the metrics' ``train_seconds``: from the first message sent to the aggregate,
so the p2p exchange is in it, process start-up and evaluation are not); wall time includes
start-up (the launcher imports the stack, then every rank it forks builds the experiment).

What limits it: every rank runs with one intra-op thread (``torch.set_num_threads(1)`` in the
ranks, so N processes do not oversubscribe the cores), and for server methods rank 0 is the
server and trains nothing: N processes give N-1 training ranks, and no more of them than there
are cores can run at once. One process runs the in-process engine on one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure(config: Path, nproc: int, rounds: int, local_steps: int, work: Path) -> dict:
    out = work / f"nproc{nproc}"
    command = [sys.executable, "-m", "fedlora", "run", str(config), "--out", str(out), "--quiet"]
    command += ["--engine", "distributed", "--nproc", str(nproc)]
    for override in (
        f"experiment.rounds={rounds}",
        f"train.local_steps={local_steps}",
        f"eval.every={rounds}",
    ):
        command += ["--set", override]
    began = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=REPO)
    wall = time.perf_counter() - began
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = sum(r["steps"] for r in rows)
    seconds = sum(r["train_seconds"] for r in rows)
    return {"nproc": nproc, "steps": steps, "seconds": seconds, "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "tiny" / "fedit.toml")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=60)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as work:
        results = [
            measure(args.config, n, args.rounds, args.local_steps, Path(work)) for n in args.nproc
        ]
    base = results[0]["steps"] / results[0]["seconds"]
    shape = f"{args.rounds} rounds x {args.local_steps} local steps"
    print(f"{args.config.name}, {shape}, {os.cpu_count()} CPUs")
    print("| processes | client-steps | training s | client-steps/s | vs first | wall s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        rate = r["steps"] / r["seconds"]
        print(
            f"| {r['nproc']} | {r['steps']} | {r['seconds']:.1f} | {rate:.1f} | "
            f"{rate / base:.2f}x | {r['wall']:.1f} |"
        )


if __name__ == "__main__":
    main()
