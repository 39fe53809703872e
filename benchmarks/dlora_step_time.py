"""Wall time per training step: plain PEFT LoRA vs the DLoRA cloud–edge split (issue 5).

The split runs the same model and batches, but every active module's activations and
gradients go through the channel as safetensors messages, so its overhead is serialisation
and the autograd round trips. Kill-and-Revive (budget 1/8, check every 2 steps) is timed too:
it cuts the device's work and traffic, not the simulation's wall time, which the cloud's
frozen forward/backward dominates. One user, IID data, float32, torch's default threads.

    python benchmarks/dlora_step_time.py --model minilm-l6 --batch 16 --length 128
    python benchmarks/dlora_step_time.py --model smollm2-135m --batch 4 --length 64
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from fedlora import experiment as experiments
from fedlora.config import load_config
from fedlora.engines.placements import local_loop
from fedlora.session import configure_runtime

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny" / "dlora.toml"


def build(args: argparse.Namespace, budget: float) -> experiments.Experiment:
    overrides = [
        f"model.name={args.model}",
        f"train.batch_size={args.batch}",
        f"model.max_length={args.length}",
        "partition.kind=iid",
        "partition.num_clients=1",
        f"train.local_steps={args.steps}",
        "experiment.rounds=1",
        "data.max_train_examples=400",
        f"method.budget={budget}",
        "method.tau=2",
    ]
    if args.model in ("smollm2-135m", "tiny-llama"):
        overrides.append("data.dataset=chatterbot")
    return experiments.build(load_config(TINY, overrides))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    configure_runtime()
    print(
        f"{args.model}, batch {args.batch}, length {args.length}, {args.steps} steps, "
        f"{torch.get_num_threads()} threads"
    )

    exp = build(args, 1.0)
    began = time.perf_counter()
    exp.trainer.train(exp.slots.read(), exp.clients[0], 0, 0, lambda name: True)
    print(f"PEFT LoRA (one process)        {(time.perf_counter() - began) / args.steps:.3f} s/step")

    for label, budget in (
        ("split, all modules active", 1.0),
        ("split, Kill-and-Revive 1/8", 0.125),
    ):
        exp = build(args, budget)
        with tempfile.TemporaryDirectory() as out:
            engine = local_loop(exp, Path(out))
            user = engine.round.users[0]
            began = time.perf_counter()
            engine.round._train_block(user, 0)
            seconds = (time.perf_counter() - began) / args.steps
        active = [int(row[3]) for row in user.account]
        print(f"{label:30} {seconds:.3f} s/step (active modules per step {active})")


if __name__ == "__main__":
    main()
