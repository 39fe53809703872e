"""Wall time of a DP-SGD local step against the non-private step on the same batch (issue 13).

Both run fedlora's own local trainer on one client of MiniLM-L6 + BBC News in the FFA-LoRA
study's setting (r = 8 on query and value, head trained, length 64, AdamW): the plain step is one
batch-mean backward pass; the DP-SGD step is torch.func's per-example gradients of the trained
tensors (vmap over the batch), per-example clipping, the noise and the same optimizer step. The
private sample is fixed-size (``privacy.sampling = "fixed"``), so both steps see ``--batch``
examples. Each timing is one ``train`` call of ``--steps`` steps after a warm-up call; the median
over ``--repeats`` calls is printed per method, with the load average, since the machine is shared.

    python -P benchmarks/dp_step_time.py [--batch 16] [--length 64] [--steps 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from fedlora.config import load_config
from fedlora.experiment import Experiment, build
from fedlora.session import configure_runtime

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "paper" / "ffa_vs_fedit.toml"
PRIVATE = ["privacy.mechanism=dp_sgd", "privacy.noise_multiplier=1.0", "privacy.sampling=fixed"]


def experiment(method: str, private: bool, args: argparse.Namespace) -> Experiment:
    overrides = [
        f"method.name={method}",
        f"model.max_length={args.length}",
        f"train.batch_size={args.batch}",
        f"train.local_steps={args.steps}",
        "train.optimizer=adamw",
        "partition.kind=iid",
        "partition.num_clients=1",
        "data.max_train_examples=400",
        "data.max_test_examples=8",
        "experiment.rounds=1",
    ]
    return build(load_config(CONFIG, overrides + (PRIVATE if private else [])))


def seconds_per_step(exp: Experiment, args: argparse.Namespace) -> float:
    method, rows = exp.method, exp.clients[0]
    start = method.client_start(0, method.server_message(0, 0), {})
    exp.trainer.train(start, rows, 0, 0, method.trainable)  # warm-up
    times = []
    for repeat in range(args.repeats):
        began = time.perf_counter()
        exp.trainer.train(start, rows, repeat + 1, 0, method.trainable)
        times.append((time.perf_counter() - began) / args.steps)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    configure_runtime()
    load = os.getloadavg()[0]
    print(
        f"{date.today()}: minilm-l6, batch {args.batch}, length {args.length}, {args.steps} steps "
        f"x {args.repeats} repeats, {torch.get_num_threads()} thread(s), load average {load:.1f} "
        f"on {os.cpu_count()} cores"
    )
    print("| method | trained tensors | plain step (s) | DP-SGD step (s) | DP-SGD / plain |")
    print("|---|---|---|---|---|")
    for method in ("fedit", "ffa"):
        plain = experiment(method, False, args)
        trained = sum(p.numel() for _, p in plain.slots.parameters(plain.method.trainable))
        plain_s = seconds_per_step(plain, args)
        private_s = seconds_per_step(experiment(method, True, args), args)
        print(
            f"| {method} | {trained:,} | {plain_s:.3f} | {private_s:.3f} | "
            f"{private_s / plain_s:.2f}x |"
        )
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
