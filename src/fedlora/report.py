"""Tables and figures of runs, from their run directories: one run (its own directory), several
side by side (``fedlora report``), or a study's arms over seeds (``benchmarks/study.py``).

Every figure follows the same rules, so that a reader can compare at a glance:

- The x-axes mean equal cost. "round" only where every run has the same rounds with the same
  steps and examples in each; otherwise training examples seen (all clients together), the
  compute an arm spent. Next to it always bytes on the wire (MB/GB), where an arm sends any;
  on a logarithmic axis when the arms' totals span more than a decade.
- Round 0, the initial model before any training, is every curve's first point.
- A method has one colour in every figure (``METHOD_COLOURS``); the arms of one method differ by
  line style and marker (their variant).
- At most ``MAX_CURVES`` curves share a panel: more arms become small multiples, one row of
  panels per group (the arms' ``panel``, else their method), legends outside the axes.
- Curves are the mean over seeds with a ±1 sample standard deviation band; the final-metric
  chart (what a verdict rests on) is a dot per arm with ±1 std error bars, references marked.
- The caption says the machine-independent facts: seeds, n runs per arm, test examples.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from fedlora.channel import human_bytes

TEST_KEYS = (
    "accuracy",
    "macro_f1",
    "mc_accuracy",
    "mc_accuracy_norm",
    "exact_match",
    "f1",
    "rouge_l",
    "perplexity",
    "test_loss",
)
# The validation split's metrics (data.validation_fraction / validation_file), next to test's.
VALIDATION_KEYS = tuple(f"val_{key.removeprefix('test_')}" for key in TEST_KEYS)
QUALITY_KEYS = TEST_KEYS + VALIDATION_KEYS

MAX_CURVES = 8  # per panel: more arms become small multiples
# Arms whose total bytes span more than this factor get a logarithmic bytes axis: on a linear
# one the cheaper arms (LoRA next to full weights: 23x) would be squeezed against 0.
LOG_BYTES_SPAN = 10
# One colour per method in every figure of the project; the references in black and grey.
METHOD_COLOURS = {
    "centralized": "#000000",
    "local": "#7f7f7f",
    "fedit": "#1f77b4",
    "ffa": "#ff7f0e",
    "flexlora": "#2ca02c",
    "declora": "#d62728",
    "dlora": "#9467bd",
    "hetlora": "#8c564b",
    "fslora": "#e377c2",
    "fslora_code_compat": "#f7b6d2",
    "flora": "#bcbd22",
    "frlora": "#17becf",
    "fedex": "#000080",
    "rolora": "#008080",
    "lora_fair": "#800000",
    "fedsb": "#f032e6",
    "dwa": "#b8860b",
    "fedftg": "#6a3d9a",
    "fedftg_code_compat": "#cab2d6",
    "fedsa": "#a6cee3",
    "fedsvd": "#e6ab02",
    "fedrot": "#1b9e77",
    "ravan": "#66a61e",
    "feddpa": "#e7298a",
}
UNKNOWN_COLOUR = "#555555"  # a run whose config names no known method
# An arm's variant within its method: line style and marker, in order of first appearance.
STYLES = (
    ("-", "o"),
    ("--", "s"),
    (":", "^"),
    ("-.", "D"),
    ((0, (5, 1, 1, 1, 1, 1)), "v"),
    ((0, (1, 3)), "P"),
    ((0, (8, 2)), "X"),
    ((0, (3, 1, 1, 1)), "*"),
)
ROUND, EXAMPLES, BYTES = "round", "examples", "cumulative_bytes"
AXIS_LABELS = {
    ROUND: "round (0: the initial model)",
    EXAMPLES: "training examples seen, all clients",
    BYTES: "bytes on the wire, cumulative",
}


def lower_is_better(key: str) -> bool:
    return key.endswith(("loss", "perplexity"))


def method_colour(method: str) -> str:
    return METHOD_COLOURS.get(method, UNKNOWN_COLOUR)


@dataclass
class RunView:
    """What the report needs of a finished or partial run directory."""

    path: Path
    label: str
    metrics: list[dict]
    config: dict = field(default_factory=dict)  # the resolved config (config.toml), if known
    test_examples: int | None = None  # the test set's size, if known

    @property
    def method(self) -> str:
        return self.config.get("method", {}).get("name", "?")

    @property
    def seed(self) -> int | None:
        return self.config.get("experiment", {}).get("seed")

    @property
    def rounds(self) -> list[dict]:
        """The trained rounds' records: without round 0, the initial model's evaluation."""
        return [m for m in self.metrics if m["round"] > 0]

    @property
    def evaluated(self) -> list[dict]:
        """The trained rounds that were evaluated (what final, best and plateaus look at)."""
        return [m for m in self.rounds if any(k in m for k in QUALITY_KEYS)]

    def curve(self, key: str) -> list[dict]:
        """Every record with ``key``, round 0 (the initial model) first where recorded."""
        return [m for m in self.metrics if key in m]

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
    label, config = path.name, {}
    config_file = path / "config.toml"
    if config_file.is_file():
        config = resolved(tomllib.loads(config_file.read_text()))
        label = f"{path.name} ({config.get('method', {}).get('name', '?')})"
    return RunView(path, label, metrics, config, stated_test_examples(path))


def resolved(config: dict) -> dict:
    """A run's saved config with the defaults of the settings added since it was saved, so that
    runs made by two fedlora versions compare equal where their settings are; as saved if it no
    longer validates (a setting since removed)."""
    from fedlora.config import ConfigError, config_from_dict

    try:
        return config_from_dict(config).model_dump(mode="json", exclude_none=True)
    except ConfigError:
        return config


def stated_test_examples(path: Path) -> int | None:
    """The test set's size as the run's summary.md states it (None before it finished)."""
    summary = path / "summary.md"
    found = re.search(r"(\d+) test \(", summary.read_text()) if summary.is_file() else None
    return int(found.group(1)) if found else None


def quality_keys(runs: list[RunView], keys: tuple[str, ...] = QUALITY_KEYS) -> list[str]:
    present = {k for run in runs for m in run.evaluated for k in m}
    return [k for k in keys if k in present]


def markdown_table(runs: list[RunView]) -> str:
    keys = quality_keys(runs)
    header = ["run", "rounds", *[f"final {k}" for k in keys], *[f"best {k}" for k in keys], "bytes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        cells = [run.label, str(len(run.rounds))]
        cells += [_fmt(run.final(k)) for k in keys] + [_fmt(run.best(k)) for k in keys]
        cells.append(human_bytes(run.metrics[-1]["cumulative_bytes"]) if run.metrics else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


# -- lm-evaluation-harness results (``fedlora.harness``) --------------------------------------
LM_EVAL = "lm_eval"  # the run directory's folder of ``<adapter>.json`` files
LM_EVAL_SECTION = "## lm-evaluation-harness"


def lm_eval_records(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run / LM_EVAL).glob("*.json"))]


def lm_eval_rows(entry: dict) -> list[list[str]]:
    """One row per task (or group) and metric of one ``lm_eval/<adapter>.json``: adapter,
    task, metric (with its filter when not lm-eval's ``none``), value, stderr, items."""
    rows = []
    for task, metrics in entry["results"].items():
        items = entry["n-samples"].get(task, {}).get("effective")
        for key, value in metrics.items():
            metric, _, kind = key.partition(",")
            if not kind or metric.endswith("_stderr") or not isinstance(value, int | float):
                continue
            stderr = metrics.get(f"{metric}_stderr,{kind}")
            name = metric if kind == "none" else f"{metric} ({kind})"
            spread = _fmt(stderr) if isinstance(stderr, int | float) else "-"
            count = "-" if items is None else str(items)
            rows.append([entry["adapter"], task, name, _fmt(value), spread, count])
    return rows


def lm_eval_table(runs: list[tuple[str, Path]]) -> str | None:
    """The lm-eval results of runs (label, run directory) as a Markdown table, with a run
    column when there are several; None when none has any."""
    rows = [
        [label, *row]
        for label, path in runs
        for entry in lm_eval_records(path)
        for row in lm_eval_rows(entry)
    ]
    if not rows:
        return None
    header = ["run", "adapter", "task", "metric", "value", "stderr", "items"]
    if len(runs) == 1:
        header, rows = header[1:], [row[1:] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


# -- arms: one curve each ---------------------------------------------------------------------
@dataclass(frozen=True)
class ArmView:
    """One arm of a figure: its runs (one per seed), and how it is drawn."""

    label: str
    runs: tuple[RunView, ...]
    variant: str = ""  # its line style among its method's arms (default: the label)
    panel: str = ""  # its group of small multiples (default: by method, when there are many)
    reference: bool = False  # marked in the final-metric chart

    @property
    def method(self) -> str:
        return self.runs[0].method

    @property
    def style_key(self) -> str:
        return self.variant or self.label

    def legend(self) -> str:
        return f"{self.label} (n={len(self.runs)})"

    def sent_bytes(self) -> bool:
        return any(run.metrics and run.metrics[-1]["cumulative_bytes"] > 0 for run in self.runs)


def arms_of(runs: list[RunView]) -> list[ArmView]:
    """Runs whose configs differ only in the seed (and the experiment's name) as one arm each,
    in the order given: ``fedlora report`` over several seeds of several configs draws what a
    study draws."""
    groups: dict[str, list[RunView]] = {}
    for run in runs:
        groups.setdefault(_arm_key(run), []).append(run)
    members = list(groups.values())
    names = short_names([_arm_place(group) for group in members])
    return [
        ArmView(
            name if group[0].method in name.split("/") else f"{name} ({group[0].method})",
            tuple(group),
        )
        for name, group in zip(names, members, strict=True)
    ]


def _arm_key(run: RunView) -> str:
    if not run.config:
        return str(run.path)  # nothing to compare: its own arm
    experiment = {
        k: v for k, v in run.config.get("experiment", {}).items() if k not in ("seed", "name")
    }
    return json.dumps({**run.config, "experiment": experiment}, sort_keys=True, default=str)


def _arm_place(runs: list[RunView]) -> Path:
    """Where an arm's runs are: one run's directory, or the one directory holding its seeds
    (``arm/seed<k>``; else the first run's)."""
    parents = {run.path.parent for run in runs}
    return parents.pop() if len(runs) > 1 and len(parents) == 1 else runs[0].path


def short_names(places: list[Path]) -> list[str]:
    """Each path's shortest ending that no other path shares (``ffa/seed0`` next to
    ``central/seed0``, ``fedit`` alone)."""

    def ending(path: Path, depth: int) -> str:
        return "/".join(path.parts[-depth:])

    names = []
    for i, place in enumerate(places):
        others = places[:i] + places[i + 1 :]
        depths = range(1, len(place.parts) + 1)
        depth = next(
            (d for d in depths if all(ending(o, d) != ending(place, d) for o in others)),
            len(place.parts),
        )
        names.append(ending(place, depth))
    return names


@dataclass(frozen=True)
class Curve:
    """An arm's mean over seeds at the rounds every seed evaluated."""

    x: np.ndarray
    mean: np.ndarray
    spread: np.ndarray  # sample standard deviation over seeds (0 for one seed)


def cumulative(run: RunView, x_key: str) -> dict[int, float]:
    """Per round, the run's position on the x-axis ``x_key``."""
    if x_key == EXAMPLES:
        seen = np.cumsum([m.get("examples", 0) for m in run.metrics])
        return {m["round"]: float(s) for m, s in zip(run.metrics, seen, strict=True)}
    return {m["round"]: float(m[x_key]) for m in run.metrics}


def arm_curve(arm: ArmView, key: str, x_key: str) -> Curve | None:
    per_run = [{m["round"]: m[key] for m in run.curve(key)} for run in arm.runs]
    rounds = sorted(set.intersection(*(set(rows) for rows in per_run)))
    if not rounds:
        return None
    values = np.array([[rows[r] for r in rounds] for rows in per_run])
    positions = [cumulative(run, x_key) for run in arm.runs]
    x = np.array([[p[r] for r in rounds] for p in positions]).mean(axis=0)
    spread = values.std(axis=0, ddof=1) if len(per_run) > 1 else np.zeros(len(rounds))
    return Curve(x, values.mean(axis=0), spread)


def progress_axis(arms: list[ArmView]) -> str:
    """Rounds where every run has the same rounds with the same steps and examples in each (a
    round then costs the same everywhere); else training examples seen."""
    schedules = {
        tuple((m["round"], m.get("steps"), m.get("examples")) for m in run.metrics)
        for arm in arms
        for run in arm.runs
    }
    return ROUND if len(schedules) == 1 else EXAMPLES


def panels(arms: list[ArmView]) -> list[tuple[str, list[ArmView]]]:
    """The arms by ``panel`` (in order of first appearance); without panels, all together or,
    beyond ``MAX_CURVES``, one group per method. A group still above ``MAX_CURVES`` is cut
    into consecutive panels of at most that many."""
    named = any(arm.panel for arm in arms)
    groups: dict[str, list[ArmView]] = {}
    for arm in arms:
        key = arm.panel if named else ("" if len(arms) <= MAX_CURVES else arm.method)
        groups.setdefault(key, []).append(arm)
    cut = []
    for name, members in groups.items():
        parts = [members[i : i + MAX_CURVES] for i in range(0, len(members), MAX_CURVES)]
        for i, part in enumerate(parts):
            cut.append((f"{name} ({i + 1}/{len(parts)})" if len(parts) > 1 else name, part))
    return cut


def styles(arms: list[ArmView]) -> dict[str, tuple[object, str]]:
    """Each arm's (line style, marker): its variant's place among its method's variants."""
    seen: dict[str, list[str]] = {}
    chosen = {}
    for arm in arms:
        variants = seen.setdefault(arm.method, [])
        if arm.style_key not in variants:
            variants.append(arm.style_key)
        chosen[arm.label] = STYLES[variants.index(arm.style_key) % len(STYLES)]
    return chosen


# -- the figures ------------------------------------------------------------------------------
def curves_figure(arms: list[ArmView], key: str, title: str = "") -> Figure | None:
    """``key`` over training (see the module docstring), one row of panels per group: against
    the progress axis, and against bytes where some arm sends any. None without a curve."""
    drawn = [arm for arm in arms if arm.runs and arm_curve(arm, key, ROUND) is not None]
    if not drawn:
        return None
    x_keys = [progress_axis(drawn)] + ([BYTES] if any(a.sent_bytes() for a in drawn) else [])
    rows = panels(drawn)
    figure, grid = plt.subplots(
        len(rows),
        len(x_keys),
        figsize=(5.0 * len(x_keys), 3.0 * len(rows) + 0.8),
        sharey=True,
        squeeze=False,
    )
    style = styles(drawn)
    log_from = log_bytes_threshold(drawn)
    for row, (name, group) in enumerate(rows):
        for column, x_key in enumerate(x_keys):
            axis = grid[row, column]
            for arm in group:
                if x_key != BYTES or arm.sent_bytes():
                    _draw_curve(axis, arm, key, x_key, style[arm.label])
            _label_axis(axis, x_key, key if column == 0 else "", name, log_from)
        handles, labels = grid[row, 0].get_legend_handles_labels()  # every arm of the row
        grid[row, -1].legend(
            handles, labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False
        )
    silent = [arm.label for arm in drawn if not arm.sent_bytes()]
    notes = ["Lines: mean over seeds at the rounds every seed evaluated; band: ±1 sample std."]
    if BYTES in x_keys and silent:
        notes.append(f"Not on the bytes axes (they send nothing): {', '.join(silent)}.")
    _finish(figure, title or key, [caption(drawn), *notes])
    return figure


def log_bytes_threshold(arms: list[ArmView]) -> float | None:
    """Where a symmetric-log bytes axis turns logarithmic (the smallest positive cumulative
    bytes of any run, so round 0's zero stays on the axis), when the sending runs' totals span
    more than ``LOG_BYTES_SPAN``; None: a linear axis."""
    runs = [run for arm in arms for run in arm.runs if run.metrics]
    totals = [run.metrics[-1]["cumulative_bytes"] for run in runs]
    totals = [total for total in totals if total > 0]
    if not totals or max(totals) <= LOG_BYTES_SPAN * min(totals):
        return None
    return min(
        m["cumulative_bytes"] for run in runs for m in run.metrics if m["cumulative_bytes"] > 0
    )


def _draw_curve(axis: Axes, arm: ArmView, key: str, x_key: str, style: tuple[object, str]) -> None:
    curve = arm_curve(arm, key, x_key)
    assert curve is not None  # drawn arms have one
    colour = method_colour(arm.method)
    linestyle, marker = style
    axis.plot(
        curve.x,
        curve.mean,
        color=colour,
        linestyle=linestyle,
        marker=marker,
        markersize=4,
        label=arm.legend(),
    )
    if curve.spread.any():
        band = (curve.mean - curve.spread, curve.mean + curve.spread)
        axis.fill_between(curve.x, *band, color=colour, alpha=0.12, linewidth=0)


def _label_axis(axis: Axes, x_key: str, y_label: str, panel: str, log_from: float | None) -> None:
    log = x_key == BYTES and log_from is not None
    axis.set_xlabel(AXIS_LABELS[x_key] + (" (log scale)" if log else ""))
    if y_label:
        better = "lower" if lower_is_better(y_label) else "higher"
        axis.set_ylabel(f"{y_label} ({better} is better)")
    if panel:
        axis.set_title(panel, fontsize=10)
    if x_key == BYTES:
        if log:
            axis.set_xscale("symlog", linthresh=log_from)
        else:
            axis.xaxis.set_major_locator(MaxNLocator(5))
        axis.xaxis.set_major_formatter(bytes_formatter(log_from if log else 0.0))
    else:  # at most 6 bins: every round of a short run, yet thousands of examples legible
        axis.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    axis.grid(alpha=0.3)


def bytes_formatter(unlabelled_below: float) -> FuncFormatter:
    """Ticks in MB/GB; those in (0, ``unlabelled_below``), the linear stretch next to 0 of a
    symmetric-log axis where they would crowd the 0, carry no label."""
    return FuncFormatter(
        lambda value, _: "" if 0 < value < unlabelled_below else human_bytes(value)
    )


def finals_figure(arms: list[ArmView], key: str, title: str = "") -> Figure | None:
    """The final ``key`` per arm: mean over seeds with ±1 sample std error bars, one row per
    arm in panel order; a reference arm is named so and its mean drawn as a dashed line across
    its group. None without a final value."""
    drawn = [arm for arm in arms if _finals(arm, key)]
    if not drawn:
        return None
    rows = panels(drawn)
    count = len(drawn) + len(rows) - 1  # a blank row between groups
    figure, axis = plt.subplots(figsize=(7.5, 0.35 * count + 1.6))
    style = styles(drawn)
    y, ticks, names = 0.0, [], []
    for _, group in rows:
        top = y
        for arm in group:
            values = _finals(arm, key)
            spread = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            colour = method_colour(arm.method)
            axis.errorbar(
                float(np.mean(values)),
                y,
                xerr=spread,
                fmt=style[arm.label][1],
                color=colour,
                capsize=3,
                label=arm.legend(),
            )
            ticks.append(y)
            names.append(arm.legend() + ("  [reference]" if arm.reference else ""))
            y += 1
        for arm in (a for a in group if a.reference):
            mean = float(np.mean(_finals(arm, key)))
            axis.vlines(mean, top - 0.4, y - 0.6, colors=method_colour(arm.method), linestyles="--")
        y += 1
    axis.set_yticks(ticks, names, fontsize=8)
    axis.invert_yaxis()
    better = "lower" if lower_is_better(key) else "higher"
    axis.set_xlabel(f"final {key} ({better} is better)")
    axis.grid(axis="x", alpha=0.3)
    notes = ["Dot: mean over seeds of the last evaluation; bars: ±1 sample std."]
    if any(arm.reference for arm in drawn):
        notes.append("Dashed line: the reference arm's mean, across its group.")
    _finish(figure, title or f"final {key}", [caption(drawn), *notes])
    return figure


VERDICT_COLOURS = {
    "reproduced": "#1b9e77",
    "not reproduced": "#d95f02",
    "inconclusive": "#7570b3",
    "void": "#999999",
}


@dataclass(frozen=True)
class ClaimEffect:
    """One claim's effect as the effects figure draws it (``benchmarks/study.py`` makes them)."""

    claim: str
    effect: float  # arm − reference on the final metric, positive = the arm is better
    low: float  # the 95% interval
    high: float
    margin: float
    kind: str  # "better" or "within"
    verdict: str
    statistics: str  # "paired, 5 seeds" or "unpaired (Welch), 6 runs"


def effects_figure(effects: list[ClaimEffect], title: str = "") -> Figure | None:
    """Each claim's effect with its 95% interval, one row per claim, against what the claim
    needs: the margin a ``better`` claim must clear (a tick) or the ±margin band a ``within``
    claim must stay inside (shaded). Coloured by verdict. None without an effect."""
    if not effects:
        return None
    figure, axis = plt.subplots(figsize=(7.5, 0.45 * len(effects) + 1.6))
    axis.axvline(0.0, color="#333333", linewidth=0.8)
    for y, claim in enumerate(effects):
        colour = VERDICT_COLOURS.get(claim.verdict, UNKNOWN_COLOUR)
        if claim.kind == "within":
            axis.fill_betweenx([y - 0.35, y + 0.35], -claim.margin, claim.margin, color="#dddddd")
        else:
            axis.vlines(claim.margin, y - 0.35, y + 0.35, colors="#333333", linestyles=":")
        errors = [[claim.effect - claim.low], [claim.high - claim.effect]]
        axis.errorbar(claim.effect, y, xerr=errors, fmt="o", color=colour, capsize=3)
    names = [f"{c.claim}\n{c.verdict} ({c.statistics})" for c in effects]
    axis.set_yticks(range(len(effects)), names, fontsize=7.5)
    axis.invert_yaxis()
    axis.set_xlabel("effect: arm − reference, final metric (positive = the arm is better)")
    axis.grid(axis="x", alpha=0.3)
    notes = [
        "Dot: the effect (mean per-seed difference where paired, else the difference of means);"
        " bars: its 95% t interval.",
        "Dotted tick: the margin a 'better' claim must clear; shaded: the ±margin band a "
        "'within' claim must stay inside.",
    ]
    _finish(figure, title or "claims", notes)
    return figure


def _finals(arm: ArmView, key: str) -> list[float]:
    return [v for run in arm.runs if (v := run.final(key)) is not None]


def caption(arms: list[ArmView]) -> str:
    """Seeds, n per arm and the test set's size, as far as the runs say."""
    seeds = sorted({run.seed for arm in arms for run in arm.runs if run.seed is not None})
    counts = sorted({len(arm.runs) for arm in arms})
    n = f"n = {counts[0]}" if len(counts) == 1 else f"n = {counts[0]} to {counts[-1]}"
    n += " run per arm" if counts == [1] else " runs per arm"
    parts = [f"Seeds {', '.join(map(str, seeds))}; {n}" if seeds else n]
    sizes = sorted({s for arm in arms for run in arm.runs if (s := run.test_examples)})
    if sizes:
        parts.append(f"test examples: {', '.join(map(str, sizes))}")
    return "; ".join(parts) + "."


def _finish(figure: Figure, title: str, notes: list[str]) -> None:
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    # Below the figure: ``save`` writes the tight box around everything, the caption included.
    figure.text(0.01, 0.0, "\n".join(notes), fontsize=7.5, va="top")


def save(figure: Figure, path: Path) -> Path:
    """Written (legends and caption outside the axes included) and closed."""
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def write_figures(arms: list[ArmView], key: str, stem: Path, title: str = "") -> list[Path]:
    """``<stem>.png`` (curves) and ``<stem>_final.png`` (final values), those there is data for."""
    written = []
    for draw, suffix in ((curves_figure, ""), (finals_figure, "_final")):
        figure = draw(arms, key, title)
        if figure is not None:
            written.append(save(figure, stem.with_name(stem.name + suffix + ".png")))
    return written


def plot_run(run: RunView, directory: Path) -> list[Path]:
    """A run directory's own figures: ``<metric>.png`` per quality metric it evaluated."""
    arm = [ArmView(run.label, (run,))]
    written = []
    for key in quality_keys([run]):
        figure = curves_figure(arm, key, f"{key}: {run.label}")
        if figure is not None:
            written.append(save(figure, directory / f"{key}.png"))
    return written


def compare(paths: list[Path], out: Path) -> str:
    """``fedlora report``: the runs' table and, per quality metric, the figures a study gets
    (runs differing only in the seed are one arm's seeds)."""
    runs = [read_run(p) for p in paths]
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(runs)
    arms = arms_of(runs)
    images = []
    for key in quality_keys(runs):
        labels = [arm.label for arm in arms]
        title = f"{key}: " + (" vs ".join(labels) if len(labels) <= 4 else f"{len(labels)} arms")
        images += write_figures(arms, key, out / key, title)
    lm_eval = lm_eval_table([(run.label, run.path) for run in runs])
    if lm_eval:
        table += f"\n\n{LM_EVAL_SECTION}\n\n{lm_eval}"
    body = ["# Comparison", "", table, ""] + [f"![{p.stem}]({p.name})" for p in images]
    (out / "comparison.md").write_text("\n".join(body) + "\n")
    return table
