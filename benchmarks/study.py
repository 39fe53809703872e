"""Run a reproduction study (several arms x several seeds) and tabulate it as mean ± std.

A study file (``benchmarks/studies/*.toml``) names the arms: each is a config plus
``--set`` overrides; ``set`` at the top level applies to every arm (the sizing that makes the
study fit this machine). Every run is a plain ``fedlora run`` in its own process with one torch
thread, ``--jobs`` at a time, under ``runs/studies/<study>/<arm>/seed<k>``. A finished run (its
``summary.md`` exists) is skipped and an interrupted one continues with ``--resume``, so the
command can be repeated until the study is complete. An arm with ``from_study`` reuses the runs
of an arm of another study (``from_arm``, default the same label; same config and overrides).
Then it writes the table (``runs/studies/<study>/results.md``, also printed) and one plot
(``docs/figures/<study>.png``): the first quality metric vs round and vs cumulative bytes, mean
over seeds with a ±1 std band.

    python -P benchmarks/study.py benchmarks/studies/ffa_vs_fedit.toml [MORE.toml ...] [--jobs 2]
    python -P benchmarks/study.py STUDY --report-only

Several study processes may work through the same list at once (each run is claimed by one).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fedlora.channel import human_bytes
from fedlora.report import RunView, plot_mean_bands, read_run

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Arm:
    label: str
    config: Path
    overrides: tuple[str, ...]
    from_study: str | None = None  # the same arm's runs, already made by another study
    from_arm: str | None = None  # the arm's label in that study (default: the same label)

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", (self.from_arm or self.label).lower()).strip("-")


@dataclass(frozen=True)
class Study:
    name: str
    seeds: tuple[int, ...]
    metrics: tuple[str, ...]  # quality metrics; the first is plotted
    extra: tuple[str, ...]  # more columns: last metrics row or accounting.json keys
    arms: tuple[Arm, ...]

    @property
    def directory(self) -> Path:
        return REPO / "runs" / "studies" / self.name

    def run_dir(self, arm: Arm, seed: int) -> Path:
        return REPO / "runs" / "studies" / (arm.from_study or self.name) / arm.slug / f"seed{seed}"


def load_study(path: Path) -> Study:
    data = tomllib.loads(path.read_text())
    common = tuple(data.get("set", []))
    arms = tuple(
        Arm(
            arm["label"],
            REPO / arm["config"],
            common + tuple(arm.get("set", [])),
            arm.get("from_study"),
            arm.get("from_arm"),
        )
        for arm in data["arms"]
    )
    metrics = tuple(data.get("metrics", ["accuracy", "macro_f1"]))
    return Study(data["name"], tuple(data["seeds"]), metrics, tuple(data.get("extra", [])), arms)


def claim(out: Path) -> bool:
    """Reserve a run for this process (``<run>.claim`` holds our pid, created exclusively), so
    several study processes can share one queue; a claim whose process is gone is taken over."""
    out.parent.mkdir(parents=True, exist_ok=True)
    marker = out.parent / f"{out.name}.claim"
    for _ in range(2):
        try:
            descriptor = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(marker.read_text() or 0), 0)
                return False  # its owner is alive
            except (ProcessLookupError, ValueError):
                marker.unlink(missing_ok=True)  # stale: the owner died
            continue
        with os.fdopen(descriptor, "w") as handle:
            handle.write(str(os.getpid()))
        return True
    return False


def run_one(arm: Arm, seed: int, out: Path) -> str:
    if (out / "summary.md").is_file():
        return f"{out}: done before"
    if not claim(out):
        return f"{out}: running in another study process"
    command = [sys.executable, "-m", "fedlora", "run", str(arm.config), "--out", str(out)]
    command += ["--quiet", "--set", f"experiment.seed={seed}"]
    for override in arm.overrides:
        command += ["--set", override]
    if (out / "checkpoint.safetensors").is_file():
        command.append("--resume")
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.log", "w") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    (out.parent / f"{out.name}.claim").unlink(missing_ok=True)
    return f"{out}: {'finished' if code == 0 else f'FAILED (exit {code}), see {out}.log'}"


def run_studies(studies: list[Study], jobs: int) -> None:
    """Every (study, seed, arm) in order, ``jobs`` at a time; seeds outermost, so the first
    seed of every arm finishes first."""
    tasks = [
        (arm, seed, study.run_dir(arm, seed))
        for study in studies
        for seed in study.seeds
        for arm in study.arms
    ]
    with ThreadPoolExecutor(jobs) as pool:
        for message in pool.map(lambda task: run_one(*task), tasks):
            print(message, flush=True)


def present(values) -> list[float]:
    return [v for v in values if v is not None]


def extra_value(run: RunView, key: str) -> float | None:
    """``key`` from the run's last metrics row, else from its ``accounting.json`` (DLoRA);
    ``rounds:KEY`` counts the rounds whose KEY is set (``rounds:skipped``), ``total:KEY`` adds
    up the sizes of the rounds' KEY lists or tables (``total:absent``, ``total:rejected``)."""
    if key.startswith("rounds:"):
        return float(sum(1 for m in run.metrics if m.get(key.removeprefix("rounds:"))))
    if key.startswith("total:"):
        return float(sum(len(m.get(key.removeprefix("total:"), ())) for m in run.metrics))
    if key in run.metrics[-1]:
        return run.metrics[-1][key]
    accounting = run.path / "accounting.json"
    return json.loads(accounting.read_text()).get(key) if accounting.is_file() else None


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def finished_runs(study: Study, arm: Arm) -> list[RunView]:
    runs = []
    for seed in study.seeds:
        out = study.run_dir(arm, seed)
        if (out / "summary.md").is_file():
            runs.append(read_run(out))
    return runs


def report(study: Study) -> str:
    """One row per arm: mean ± std over the finished seeds of each quality metric (final, and
    best for the first), of each ``extra`` key (the last metrics row's, or the run's
    ``accounting.json``), and mean bytes and wall time."""
    main = study.metrics[0]
    header = ["arm", "seeds", f"final {main}", f"best {main}"]
    header += [f"final {m}" for m in study.metrics[1:]] + list(study.extra)
    header += ["up / client / round", "total bytes", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    curves: dict[str, list[RunView]] = {}
    for arm in study.arms:
        runs = finished_runs(study, arm)
        curves[arm.label] = runs
        if not runs:
            lines.append(f"| {arm.label} | 0 |" + " - |" * (len(header) - 2))
            continue
        uploads = [
            m["bytes_up"] / len(m["clients"])
            for run in runs
            for m in run.metrics
            if m.get("clients") and "bytes_up" in m
        ]
        total = statistics.mean(run.metrics[-1]["cumulative_bytes"] for run in runs)
        seconds = statistics.mean(sum(m["seconds"] for m in run.metrics) for run in runs)
        cells = [arm.label, str(len(runs)), mean_std(present(run.final(main) for run in runs))]
        cells.append(mean_std(present(run.best(main) for run in runs)))
        cells += [mean_std(present(run.final(m) for run in runs)) for m in study.metrics[1:]]
        cells += [mean_std(present(extra_value(run, key) for run in runs)) for key in study.extra]
        cells.append(human_bytes(int(statistics.mean(uploads))) if uploads else "-")
        cells += [human_bytes(int(total)), f"{seconds:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    figures = REPO / "docs" / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    plot_mean_bands(curves, main, figures / f"{study.name}.png", title=study.name)
    study.directory.mkdir(parents=True, exist_ok=True)
    (study.directory / "results.md").write_text(table + "\n")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("studies", type=Path, nargs="+", help="study files, run in this order")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    studies = [load_study(path) for path in args.studies]
    if not args.report_only:
        run_studies(studies, args.jobs)
    for study in studies:
        print(f"\n{study.name}\n\n{report(study)}")


if __name__ == "__main__":
    main()
