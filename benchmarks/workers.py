"""Clients in parallel over the cores (``compute.workers``) vs one after another (issue 16).

    python -P benchmarks/workers.py [--config configs/default.toml] [--workers 2] [--as-is]
    python -P benchmarks/workers.py --per-round 1 2 3 4 5 [--set train.batch_size=32]

The job is issue 16's: minilm-l6 + BBC News, FedIT, 10 IID clients, 5 rounds of 4 local steps
at batch 8 and length 64, evaluation on 8 test articles (``--set`` overrides of the config; add
more with ``--set``; ``--as-is`` runs the config without them). Each row is one whole
``fedlora run`` (process start to exit), back to back: workers = 1 with torch's default threads
(all cores), then each ``--workers`` count with the cores shared out among the workers, then a
one-process run with that many threads per client. Training seconds are the metrics'
``train_seconds`` summed over the rounds (the clients' work and the server's aggregation; no
start-up, no evaluation). The last column says whether the pooled run's metrics equal those of
the one-process run with the same threads per client.

``--per-round N...`` measures the rule behind ``compute.workers = "auto"`` instead: for each
number of clients per round, the training seconds of one process on all cores against one
worker per core of one thread, and which of the two ``auto`` picks.
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

import torch

from fedlora.compute import pool_size
from fedlora.config import load_config
from fedlora.offline import use_offline_defaults

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
JOB = [
    "partition.kind=iid",
    "partition.num_clients=10",
    "experiment.rounds=5",
    "train.local_steps=4",
    "train.batch_size=8",
    "model.max_length=64",
    "data.max_test_examples=8",
]


def run(config: Path, out: Path, overrides: list[str]) -> tuple[float, float, list[dict]]:
    """(wall seconds, training seconds, the metrics without timings) of one run."""
    command = [sys.executable, "-m", "fedlora", "run", str(config), "--out", str(out), "--quiet"]
    for override in overrides:
        command += ["--set", override]
    began = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, cwd=REPO)
    wall = time.perf_counter() - began
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = sum(row.get("train_seconds", 0.0) for row in rows)
    return wall, train, [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]


def per_round_sweep(config: Path, job: list[str], counts: list[int], cores: int) -> None:
    """One process on all cores vs one single-thread worker per core, per clients per round."""
    print(
        "| clients per round | 1 process, training s | workers, training s | pool speed-up |"
        " auto picks |"
    )
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        for count in counts:
            sets = [*job, f"federation.clients_per_round={count}"]
            _, alone, _ = run(config, Path(work) / f"one{count}", sets)
            _, pooled, _ = run(
                config, Path(work) / f"pool{count}", [*sets, f"compute.workers={cores}"]
            )
            picked, _ = pool_size(load_config(config, [*sets, "compute.workers=auto"]), CPU)
            choice = "workers" if picked > 1 else "1 process"
            print(f"| {count} | {alone:.1f} | {pooled:.1f} | {alone / pooled:.2f}x | {choice} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "default.toml")
    parser.add_argument("--workers", type=int, nargs="+", default=[2])
    parser.add_argument("--set", dest="extra", action="append", default=[])
    parser.add_argument("--as-is", action="store_true", help="the config without the job's sets")
    parser.add_argument("--per-round", type=int, nargs="+", help="sweep clients per round")
    args = parser.parse_args()
    use_offline_defaults()
    cores = len(os.sched_getaffinity(0))
    job = ([] if args.as_is else JOB) + args.extra
    if args.per_round:
        print(f"{args.config.relative_to(REPO)} with {' '.join(job)}; {cores} cores\n")
        per_round_sweep(args.config, job, args.per_round, cores)
        return
    rows = []
    with tempfile.TemporaryDirectory() as work:
        base = run(args.config, Path(work) / "one", job)
        rows.append(("1 (in-process)", "default", *base[:2], "-"))
        for workers in args.workers:
            threads = max(1, cores // workers)
            pooled = run(
                args.config, Path(work) / f"w{workers}", [*job, f"compute.workers={workers}"]
            )
            reference = run(
                args.config, Path(work) / f"t{threads}", [*job, f"compute.threads={threads}"]
            )
            same = "yes" if pooled[2] == reference[2] else "NO"
            rows.append((f"{workers}", f"{threads} each", *pooled[:2], same))
            rows.append((f"1, {threads} thread(s)", f"{threads}", *reference[:2], "-"))
    print(f"{args.config.relative_to(REPO)} with {' '.join(job)}; {cores} cores\n")
    print("| workers | threads | wall s | training s | training speed-up | equal to 1 process |")
    print("|---|---|---|---|---|---|")
    for workers, threads, wall, train, same in rows:
        ratio = rows[0][3] / train
        print(f"| {workers} | {threads} | {wall:.1f} | {train:.1f} | {ratio:.2f}x | {same} |")


if __name__ == "__main__":
    main()
