"""Step time and peak memory of local LoRA training, per model, compute dtype, batch size,
sequence length and gradient checkpointing (issues 9 and 29).

Each case runs in a fresh process, built by fedlora itself from ``configs/default.toml`` with
``[compute]`` overrides (so it measures exactly what ``fedlora run`` does): one warm-up step,
then ``--steps`` timed optimizer steps of FedIT's local trainer on one client. Peak memory is
the process's peak RSS on the CPU, and ``torch.cuda.max_memory_allocated`` on a GPU. A causal
model trains on prompt/completion records longer than any ``--lengths`` (two BBC articles
each), cut from the left, so every sequence is exactly the length named.

    python -P benchmarks/memory_step.py [--models minilm-l6 smollm2-135m] [--dtypes float32]
        [--device auto] [--batches 8] [--lengths 64] [--steps 5]

bfloat16 on this project's CPUs has no hardware support (~400x slower), so ``--dtypes`` defaults
to float32 on the CPU and to float32 and bfloat16 on an accelerator.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CAUSAL = ("smollm2-135m",)


def long_records(path: Path) -> Path:
    """64 prompt/completion records of two BBC articles each (over 600 tokens)."""
    from fedlora.data.sources import bbc_news

    articles = bbc_news()
    rows = [
        {"prompt": articles[i]["text"] + "\n\n" + articles[i + 1]["text"], "completion": "ok"}
        for i in range(0, 128, 2)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def child(case: dict) -> None:
    import torch

    from fedlora.config import load_config
    from fedlora.experiment import build
    from fedlora.models import model_spec
    from fedlora.session import configure_runtime

    targets = list(model_spec(case["model"]).default_targets)  # default.toml names BERT's

    config = load_config(
        REPO / "configs" / "default.toml",
        [
            f"model.name='{case['model']}'",
            f"lora.target_modules={targets}",
            f"data.dataset='{case['data']}'",
            f"model.max_length={case['length']}",
            f"train.batch_size={case['batch']}",
            "train.local_steps=1",
            "partition.kind='iid'",
            "partition.num_clients=1",
            "data.max_test_examples=8",
            f"compute.device='{case['device']}'",
            f"compute.dtype='{case['dtype']}'",
            f"compute.gradient_checkpointing={str(case['checkpointing']).lower()}",
        ],
    )
    experiment = build(config)
    configure_runtime(experiment.compute)
    trainer, device = experiment.trainer, experiment.compute.device
    rows = experiment.clients[0]
    start = experiment.method.context.initial

    def train(steps: int) -> None:
        trainer.config = config.train.model_copy(update={"local_steps": steps})
        trainer.train(start, rows, 0, 0, experiment.method.trainable)

    train(1)  # warm-up: kernels, allocator, lazy initialisation
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    train(case["steps"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - began) / case["steps"]
    result = {
        "step_seconds": seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "where": experiment.compute.describe(),
    }
    if device.type == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps(result))


def measure(case: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-P", __file__, "--child", json.dumps(case)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm-l6", "smollm2-135m"])
    parser.add_argument("--dtypes", nargs="+", default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batches", type=int, nargs="+", default=[8])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    import torch

    accelerator = args.device != "cpu" and (
        torch.cuda.is_available() or torch.backends.mps.is_available()
    )
    dtypes = args.dtypes or (["float32", "bfloat16"] if accelerator else ["float32"])
    print(f"{platform.node()}, {date.today()}")
    columns = "model | where | batch | length | checkpointing | step (s) | peak RSS (MiB)"
    print(f"| {columns} | peak GPU (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        records = str(long_records(Path(scratch) / "long.jsonl"))
        for model in args.models:
            for dtype in dtypes:
                for batch in args.batches:
                    for length in args.lengths:
                        for checkpointing in (False, True):
                            case = {
                                "model": model,
                                "data": records if model in CAUSAL else "bbc-news",
                                "dtype": dtype,
                                "checkpointing": checkpointing,
                                "device": args.device,
                                "batch": batch,
                                "length": length,
                                "steps": args.steps,
                            }
                            r = measure(case)
                            gpu = f"{r['peak_gpu_mib']:.0f}" if "peak_gpu_mib" in r else "-"
                            print(
                                f"| {model} | {r['where']} | {batch} | {length} | "
                                f"{'on' if checkpointing else 'off'} | {r['step_seconds']:.3f} | "
                                f"{r['peak_rss_mib']:.0f} | {gpu} |",
                                flush=True,
                            )


if __name__ == "__main__":
    main()
