"""Framework overhead: a FedIT run vs the same optimizer steps in a plain PEFT loop (issue 2).

Both run in this process, back to back, on the same model (minilm-l6, LoRA r=8 on q,k,v + head),
with the very same batches (same rows, so the same padded shapes). The FedIT side is the real
engine: channel serialisation, adapter swaps, optimizer set-up per client, aggregation,
checkpoint files. Evaluation is excluded from both (the plain loop does none): the FedIT time is
the sum of the rounds' ``train_seconds`` plus the checkpoint writes. The plain loop runs before
and after the FedIT run and its mean is used, so drift of the machine affects both sides alike.

    python -P benchmarks/overhead.py [--rounds 2] [--clients 10] [--steps 4] [--repeats 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, TaskType, get_peft_model

from fedlora.config import load_config
from fedlora.engines.placements import local_loop
from fedlora.experiment import Experiment, build
from fedlora.models import load_base_model, load_tokenizer
from fedlora.session import configure_runtime
from fedlora.training import batch_stream, derived_seed

REPO = Path(__file__).resolve().parents[1]


def same_batches(experiment: Experiment, rounds: int) -> list[list[int]]:
    """The rows of every batch the engine trains on, in order (see ``LocalTrainer.train``)."""
    config = experiment.config
    batches = []
    for round_index in range(rounds):
        for client, rows in enumerate(experiment.clients):
            stream = batch_stream(
                rows,
                config.train.batch_size,
                derived_seed(config.experiment.seed, round_index, client, 2),
            )
            batches.extend(next(stream) for _ in range(config.train.local_steps))
    return batches


def plain_loop(experiment: Experiment, batches: list[list[int]]) -> float:
    """A textbook PEFT training loop over the given batches; returns seconds."""
    config = experiment.config
    tokenizer = load_tokenizer(config.model.name)
    base = load_base_model(config.model.name, len(experiment.split.label_names), tokenizer, seed=0)
    model = get_peft_model(
        base,
        LoraConfig(
            r=config.lora.rank,
            lora_alpha=config.lora.alpha,
            target_modules=["query", "key", "value"],
            modules_to_save=["classifier"],
            task_type=TaskType.SEQ_CLS,
        ),
    )
    model.train()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.train.lr
    )
    began = time.perf_counter()
    for rows in batches:
        optimizer.zero_grad(set_to_none=True)
        model(**experiment.train_set.batch(rows)).loss.backward()
        optimizer.step()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument(
        "--repeats", type=int, default=1, help="FedIT runs, each between two plain loops"
    )
    args = parser.parse_args()
    configure_runtime()
    overrides = [
        f"experiment.rounds={args.rounds}",
        f"partition.num_clients={args.clients}",
        f"train.local_steps={args.steps}",
        f"eval.every={args.rounds + 1}",
        "data.max_test_examples=16",  # the final evaluation is excluded anyway; keep it short
    ]
    experiment = build(load_config(REPO / "configs" / "default.toml", overrides))
    batches = same_batches(experiment, args.rounds)
    plain = [plain_loop(experiment, batches)]
    ratios = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as directory:
            result = local_loop(experiment, Path(directory), pooled=False).run(show_progress=False)
        assert sum(m["steps"] for m in result.metrics) == len(batches)
        fedlora_seconds = sum(m["train_seconds"] for m in result.metrics)
        plain.append(plain_loop(experiment, batches))
        ratios.append(fedlora_seconds / ((plain[-2] + plain[-1]) / 2))
        print(
            f"plain PEFT loop {plain[-2]:.1f} s / {plain[-1]:.1f} s around fedlora FedIT "
            f"{fedlora_seconds:.1f} s: ratio {ratios[-1]:.3f}"
        )
    print(f"optimizer steps {len(batches)} per run, batch {experiment.config.train.batch_size}")
    print(f"overhead ratio {statistics.median(ratios):.3f} (median of {len(ratios)})")


if __name__ == "__main__":
    main()
