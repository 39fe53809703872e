"""Every tiny config on the accelerator in float32 and bfloat16 and on the CPU in float32, in one
process (the stack is imported once), then the float32 accelerator run compared with the CPU run
by ``compare_runs.differences``. Exit 1 if any run fails or disagrees.

    python -m benchmarks.gpu_runs [--device cuda] [--out runs/gpu_check] [configs ...]

``--device cpu`` rehearses the whole check on a machine without a GPU (both sides on the CPU).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console

from benchmarks.compare_runs import differences
from fedlora.session import run_experiment

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_check")
    parser.add_argument("--loss-rtol", type=float, default=1e-3)
    parser.add_argument("--metric-atol", type=float, default=0.02)
    args = parser.parse_args()
    tiny = REPO / "configs" / "tiny"
    configs = args.configs or sorted(tiny.glob("*.toml")) + sorted(tiny.glob("causal/*.toml"))
    quiet = Console(quiet=True)
    failed = False
    for config in configs:
        name = f"{config.parent.name}_{config.stem}"
        runs = {}
        for label, device, dtype in (
            ("reference_cpu_float32", "cpu", "float32"),
            (f"{args.device}_float32", args.device, "float32"),
            (f"{args.device}_bfloat16", args.device, "bfloat16"),
        ):
            out = args.out / label / name
            shutil.rmtree(out, ignore_errors=True)  # the check reruns from scratch
            overrides = [f"compute.device='{device}'", f"compute.dtype='{dtype}'"]
            began = time.perf_counter()
            try:
                run_experiment(config, overrides, out, False, quiet, show_progress=False)
            except Exception as error:  # report every config, not only the first failure
                print(f"FAIL {label} {name}: {type(error).__name__}: {error}", flush=True)
                failed = True
                continue
            runs[label] = out
            print(f"ok   {label} {name} ({time.perf_counter() - began:.1f} s)", flush=True)
        reference = runs.get("reference_cpu_float32")
        candidate = runs.get(f"{args.device}_float32")
        if reference and candidate:
            found = differences(candidate, reference, args.loss_rtol, args.metric_atol)
            print(f"{'DIFFER' if found else 'agree '} {name}: {args.device} float32 vs cpu")
            for line in found:
                print(f"       {line}")
            failed |= bool(found)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
