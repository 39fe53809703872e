"""Whole runs with ``compute.compile`` against eager ones, per model and engine (issue 16).

    python -m benchmarks.compiled_runs [--set KEY=VALUE ...] [CONFIG ...]

For each config (default: the tiny FedIT, Dec-LoRA and DLoRA configs, one per engine, and
MiniLM-L6's demo at 2 rounds), one eager ``fedlora run`` and one with ``compute.compile=true``,
back to back in fresh processes: wall seconds (process start to exit, compilation included),
training seconds (the metrics' ``train_seconds`` summed over the rounds, which include the
first rounds' compilation too), and whether the two runs agree within the tolerance docs/gpus.md
states (losses 1e-5 relative, scores exactly, ledgers byte for byte). Inductor's cache is
emptied first (a fresh directory per run), so every compiled run pays its compilation.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from benchmarks.compare_runs import differences
from benchmarks.workers import REPO, run
from fedlora.offline import use_offline_defaults

CONFIGS = [
    "configs/tiny/fedit.toml",
    "configs/tiny/declora.toml",
    "configs/tiny/dlora.toml",
    "configs/default.toml",
]
SHORTER = {"configs/default.toml": ["experiment.rounds=2"]}  # the demo's rounds at 2 of 6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", default=CONFIGS)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    use_offline_defaults()
    print(
        "| config | eager wall s | compiled wall s | eager training s | compiled training s |"
        " agree |"
    )
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as work:
        for config in args.configs:
            sets = [*SHORTER.get(config, []), *args.overrides]
            name = Path(config).stem
            eager_out, compiled_out = Path(work) / f"{name}-eager", Path(work) / f"{name}-compiled"
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(work) / f"{name}-inductor")
            eager_wall, eager_train, _ = run(REPO / config, eager_out, sets)
            wall, train, _ = run(REPO / config, compiled_out, [*sets, "compute.compile=true"])
            found = differences(eager_out, compiled_out, loss_rtol=1e-5, metric_atol=0.0)
            agree = "yes" if not found else "no: " + "; ".join(found[:2])
            print(
                f"| {config} | {eager_wall:.1f} | {wall:.1f} | {eager_train:.1f} |"
                f" {train:.1f} | {agree} |"
            )


if __name__ == "__main__":
    main()
