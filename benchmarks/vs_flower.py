"""fedlora vs Flower's simulation on the same FedIT job, whole process, back to back (issue 16).

    pip install -r benchmarks/requirements-flower-sim.txt     # ray, for Flower's simulation
    python -P benchmarks/vs_flower.py [--repeats 1]

The job: minilm-l6 + BBC News (426 test articles carved as fedlora carves them), LoRA r = 8,
alpha 16 on query/key/value plus the classifier head, 10 IID clients, 5 rounds in which every
client runs 4 AdamW steps (lr 5e-3) of batch 8 at length 64, the global model evaluated after
every round on 8 test articles.

- fedlora: ``fedlora run configs/default.toml`` with the job's ``--set`` overrides, with
  ``compute.workers`` 1 (the default) and ``auto`` (one worker per core here).
- Flower 1.41's simulation, written as FlowerTune writes it: a ClientApp whose ``train``
  loads the global PEFT state dict into its PEFT model, runs its local steps and returns its
  PEFT state dict and example count; a ServerApp running ``FedAvg`` over those state dicts
  (every node sampled, no client evaluation) with a central ``evaluate_fn``; ``run_simulation``
  with one virtual SuperNode per client on the Ray backend, one CPU per ClientApp (so as many
  at once as there are cores), one torch thread each. In Flower's favour: each Ray actor builds
  the model and data once and keeps them between messages (FlowerTune's template loads the
  model in every ``client_fn`` call).

Each side is a fresh ``python`` process, timed from start to exit. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from fedlora.offline import use_offline_defaults

REPO = Path(__file__).resolve().parents[1]
CLIENTS, ROUNDS, STEPS, BATCH, LENGTH, LR, TEST_ROWS, SEED = 10, 5, 4, 8, 64, 5e-3, 8, 0
FEDLORA_JOB = [
    "partition.kind=iid",
    f"partition.num_clients={CLIENTS}",
    f"experiment.rounds={ROUNDS}",
    f"train.local_steps={STEPS}",
    f"train.batch_size={BATCH}",
    f"model.max_length={LENGTH}",
    f"data.max_test_examples={TEST_ROWS}",
]


# -- the Flower side (runs in its own process: ``--side flower``) -----------------------------
def flower_parts() -> tuple:
    """The tokenizer, the PEFT model, the training rows and the test rows."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedlora.config import DataConfig
    from fedlora.data.sources import bbc_news, carve_test
    from fedlora.models import minilm_dir

    torch.manual_seed(SEED)
    data = bbc_news()
    labels = len(data.features["label"].names)
    train, test = carve_test(data, DataConfig(dataset="bbc-news"), labels)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    base = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=labels)
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["query", "key", "value"],
        modules_to_save=["classifier"],
        task_type=TaskType.SEQ_CLS,
    )
    return tokenizer, get_peft_model(base, lora), train, test.select(range(TEST_ROWS))


def batch_of(tokenizer, rows) -> dict:
    encoded = tokenizer(
        list(rows["text"]), truncation=True, max_length=LENGTH, padding=True, return_tensors="pt"
    )
    import torch

    return {**encoded, "labels": torch.tensor(list(rows["label"]))}


def flower_simulation() -> None:
    import torch
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation
    from flwr_datasets.partitioner import IidPartitioner
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    client_app, server_app = ClientApp(), ServerApp()
    built: list[tuple] = []  # each process's (each Ray actor's) own copy, filled once

    def parts() -> tuple:
        if not built:
            built.append(flower_parts())
        return built[0]

    @client_app.train()
    def train(message: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        tokenizer, model, rows, _ = parts()
        set_peft_model_state_dict(model, message.content["arrays"].to_torch_state_dict())
        partitioner = IidPartitioner(num_partitions=CLIENTS)
        partitioner.dataset = rows
        mine = partitioner.load_partition(int(context.node_config["partition-id"]))
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=LR)
        generator = torch.Generator().manual_seed(SEED)
        model.train()
        for _ in range(STEPS):
            picked = torch.randint(len(mine), (BATCH,), generator=generator).tolist()
            loss = model(**batch_of(tokenizer, mine.select(picked))).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        reply = RecordDict(
            {
                "arrays": ArrayRecord(get_peft_model_state_dict(model)),
                "metrics": MetricRecord({"num-examples": len(mine), "train_loss": loss.item()}),
            }
        )
        return Message(reply, reply_to=message)

    def evaluate(round_index: int, arrays: ArrayRecord) -> MetricRecord:
        tokenizer, model, _, test = parts()
        set_peft_model_state_dict(model, arrays.to_torch_state_dict())
        model.eval()
        with torch.no_grad():
            logits = model(**batch_of(tokenizer, test)).logits
        accuracy = (logits.argmax(-1) == torch.tensor(list(test["label"]))).float().mean()
        return MetricRecord({"accuracy": accuracy.item()})

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        _, model, _, _ = parts()
        strategy = FedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=CLIENTS,
            min_available_nodes=CLIENTS,
        )
        strategy.start(
            grid,
            ArrayRecord(get_peft_model_state_dict(model)),
            num_rounds=ROUNDS,
            evaluate_fn=evaluate,
        )

    cores = len(os.sched_getaffinity(0))
    run_simulation(
        server_app,
        client_app,
        num_supernodes=CLIENTS,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": cores, "include_dashboard": False},
        },
    )


# -- the measurement ------------------------------------------------------------------------------
def timed(command: list[str]) -> float:
    began = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - began


def fedlora_command(out: Path, workers: str) -> list[str]:
    command = [sys.executable, "-m", "fedlora", "run", str(REPO / "configs" / "default.toml")]
    command += ["--out", str(out), "--quiet", "--set", f"compute.workers={workers}"]
    for override in FEDLORA_JOB:
        command += ["--set", override]
    return command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=["flower"], help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    use_offline_defaults()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    if args.side == "flower":
        flower_simulation()
        return
    import tempfile

    walls: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as work:
        for repeat in range(args.repeats):
            for workers in ("1", "auto"):
                out = Path(work) / f"w{workers}-{repeat}"
                walls.setdefault(f"fedlora, workers = {workers}", []).append(
                    timed(fedlora_command(out, workers))
                )
            flower = [sys.executable, "-P", str(Path(__file__).resolve()), "--side", "flower"]
            walls.setdefault("Flower 1.41 simulation (Ray)", []).append(timed(flower))
    reference = min(walls["Flower 1.41 simulation (Ray)"])
    print("| run | wall s (best of repeats) | vs Flower |")
    print("|---|---|---|")
    for name, seconds in walls.items():
        print(f"| {name} | {min(seconds):.1f} | {min(seconds) / reference:.2f}x |")


if __name__ == "__main__":
    main()
