"""Start-up: from process start to the end of the first local step, in parts (issue 16).

    python -P benchmarks/startup.py [--config configs/tiny/fedit.toml configs/default.toml]
        [--repeats 3] [--set section.key=value ...]

Each repeat is a fresh ``python`` process (the parent notes the time it starts it) that does
what ``fedlora run`` does before training, timing each part: the interpreter and fedlora's
imports (torch, transformers, peft, datasets, ...), the config checks, the experiment (data
split, tokenization, base model, adapter slots, method), and the first client's first local
step. Round 0's evaluation of the initial model, which a run does before that step, is timed
apart (its cost is the evaluation set's, not start-up's). Prints the median of each part.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fedlora.offline import use_offline_defaults

REPO = Path(__file__).resolve().parents[1]
PARTS = ("interpreter and imports", "config checks", "experiment built", "round-0 evaluation")


def child(config_file: str, launched: float, overrides: list[str]) -> None:
    marks = {}
    from fedlora import experiment as experiments
    from fedlora.config import load_config
    from fedlora.engines.placements import local_loop
    from fedlora.session import configure_runtime

    marks["interpreter and imports"] = time.time()
    config = load_config(Path(config_file), ["train.local_steps=1", *overrides])
    compute = experiments.validate(config)
    configure_runtime(compute)
    marks["config checks"] = time.time()
    experiment = experiments.build(config)
    marks["experiment built"] = time.time()
    engine = local_loop(experiment, Path("/nonexistent"), pooled=False)
    engine.test_metrics()
    marks["round-0 evaluation"] = time.time()
    message = experiment.method.server_message(0, 0)
    engine.round.runtime.train(0, message, 0)
    marks["first local step"] = time.time()
    times, previous = {}, launched
    for name, mark in marks.items():
        times[name] = mark - previous
        previous = mark
    print(json.dumps(times))


def measure(config: Path, overrides: list[str]) -> dict[str, float]:
    launched = time.time()
    sets = [arg for text in overrides for arg in ("--set", text)]
    out = subprocess.run(
        [
            sys.executable,
            "-P",
            __file__,
            "--child",
            str(config),
            "--launched",
            repr(launched),
            *sets,
        ],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        type=Path,
        nargs="+",
        default=[REPO / "configs" / "tiny" / "fedit.toml", REPO / "configs" / "default.toml"],
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], help="a config override")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    use_offline_defaults()
    if args.child:
        child(args.child, args.launched, args.set)
        return
    names = [*PARTS, "first local step"]
    print("| config | " + " | ".join(names) + " | to the first step, without round 0 |")
    print("|---" * (len(names) + 2) + "|")
    for config in args.config:
        runs = [measure(config.resolve(), args.set) for _ in range(args.repeats)]
        median = {n: statistics.median(r[n] for r in runs) for n in names}
        total = sum(v for n, v in median.items() if n != "round-0 evaluation")
        cells = " | ".join(f"{median[n]:.2f} s" for n in names)
        print(f"| {config.resolve().relative_to(REPO)} | {cells} | {total:.2f} s |")


if __name__ == "__main__":
    main()
