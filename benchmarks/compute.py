"""Compute efficiency of the local training step: achieved FLOP/s vs the fp32 matmul peak.

The step's FLOPs are counted once by ``torch.utils.flop_counter.FlopCounterMode`` (forward and
backward of minilm-l6 with LoRA r=8 on q,k,v, one real batch); the step is then timed without the
counter. The peak is the best of several timings of a large float32 matmul in the same process.

    python benchmarks/compute.py [--batch 16] [--length 128] [--steps 10] [--compile]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from fedlora.adapters import AdapterSlots
from fedlora.config import DataConfig, LoraConfig
from fedlora.data.sources import load_split
from fedlora.data.tokenized import tokenize
from fedlora.models import load_base_model, load_tokenizer, model_spec
from fedlora.session import configure_runtime


def matmul_peak(size: int = 2048, repeats: int = 3, trials: int = 7) -> float:
    """The best of ``trials`` timings of ``repeats`` float32 matmuls: one timing swings by
    20% from run to run on a shared 2-core machine, the best is the machine's peak."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = 0.0
    for _ in range(trials):
        began = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - began))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--compile", action="store_true", help="time the step with torch.compile of the forward"
    )
    args = parser.parse_args()
    configure_runtime()
    tokenizer = load_tokenizer("minilm-l6")
    split = load_split(DataConfig(max_train_examples=args.batch), needs_answers=False)
    data = tokenize(split.train, tokenizer, args.length, causal=False)
    base = load_base_model("minilm-l6", len(split.label_names), tokenizer, seed=0)
    slots = AdapterSlots(base, model_spec("minilm-l6"), LoraConfig(rank=8), init_seed=0)
    model = slots.model.train()
    optimizer = torch.optim.AdamW([p for _, p in slots.parameters(lambda name: True)], lr=1e-3)
    batch = data.batch(list(range(args.batch)))
    forward = model

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        forward(**batch).loss.backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    if args.compile:
        forward = torch.compile(model)
        began = time.perf_counter()
        step()  # compiles
        print(f"compiled in {time.perf_counter() - began:.1f} s")
    step()  # warm-up
    began = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - began) / args.steps
    achieved, peak = flops / seconds, matmul_peak()
    print(
        f"step {flops / 1e9:.1f} GFLOP in {seconds:.3f} s (batch {args.batch}, length "
        f"{batch['input_ids'].shape[1]}, {torch.get_num_threads()} threads)"
    )
    print(
        f"achieved {achieved / 1e9:.1f} GFLOP/s, fp32 matmul peak {peak / 1e9:.1f} GFLOP/s, "
        f"fraction {achieved / peak:.2f}"
    )


if __name__ == "__main__":
    main()
