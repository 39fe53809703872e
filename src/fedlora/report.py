"""Tables and plots of one run or several side by side, from their run directories."""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt

from fedlora.channel import human_bytes

TEST_KEYS = ("accuracy", "macro_f1", "rouge_l", "perplexity", "test_loss")
# The validation split's metrics (data.validation_fraction / validation_file), next to test's.
VALIDATION_KEYS = ("val_accuracy", "val_macro_f1", "val_rouge_l", "val_perplexity", "val_loss")
QUALITY_KEYS = TEST_KEYS + VALIDATION_KEYS


def lower_is_better(key: str) -> bool:
    return key.endswith(("loss", "perplexity"))


@dataclass
class RunView:
    """What the report needs of a finished or partial run directory."""

    path: Path
    label: str
    metrics: list[dict]

    @property
    def evaluated(self) -> list[dict]:
        return [m for m in self.metrics if any(k in m for k in QUALITY_KEYS)]

    def final(self, key: str) -> float | None:
        rows = [m[key] for m in self.evaluated if key in m]
        return rows[-1] if rows else None

    def best(self, key: str) -> float | None:
        rows = [m[key] for m in self.evaluated if key in m]
        if not rows:
            return None
        return min(rows) if lower_is_better(key) else max(rows)


def read_run(path: Path) -> RunView:
    metrics_file = path / "metrics.jsonl"
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{path} is not a run directory (no metrics.jsonl)")
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    label = path.name
    config_file = path / "config.toml"
    if config_file.is_file():
        config = tomllib.loads(config_file.read_text())
        label = f"{path.name} ({config.get('method', {}).get('name', '?')})"
    return RunView(path, label, metrics)


def quality_keys(runs: list[RunView], keys: tuple[str, ...] = QUALITY_KEYS) -> list[str]:
    present = {k for run in runs for m in run.evaluated for k in m}
    return [k for k in keys if k in present]


def markdown_table(runs: list[RunView]) -> str:
    keys = quality_keys(runs)
    header = ["run", "rounds", *[f"final {k}" for k in keys], *[f"best {k}" for k in keys], "bytes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        cells = [run.label, str(len(run.metrics))]
        cells += [_fmt(run.final(k)) for k in keys] + [_fmt(run.best(k)) for k in keys]
        cells.append(human_bytes(run.metrics[-1]["cumulative_bytes"]) if run.metrics else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def plot_runs(runs: list[RunView], directory: Path) -> list[Path]:
    """Per quality metric: metric vs round and metric vs cumulative bytes (all runs overlaid)."""
    written = []
    for key in quality_keys(runs, TEST_KEYS):  # val_* are in the tables (plots: issue 17)
        for x_key, x_label, name in (
            ("round", "round", f"{key}_vs_round.png"),
            ("cumulative_bytes", "cumulative bytes on the wire", f"{key}_vs_bytes.png"),
        ):
            figure, axis = plt.subplots(figsize=(6, 4))
            for run in runs:
                rows = [m for m in run.evaluated if key in m]
                axis.plot(
                    [m[x_key] for m in rows], [m[key] for m in rows], marker="o", label=run.label
                )
            axis.set_xlabel(x_label)
            axis.set_ylabel(key)
            if x_key == "cumulative_bytes":
                axis.set_xscale("symlog")
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)
            figure.tight_layout()
            figure.savefig(directory / name, dpi=110)
            plt.close(figure)
            written.append(directory / name)
    return written


def compare(paths: list[Path], out: Path) -> str:
    runs = [read_run(p) for p in paths]
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(runs)
    images = plot_runs(runs, out)
    body = ["# Comparison", "", table, ""] + [f"![{p.stem}]({p.name})" for p in images]
    (out / "comparison.md").write_text("\n".join(body) + "\n")
    return table


def plot_mean_bands(
    arms: dict[str, list[RunView]], key: str, path: Path, title: str = ""
) -> Path | None:
    """Several seeds per arm: ``key`` vs round and vs cumulative bytes, the mean over seeds as a
    line and ±1 standard deviation as a band (rounds every seed evaluated)."""
    figure, (by_round, by_bytes) = plt.subplots(1, 2, figsize=(11, 4))
    drawn = False
    for label, runs in arms.items():
        per_run = [{m["round"]: m for m in run.evaluated if key in m} for run in runs]
        rounds = sorted(set.intersection(*(set(rows) for rows in per_run))) if per_run else []
        if not rounds:
            continue
        values = np.array([[rows[r][key] for r in rounds] for rows in per_run])
        sent = np.array([[rows[r]["cumulative_bytes"] for r in rounds] for rows in per_run])
        mean, spread = values.mean(axis=0), values.std(axis=0)
        for axis, x in ((by_round, np.array(rounds)), (by_bytes, sent.mean(axis=0))):
            axis.plot(x, mean, marker="o", markersize=3, label=f"{label} (n={len(runs)})")
            axis.fill_between(x, mean - spread, mean + spread, alpha=0.2)
        drawn = True
    if not drawn:
        plt.close(figure)
        return None
    by_round.set_xlabel("round")
    by_bytes.set_xlabel("cumulative bytes on the wire")
    by_bytes.set_xscale("log")
    for axis in (by_round, by_bytes):
        axis.set_ylabel(key)
        axis.grid(alpha=0.3)
    by_round.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
