"""Final accuracy against ε for a study of methods under DP-SGD (issue 13): one line per method,
the mean over seeds with ±1 std error bars, ε = ∞ for the runs without a privacy mechanism.

Reads the finished runs of ``runs/studies/<study>/*/seed*`` (their config.toml says the method
and the target ε; their metrics the final accuracy and the ε spent), prints a Markdown table and
writes ``docs/figures/<study>_eps.png``.

    python -P benchmarks/dp_figure.py [--study dp_ffa_vs_fedit] [--metric accuracy]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tomllib
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fedlora.report import read_run

REPO = Path(__file__).resolve().parents[1]


def collect(study: str, metric: str) -> dict[str, dict[float, list[tuple[float, float]]]]:
    """method -> target ε -> [(final metric, ε spent)] over the finished seeds."""
    found: dict[str, dict[float, list[tuple[float, float]]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for run in sorted((REPO / "runs" / "studies" / study).glob("*/seed*")):
        if not (run / "summary.md").is_file():
            continue
        config = tomllib.loads((run / "config.toml").read_text())
        target = config.get("privacy", {}).get("target_epsilon", math.inf)
        view = read_run(run)
        spent = view.metrics[-1].get("epsilon", math.inf)
        found[config["method"]["name"]][target].append((view.final(metric), spent))
    return found


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="dp_ffa_vs_fedit")
    parser.add_argument("--metric", default="accuracy")
    args = parser.parse_args()
    found = collect(args.study, args.metric)
    targets = sorted({t for per_method in found.values() for t in per_method})
    label = {t: "∞ (no DP)" if math.isinf(t) else f"{t:g}" for t in targets}
    print(f"| method | ε (target) | seeds | final {args.metric} | ε spent | change vs no DP |")
    print("|---|---|---|---|---|---|")
    figure, axis = plt.subplots(figsize=(6, 4))
    for method, per_target in sorted(found.items()):
        reference = (
            spread([m for m, _ in per_target[math.inf]])[0] if math.inf in per_target else None
        )
        means, errors, positions = [], [], []
        for position, target in enumerate(targets):
            if target not in per_target:
                continue
            values = [m for m, _ in per_target[target]]
            mean, std = spread(values)
            spent = max(e for _, e in per_target[target])
            change = f"{mean - reference:+.3f}" if reference is not None else "-"
            print(
                f"| {method} | {label[target]} | {len(values)} | {mean:.3f} ± {std:.3f} | "
                f"{'-' if math.isinf(spent) else f'{spent:.3f}'} | {change} |"
            )
            means.append(mean)
            errors.append(std)
            positions.append(position)
        axis.errorbar(positions, means, yerr=errors, marker="o", capsize=3, label=method)
    axis.set_xticks(range(len(targets)), [label[t] for t in targets])
    axis.set_xlabel("target ε of the run's largest client (δ as the study sets it)")
    axis.set_ylabel(f"final {args.metric}")
    axis.grid(alpha=0.3)
    axis.legend()
    axis.set_title(f"{args.study}: mean ± std over seeds")
    figure.tight_layout()
    path = REPO / "docs" / "figures" / f"{args.study}_eps.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    print(f"written: {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
