"""Wall time of a DP-SGD local step against the non-private step on the same batch (issue 13).

Both run fedlora's own local trainer on one client of MiniLM-L6 + BBC News in the FFA-LoRA
study's setting (r = 8 on query and value, head trained, length 64, AdamW): the plain step is one
batch-mean backward pass; the DP-SGD step is torch.func's per-example gradients of the trained
tensors (vmap over the batch), per-example clipping, the noise and the same optimizer step. The
private sample is fixed-size (``privacy.sampling = "fixed"``), so both steps see ``--batch``
examples. Each timing is one ``train`` call of ``--steps`` steps after a warm-up call; the median
over ``--repeats`` calls is printed per method. The machine is shared, so both the process's CPU
time (one thread: what the step costs, barely changed by other jobs) and the wall time (what it
costs on this machine now) are printed, with the load average.

    python -P benchmarks/dp_step_time.py [--batch 16] [--length 64] [--steps 4] [--repeats 5]
    python -P benchmarks/dp_step_time.py --noise-sources   # DP-SGD, seeded vs secure noise

``--noise-sources`` times FedIT's DP-SGD step with ``privacy.noise_source`` seeded (derived
from the run seed) and secure (fresh secret seeds from the OS), interleaved repeat by repeat.
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


def experiment(
    method: str, private: bool, args: argparse.Namespace, extra: tuple[str, ...] = ()
) -> Experiment:
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
    return build(load_config(CONFIG, overrides + (PRIVATE if private else []) + list(extra)))


def seconds_per_step(exp: Experiment, args: argparse.Namespace) -> tuple[float, float]:
    """(median CPU seconds, median wall seconds) per step."""
    method, rows = exp.method, exp.clients[0]
    start = method.client_start(0, method.server_message(0, 0), {})
    exp.trainer.train(start, rows, 0, 0, method.trainable)  # warm-up
    cpu, wall = [], []
    for repeat in range(args.repeats):
        began, began_cpu = time.perf_counter(), time.process_time()
        exp.trainer.train(start, rows, repeat + 1, 0, method.trainable)
        cpu.append((time.process_time() - began_cpu) / args.steps)
        wall.append((time.perf_counter() - began) / args.steps)
    return statistics.median(cpu), statistics.median(wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--noise-sources", action="store_true", help="seeded vs secure noise")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    configure_runtime()
    load = os.getloadavg()[0]
    print(
        f"{date.today()}: minilm-l6, batch {args.batch}, length {args.length}, {args.steps} steps "
        f"x {args.repeats} repeats, {torch.get_num_threads()} thread(s), load average {load:.1f} "
        f"on {os.cpu_count()} cores"
    )
    if args.noise_sources:
        compare_noise_sources(args)
        return
    print(
        "| method | trained tensors | plain CPU s/step | DP-SGD CPU s/step | DP-SGD / plain (CPU) "
        "| plain wall s/step | DP-SGD wall s/step |"
    )
    print("|---|---|---|---|---|---|---|")
    for method in ("fedit", "ffa"):
        plain = experiment(method, False, args)
        trained = sum(p.numel() for _, p in plain.slots.parameters(plain.method.trainable))
        plain_cpu, plain_wall = seconds_per_step(plain, args)
        private_cpu, private_wall = seconds_per_step(experiment(method, True, args), args)
        print(
            f"| {method} | {trained:,} | {plain_cpu:.3f} | {private_cpu:.3f} | "
            f"{private_cpu / plain_cpu:.2f}x | {plain_wall:.3f} | {private_wall:.3f} |"
        )
    print(f"load average after: {os.getloadavg()[0]:.1f}")


def compare_noise_sources(args: argparse.Namespace) -> None:
    """FedIT's DP-SGD step under seeded and secure noise: the medians of ``--repeats`` calls of
    each, alternating so that a change in the machine's load hits both."""
    runs = {
        source: experiment("fedit", True, args, (f"privacy.noise_source={source}",))
        for source in ("seeded", "secure")
    }
    times: dict[str, list[tuple[float, float]]] = {source: [] for source in runs}
    for _ in range(args.repeats):
        for source, exp in runs.items():
            times[source].append(
                seconds_per_step(exp, argparse.Namespace(**{**vars(args), "repeats": 1}))
            )
    print("| noise source | DP-SGD CPU s/step | DP-SGD wall s/step |")
    print("|---|---|---|")
    for source, samples in times.items():
        cpu = statistics.median(c for c, _ in samples)
        wall = statistics.median(w for _, w in samples)
        print(f"| {source} | {cpu:.3f} | {wall:.3f} |")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
