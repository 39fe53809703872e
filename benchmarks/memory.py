"""Peak memory with many simulated clients vs one (issue 2).

Each case runs in a fresh process (peak RSS is per process): one round of ``--method`` on
minilm-l6, LoRA r=8, one local step per client, IID clients, and reports the process's peak
resident set size. With one frozen base shared by all clients, 100 clients should cost little
more than 1: a client is an index list plus its adapter tensors (and optimizer state where the
method keeps it).

    python benchmarks/memory.py [--many 100] [--method fedit]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(clients: int, method: str) -> None:
    from fedlora.config import load_config
    from fedlora.engines.placements import local_loop
    from fedlora.experiment import build
    from fedlora.session import configure_runtime

    configure_runtime()
    config = load_config(
        REPO / "configs" / "default.toml",
        [
            "experiment.rounds=1",
            f"partition.num_clients={clients}",
            "partition.kind=iid",
            "train.local_steps=1",
            "train.batch_size=8",
            f"method.name={method}",
            "data.max_test_examples=32",
        ],
    )
    with tempfile.TemporaryDirectory() as directory:
        local_loop(build(config), Path(directory), pooled=False).run(show_progress=False)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux reports KiB


def peak_rss(clients: int, method: str) -> int:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(clients), "--method", method],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--many", type=int, default=100)
    parser.add_argument("--method", default="fedit")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.method)
        return
    one = peak_rss(1, args.method)
    many = peak_rss(args.many, args.method)
    print(
        f"method {args.method}: peak RSS 1 client {one / 2**20:.0f} MiB, "
        f"{args.many} clients {many / 2**20:.0f} MiB"
    )
    print(f"memory ratio {many / one:.3f}")


if __name__ == "__main__":
    main()
