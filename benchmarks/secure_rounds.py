"""Secure aggregation's round time across processes (issue 33): torch.distributed ranks and Flower
SuperNodes, each with and without ``privacy.secure_aggregation``.

    python -m benchmarks.secure_rounds [--config configs/default.toml] [--rounds 3]
        [--workers 2] [--poll-interval S] [--placements torch.distributed Flower]

For each placement, back to back on this machine, plain then secure:

- ``fedlora run CONFIG --engine distributed --nproc WORKERS+1`` (rank 0 the server, WORKERS
  ranks hosting the clients, one thread each);
- Flower on loopback: a SuperLink and WORKERS warm SuperNodes (``fedlora flower-node``), then
  ``fedlora flower-run`` of the app ``fedlora flower-app`` wrote.

With ``--poll-interval S`` the SuperNodes run with their waits capped at S seconds
(``fedlora flower-node --poll-interval``).

A round's time is its ``train_seconds`` in metrics.jsonl: the server's whole round (downloads,
the clients' local steps on their hosts, the replies or the masking protocol, the aggregation),
without the evaluation, which is the same in both arms and runs once, after the last round.
The table gives the median over the rounds, the secure/plain ratio, and the ledger's bytes per
round. Each secure run is checked against the one-thread in-process secure run of the same
config (its metrics and ledger, bit for bit).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from benchmarks.flower_overhead import REPO, fedlora, metrics
from fedlora.flower.loopback import federation
from fedlora.offline import use_offline_defaults


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def round_seconds(run: Path) -> float:
    return statistics.median(r["train_seconds"] for r in rows(run) if r["round"] >= 1)


def bytes_per_round(run: Path, rounds: int) -> int:
    ledger = (run / "ledger.jsonl").read_text().splitlines()
    return sum(json.loads(line)["bytes"] for line in ledger) // rounds


def on_flower(
    config: Path, workers: int, work: Path, tag: str, sets: list[str], poll: float | None
) -> Path:
    app, run = work / f"app-{tag}", work / f"flower-{tag}"
    fedlora("flower-app", str(config), "--out", str(app), "--run-dir", str(run), *sets)
    with federation(work / f"federation-{tag}", poll=poll) as fed:
        for partition in range(workers):
            fed.node(partition, workers)
        fedlora("flower-run", str(app), env=fed.env)
    return run


PLACEMENTS = ("torch.distributed", "Flower")


def measure(
    config: Path,
    rounds: int,
    workers: int,
    work: Path,
    poll: float | None = None,
    placements: tuple[str, ...] = PLACEMENTS,
) -> str:
    common = ["experiment.rounds=" + str(rounds), f"eval.every={rounds}"]
    arms = {"plain": common, "secure": [*common, "privacy.secure_aggregation=true"]}
    runs: dict[tuple[str, str], Path] = {}
    for arm, values in arms.items():
        sets = [part for value in values for part in ("--set", value)]
        if "torch.distributed" in placements:
            out = work / f"distributed-{arm}"
            fedlora("run", str(config), "--out", str(out), "--quiet", "--engine", "distributed",
                    "--nproc", str(workers + 1), *sets)  # fmt: skip
            runs[("torch.distributed", arm)] = out
        if "Flower" in placements:
            runs[("Flower", arm)] = on_flower(config, workers, work, arm, sets, poll)
    reference = work / "in-process-secure"
    sets = [part for value in arms["secure"] for part in ("--set", value)]
    fedlora("run", str(config), "--out", str(reference), "--quiet", "--set", "compute.threads=1",
            *sets)  # fmt: skip
    capped = f", SuperNode waits capped at {poll} s" if poll else ""
    lines = [
        f"{config.relative_to(REPO)}, {rounds} rounds, {workers} client hosts{capped}",
        "",
        "| placement | plain round s | secure round s | × | plain bytes/round | "
        "secure bytes/round | × | secure run = in-process secure run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for placement in placements:
        plain, secure = runs[(placement, "plain")], runs[(placement, "secure")]
        seconds = round_seconds(plain), round_seconds(secure)
        sizes = bytes_per_round(plain, rounds), bytes_per_round(secure, rounds)
        same = (
            metrics(secure) == metrics(reference)
            and (secure / "ledger.jsonl").read_text() == (reference / "ledger.jsonl").read_text()
        )
        lines.append(
            f"| {placement} | {seconds[0]:.2f} | {seconds[1]:.2f} | {seconds[1] / seconds[0]:.2f} "
            f"| {sizes[0]:,} | {sizes[1]:,} | {sizes[1] / sizes[0]:.3f} | {same} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "default.toml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="ranks or SuperNodes with clients")
    parser.add_argument("--poll-interval", type=float, help="cap the SuperNodes' waits (s)")
    parser.add_argument("--placements", nargs="+", choices=PLACEMENTS, default=list(PLACEMENTS))
    args = parser.parse_args()
    use_offline_defaults()
    with tempfile.TemporaryDirectory() as work:
        table = measure(
            args.config.resolve(),
            args.rounds,
            args.workers,
            Path(work),
            args.poll_interval,
            tuple(args.placements),
        )
        print(table, flush=True)


if __name__ == "__main__":
    main()
