"""Cost of gossip itself vs local compute in a Dec-LoRA round (issue 4).

Runs Dec-LoRA in one process on minilm-l6 (LoRA r=8 on q,k,v + head), 10 nodes on a ring, K
local steps per node, and reads the engine's own per-round timing: ``local_seconds`` (the nodes'
local training) and ``mix_seconds`` (serialising every message through the channel, decoding
and validating it, quantising if configured, and the weighted sums). Evaluation is excluded.

    python -P benchmarks/gossip.py [--nodes 10] [--steps 5] [--rounds 2] [--bits 32]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from fedlora.config import load_config
from fedlora.engines.placements import local_loop
from fedlora.experiment import build
from fedlora.session import configure_runtime

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bits", type=int, default=32, choices=[2, 4, 8, 32])
    args = parser.parse_args()
    configure_runtime()
    overrides = [
        "method.name=declora",
        "topology.kind=ring",
        f"topology.quantize_bits={args.bits}",
        f"experiment.rounds={args.rounds}",
        f"partition.num_clients={args.nodes}",
        f"train.local_steps={args.steps}",
        f"eval.every={args.rounds + 1}",
        "topology.per_node_eval=false",
        "data.max_test_examples=16",  # evaluation is not part of the measurement
    ]
    experiment = build(load_config(REPO / "configs" / "default.toml", overrides))
    with tempfile.TemporaryDirectory() as directory:
        result = local_loop(experiment, Path(directory), pooled=False).run(show_progress=False)
    rounds = [m for m in result.metrics if m["round"] > 0]  # round 0: the initial model
    local = sum(m["local_seconds"] for m in rounds)
    mixing = sum(m["mix_seconds"] for m in rounds)
    sent = result.metrics[-1]["cumulative_bytes"]
    print(
        f"{args.nodes} nodes, ring, {args.steps} local steps, {args.rounds} rounds, "
        f"{args.bits}-bit messages, {sent / 1e6:.1f} MB sent"
    )
    print(f"local compute {local:.1f} s, gossip (serialise + exchange + mix) {mixing:.3f} s")
    print(f"gossip share {mixing / local:.4f} of local compute")


if __name__ == "__main__":
    main()
