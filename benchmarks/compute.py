"""Compute efficiency of the local training step: achieved FLOP/s vs the fp32 matmul peak.

The step's FLOPs are counted once by ``torch.utils.flop_counter.FlopCounterMode`` (forward and
backward of minilm-l6 with LoRA r=8 on q,k,v, one real batch); the step is then timed without the
counter. The peak is the best of several timings of a large float32 matmul in the same process.

    python benchmarks/compute.py [--batch 16] [--length 128] [--steps 10] [--compile] [--breakdown]
        [--attention sdpa|eager]

``--breakdown`` says where the step's time goes that the matmul peak does not explain: the
self time of its operations grouped by kind (torch.profiler), and the same step timed with
dropout off (``model.eval()``, gradients still flowing), which also lets attention take
torch's fused kernel (the fused CPU kernels refuse a non-zero dropout).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile
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


MATRIX_PRODUCTS = {"aten::mm", "aten::addmm", "aten::bmm"}


def timed_step(step: Callable[[], None], steps: int) -> float:
    """Seconds per step, after one warm-up step."""
    step()
    began = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - began) / steps


def breakdown(step: Callable[[], None], model: torch.nn.Module, steps: int) -> None:
    """Print the step's self time by kind of operation, then its time with dropout off."""
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(steps):
            step()
    kinds = {"matrix products": 0.0, "dropout masks (bernoulli_)": 0.0, "everything else": 0.0}
    for event in profiler.key_averages():
        if event.key in MATRIX_PRODUCTS:
            kinds["matrix products"] += event.self_cpu_time_total
        elif event.key == "aten::bernoulli_":
            kinds["dropout masks (bernoulli_)"] += event.self_cpu_time_total
        else:
            kinds["everything else"] += event.self_cpu_time_total
    total = sum(kinds.values())
    for kind, microseconds in kinds.items():
        print(f"{kind}: {microseconds / steps / 1e3:.1f} ms a step, {microseconds / total:.0%}")
    with_dropout = timed_step(step, steps)
    model.eval()
    without = timed_step(step, steps)
    model.train()
    print(
        f"step with dropout {with_dropout:.3f} s, with dropout off {without:.3f} s "
        f"(dropout and the unfused attention it forces: {1 - without / with_dropout:.0%})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--compile", action="store_true", help="time the step with torch.compile of the forward"
    )
    parser.add_argument(
        "--attention",
        choices=["sdpa", "eager"],
        default="sdpa",
        help="transformers' attention implementation (sdpa is what fedlora runs)",
    )
    parser.add_argument(
        "--breakdown", action="store_true", help="where the step's time goes (see the docstring)"
    )
    args = parser.parse_args()
    configure_runtime()
    tokenizer = load_tokenizer("minilm-l6")
    split = load_split(DataConfig(max_train_examples=args.batch), needs_answers=False)
    data = tokenize(split.train, tokenizer, args.length, causal=False)
    base = load_base_model("minilm-l6", len(split.label_names), tokenizer, seed=0)
    base.set_attn_implementation(args.attention)
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
    seconds = timed_step(step, args.steps)
    achieved, peak = flops / seconds, matmul_peak()
    print(
        f"step {flops / 1e9:.1f} GFLOP in {seconds:.3f} s (batch {args.batch}, length "
        f"{batch['input_ids'].shape[1]}, {torch.get_num_threads()} threads)"
    )
    print(
        f"achieved {achieved / 1e9:.1f} GFLOP/s, fp32 matmul peak {peak / 1e9:.1f} GFLOP/s, "
        f"fraction {achieved / peak:.2f}"
    )
    if args.breakdown:
        breakdown(step, model, args.steps)


if __name__ == "__main__":
    main()
