"""Run a reproduction study (several arms x several seeds) and tabulate it as mean ± std.

A study file (``benchmarks/studies/*.toml``) names the arms: each is a config plus
``--set`` overrides; ``set`` at the top level applies to every arm (the sizing that makes the
study fit this machine). Every run is a plain ``fedlora run`` in its own process with one torch
thread, ``--jobs`` at a time, under ``runs/studies/<study>/<arm>/seed<k>``. A finished run (its
``summary.md`` exists) is skipped and an interrupted one continues with ``--resume``, so the
command can be repeated until the study is complete. An arm with ``from_study`` reuses the runs
of an arm of another study (``from_arm``, default the same label; same config and overrides).
Then it writes the table (``runs/studies/<study>/results.md``, also printed) and two figures of
the first quality metric (``fedlora.report`` states their rules): ``docs/figures/<study>.png``,
its curves from round 0 (the initial model) against an equal-cost axis (rounds only where every
arm runs the same rounds and steps, else training examples seen) and against bytes on the wire,
mean over seeds with a ±1 std band; and ``docs/figures/<study>_final.png``, the final value per
arm, mean ± 1 std, the reference arms marked. The study's optional ``title`` heads both. An arm
may give a ``group`` (its panel: more than 8 arms need groups, e.g. one per rank, else they are
grouped by method), a ``variant`` (its line style among its method's arms, the same in every
group, e.g. "ring K=1"; default its label) and ``reference = true``; the claims' references
are references too.

Grids. An arm may give a list of values for any config key, ``grid = { "train.lr" = [1e-3,
2e-3, 5e-3] }`` (several keys: every combination). The grid is run first, on the study's
``[selection]`` budget: its ``set`` (overrides for the grid runs only, e.g.
``["experiment.rounds=4"]``; default none, the full budget) and its ``seeds`` (default: the first
seed). Each grid point is scored by the mean over those seeds of its final ``selection.metric``
(default ``val_`` + the study's first metric; it must be a validation metric, so every grid arm
needs ``data.validation_fraction`` > 0 or a ``data.validation_file``, else the study is refused);
the best point (ties: the first listed) is the arm's choice, and all seeds then run at it. A best
point at the smallest or largest value of a numeric key has not found the arm's optimum: the key
gets one more value past that edge, by the grid's own ratio (2e-3 after [1e-3, 2e-3] gives 4e-3),
and the selection runs again, at most twice (``MAX_EDGE_STEPS``). The table shows the chosen value
per arm (flagged when its grid was extended, or is still at an edge), and a second table every
point's score, the added points marked. Runs live under ``<arm>/grid/<point>/seed<k>`` (grid) and
``<arm>/<point>/seed<k>`` (chosen); without a selection budget the grid runs at the chosen point
are the final runs of their seeds.

Seeds. A study's ``seeds`` default to five, 0-4 (``DEFAULT_SEEDS``): with three, a paired
t-test's 95% interval is 4.3 standard errors wide.

Plateau, trained and verdicts (``fedlora.convergence`` states the three rules). Per arm, the
``plateau`` column says whether every seed's plateau metric (``[plateau] metric``, default the
validation counterpart of the first metric where the runs have one, else the first metric;
``tolerance`` default 0.005) stopped improving (the mean of the last third of its evaluations
against the third before, with their standard errors), and "did not train" where a seed's final
first metric (and macro-F1, where recorded) does not beat its round-0 value and the
majority-class level (from the clients' label counts in summary.md) by a point. ``[[claims]]``
(``claim``, ``arm``, ``reference``, ``kind`` = "better" or "within", ``margin``, optional
``metric``, ``paired``) become a verdict table: reproduced / not reproduced / inconclusive /
void, with the effect, its 95% interval, the t-test's p-value and which statistics were used.
The effect is paired by seed where both arms ran the same seeds on the same data and partition
sections (set ``paired = false`` where the arms' layouts differ although their configs agree,
e.g. centralized against federated), else Welch's unpaired difference. A verdict is
inconclusive whenever an arm it rests on has not plateaued, and void when one did not train.
The study's third figure, ``docs/figures/<study>_effects.png``, draws each claim's effect with
its interval against the margin.

    python -P benchmarks/study.py benchmarks/studies/ffa_vs_fedit.toml [MORE.toml ...] [--jobs 2]
    python -P benchmarks/study.py STUDY --report-only

Several study processes may work through the same list at once (each run is claimed by one).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import tomli_w

from fedlora.channel import human_bytes
from fedlora.config import ConfigError, load_config
from fedlora.convergence import (
    PLATEAU_TOLERANCE,
    ClaimKind,
    Effect,
    Verdict,
    majority_levels,
    paired_effect,
    plateaued,
    trained,
    unpaired_effect,
    verdict,
)
from fedlora.report import (
    ArmView,
    ClaimEffect,
    RunView,
    effects_figure,
    lower_is_better,
    read_run,
    save,
    write_figures,
)

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "runs" / "studies"


DEFAULT_SEEDS = (0, 1, 2, 3, 4)  # a claim study's seeds unless its file says


class StudyError(ValueError):
    """A study file that cannot be run as written: one message, exit 2."""


Point = tuple[str, ...]  # one grid point: its ``key=value`` overrides
Grid = tuple[tuple[str, tuple[Any, ...]], ...]  # (key, values) to select among
MAX_EDGE_STEPS = 2  # values a grid may gain beyond its edges (``extended_grid``)


@dataclass(frozen=True)
class Arm:
    label: str
    config: Path
    overrides: tuple[str, ...]
    from_study: str | None = None  # the same arm's runs, already made by another study
    from_arm: str | None = None  # the arm's label in that study (default: the same label)
    grid: Grid = ()  # (key, values) to select among
    group: str = ""  # its panel in the figures
    variant: str = ""  # its line style among its method's arms (default: the label)
    reference: bool = False  # marked in the final-value figure

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", (self.from_arm or self.label).lower()).strip("-")

    def points(self, grid: Grid | None = None) -> list[Point]:
        """Every combination of the grid's values (``grid``: the arm's grid as extended at its
        edges, default as written), in the order listed (one empty point without a grid)."""
        grid = self.grid if grid is None else grid
        keys = [key for key, _ in grid]
        combos = itertools.product(*(values for _, values in grid))
        return [
            tuple(f"{k}={toml_value(v)}" for k, v in zip(keys, combo, strict=True))
            for combo in combos
        ]


def toml_value(value: Any) -> str:
    """``value`` as ``--set`` reads it back (TOML), e.g. 0.001, "adamw", ['query']."""
    return tomli_w.dumps({"v": value}).strip().removeprefix("v = ")


def point_slug(point: Point) -> str:
    return ",".join(re.sub(r"[^A-Za-z0-9.=_-]+", "_", override) for override in point)


@dataclass(frozen=True)
class Selection:
    """How grids are chosen: on which seeds and budget, by which validation metric."""

    metric: str
    seeds: tuple[int, ...]
    overrides: tuple[str, ...]  # the grid runs' budget (empty: the full one)


@dataclass(frozen=True)
class Claim:
    claim: str
    arm: str
    reference: str
    kind: ClaimKind  # "better" or "within" (fedlora.convergence)
    margin: float
    metric: str
    paired: bool = True  # False: the arms' layouts differ (centralized vs federated)


@dataclass(frozen=True)
class Study:
    name: str
    seeds: tuple[int, ...]
    metrics: tuple[str, ...]  # quality metrics; the first is plotted
    extra: tuple[str, ...]  # more columns: last metrics row or accounting.json keys
    arms: tuple[Arm, ...]
    selection: Selection
    plateau_metric: str | None = None  # None: val_<first metric> where present, else it
    plateau_tolerance: float = PLATEAU_TOLERANCE
    claims: tuple[Claim, ...] = ()
    root: Path = RUNS  # where every study's runs live
    title: str = ""  # what the figures compare (default: the name)

    @property
    def directory(self) -> Path:
        return self.root / self.name

    def run_dir(self, arm: Arm, seed: int, point: Point = ()) -> Path:
        """The arm's run of ``seed`` at grid point ``point`` (the arm's own dir without a grid)."""
        base = self.root / (arm.from_study or self.name) / arm.slug
        return (base / point_slug(point) if point else base) / f"seed{seed}"

    def grid_dir(self, arm: Arm, seed: int, point: Point) -> Path:
        """A selection run: the final run's dir when the selection keeps the full budget."""
        if not self.selection.overrides:
            return self.run_dir(arm, seed, point)
        base = self.root / (arm.from_study or self.name) / arm.slug / "grid"
        return base / point_slug(point) / f"seed{seed}"


def load_study(path: Path, root: Path = RUNS) -> Study:
    """The study file, every arm's config (and grid point) validated before anything runs."""
    data = tomllib.loads(path.read_text())
    common = tuple(data.get("set", []))
    arms = tuple(
        Arm(
            arm["label"],
            REPO / arm["config"],
            common + tuple(arm.get("set", [])),
            arm.get("from_study"),
            arm.get("from_arm"),
            parse_grid(arm.get("grid", {}), arm["label"]),
            arm.get("group", ""),
            arm.get("variant", ""),
            bool(arm.get("reference", False)),
        )
        for arm in data["arms"]
    )
    metrics = tuple(data.get("metrics", ["accuracy", "macro_f1"]))
    seeds = tuple(data.get("seeds", DEFAULT_SEEDS))
    chosen = data.get("selection", {})
    selection = Selection(
        chosen.get("metric", f"val_{metrics[0]}"),
        tuple(chosen.get("seeds", seeds[:1])),
        tuple(chosen.get("set", [])),
    )
    plateau = data.get("plateau", {})
    labels = {arm.label for arm in arms}
    claims = []
    for c in data.get("claims", []):
        kind = c.get("kind", "better")
        if {c["arm"], c["reference"]} - labels or kind not in ("better", "within"):
            raise StudyError(
                f"{path}: claim {c['claim']!r}: arm and reference must be arm labels "
                f"({', '.join(sorted(labels))}) and kind 'better' or 'within'"
            )
        margin, metric = float(c.get("margin", 0.0)), c.get("metric", metrics[0])
        paired = bool(c.get("paired", True))
        claims.append(
            Claim(
                c["claim"], c["arm"], c["reference"], cast(ClaimKind, kind), margin, metric, paired
            )
        )
    study = Study(
        data["name"],
        seeds,
        metrics,
        tuple(data.get("extra", [])),
        arms,
        selection,
        plateau.get("metric"),
        float(plateau.get("tolerance", PLATEAU_TOLERANCE)),
        tuple(claims),
        root,
        data.get("title", ""),
    )
    check_grids(study, path)
    return study


def parse_grid(grid: dict[str, Any], label: str) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise StudyError(f"arm {label!r}: grid {key!r} must be a non-empty list of values")
    return tuple((key, tuple(values)) for key, values in grid.items())


def check_grids(study: Study, path: Path) -> None:
    """Every arm's config at every grid point loads; a grid selects by a validation metric of
    a run that has a validation split, never by test."""
    grids = [arm for arm in study.arms if arm.grid]
    if grids and not study.selection.metric.startswith("val_"):
        raise StudyError(
            f"{path}: selection.metric {study.selection.metric!r}: a grid is chosen by a "
            "validation metric (val_accuracy, val_macro_f1, val_loss, ...), never by test"
        )
    for arm in study.arms:
        for point in arm.points():
            extra = study.selection.overrides if arm.grid else ()
            try:
                config = load_config(arm.config, [*arm.overrides, *extra, *point])
            except ConfigError as error:
                raise StudyError(f"{path}: arm {arm.label!r} {list(point)}: {error}") from None
            if arm.grid and not config.data.has_validation:
                raise StudyError(
                    f"{path}: arm {arm.label!r} has a grid but no validation split: set "
                    "data.validation_fraction > 0 or data.validation_file (a grid is never "
                    "chosen on the test set)"
                )


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


@dataclass(frozen=True)
class Task:
    """One ``fedlora run``: a config, its overrides, the seed, where it goes."""

    config: Path
    overrides: tuple[str, ...]
    seed: int
    out: Path

    def argv(self) -> list[str]:
        """The ``fedlora`` command line of the run (``--resume`` if it was interrupted)."""
        args = ["run", str(self.config), "--out", str(self.out), "--quiet"]
        for override in (f"experiment.seed={self.seed}", *self.overrides):
            args += ["--set", override]
        resume = (self.out / "checkpoint.safetensors").is_file()
        return [*args, "--resume"] if resume else args


def run_one(task: Task) -> str:
    out = task.out
    if (out / "summary.md").is_file():
        return f"{out}: done before"
    if not claim(out):
        return f"{out}: running in another study process"
    command = [sys.executable, "-m", "fedlora", *task.argv()]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.log", "w") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    (out.parent / f"{out.name}.claim").unlink(missing_ok=True)
    return f"{out}: {'finished' if code == 0 else f'FAILED (exit {code}), see {out}.log'}"


def run_tasks(tasks: list[Task], jobs: int) -> None:
    with ThreadPoolExecutor(jobs) as pool:
        for message in pool.map(run_one, tasks):
            print(message, flush=True)


def grid_tasks(study: Study) -> list[Task]:
    """The selection runs of every grid arm: its selection seeds at every point."""
    return [
        Task(
            arm.config,
            (*arm.overrides, *study.selection.overrides, *point),
            seed,
            study.grid_dir(arm, seed, point),
        )
        for seed in study.selection.seeds
        for arm in study.arms
        if arm.grid
        for point in arm.points(extended_grid(study, arm).grid)
    ]


def waiting_arms(study: Study) -> list[str]:
    """The arms whose grid is not complete: their final runs cannot be listed yet."""
    return [arm.label for arm in study.arms if choose(study, arm) is None]


def final_tasks(study: Study) -> list[Task]:
    """Every (seed, arm) at the arm's chosen point; seeds outermost, so the first seed of every
    arm finishes first. An arm whose grid is not complete is left for a later call."""
    chosen = {arm.label: choose(study, arm) for arm in study.arms}
    return [
        Task(arm.config, (*arm.overrides, *point), seed, study.run_dir(arm, seed, point))
        for seed in study.seeds
        for arm in study.arms
        if (point := chosen[arm.label]) is not None
    ]


def run_studies(studies: list[Study], jobs: int) -> None:
    """The grids of every study first (``jobs`` runs at a time; again after each edge step
    added points), then every arm's seeds at its chosen point."""
    for _ in range(MAX_EDGE_STEPS + 1):
        tasks = [task for study in studies for task in grid_tasks(study)]
        if all((task.out / "summary.md").is_file() for task in tasks):
            break
        run_tasks(tasks, jobs)
    for study in studies:
        for label in waiting_arms(study):
            print(f"{study.name}/{label}: grid not complete; its final runs wait", flush=True)
    run_tasks([task for study in studies for task in final_tasks(study)], jobs)


def grid_scores(
    study: Study, arm: Arm, grid: Grid | None = None
) -> list[tuple[Point, float | None]]:
    """Per grid point (of ``grid``, default the arm's extended grid), the mean over the
    selection seeds of the final selection metric; None while a selection run is missing. A
    run that never reported it (diverged) scores NaN."""
    grid = extended_grid(study, arm).grid if grid is None else grid
    scores: list[tuple[Point, float | None]] = []
    for point in arm.points(grid):
        outs = [study.grid_dir(arm, seed, point) for seed in study.selection.seeds]
        if not all((out / "summary.md").is_file() for out in outs):
            scores.append((point, None))
            continue
        finals = [read_run(out).final(study.selection.metric) for out in outs]
        values = [float("nan") if v is None else float(v) for v in finals]
        scores.append((point, statistics.mean(values)))
    return scores


def best_point(study: Study, arm: Arm, grid: Grid) -> Point | None:
    """The point of ``grid`` with the best validation score (ties: the first listed; NaN never
    wins); None until every selection run has finished."""
    scores = grid_scores(study, arm, grid)
    if any(score is None for _, score in scores):
        return None
    sign = -1.0 if lower_is_better(study.selection.metric) else 1.0
    ranked = [
        (float("-inf") if math.isnan(score) else sign * score, -i)
        for i, (_, score) in enumerate(scores)
    ]
    return scores[ranked.index(max(ranked))][0]


@dataclass(frozen=True)
class Extension:
    """A grid after its edge steps: the values added, and whether the choice is still at an
    edge of a numeric key once no more may be added."""

    grid: Grid
    added: tuple[tuple[str, Any, Any], ...]  # (key, the edge that was chosen, the value added)
    at_edge: tuple[str, ...]  # keys whose chosen value is still an edge


def at_edge(values: tuple[Any, ...], value: Any) -> bool:
    """Whether ``value`` is the smallest or largest of a numeric key's (two or more) values."""
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    return numeric and len(set(values)) > 1 and value in (min(values), max(values))


def beyond(values: tuple[Any, ...], edge: Any) -> Any | None:
    """The next value past ``edge`` (the smallest or largest of a numeric key's values), one
    step of the grid's own ratio (geometric for positive values, else arithmetic), to 3
    significant digits; None for a value inside the grid, a non-numeric key or no room."""
    if not at_edge(values, edge):
        return None
    ordered = sorted(set(values))
    near = ordered[-2] if edge == ordered[-1] else ordered[1]
    step = edge * (edge / near) if edge > 0 and near > 0 else edge + (edge - near)
    if all(isinstance(v, int) for v in values):
        step = round(step)
        if edge > 0 and step <= 0:
            return None
    else:
        step = float(f"{step:.3g}")
    return None if step in ordered else step


def point_values(arm: Arm, grid: Grid, point: Point) -> dict[str, Any]:
    """The value of each grid key at ``point``."""
    keys = [key for key, _ in grid]
    combos = itertools.product(*(values for _, values in grid))
    by_point = dict(zip(arm.points(grid), combos, strict=True))
    return dict(zip(keys, by_point[point], strict=True))


def extended_grid(study: Study, arm: Arm) -> Extension:
    """The arm's grid with its edges followed: while the best point sits at the smallest or
    largest value of a numeric key, that key gets one more value beyond it (``beyond``) and the
    selection runs again, at most ``MAX_EDGE_STEPS`` values in all. A best value at the edge of
    a grid means the grid has not found the arm's optimum."""
    grid, added = arm.grid, []
    while grid:
        chosen = best_point(study, arm, grid)
        if chosen is None:
            break
        values = point_values(arm, grid, chosen)
        edges = tuple(key for key, options in grid if at_edge(options, values[key]))
        steps = [
            (key, values[key], step)
            for key, options in grid
            if (step := beyond(options, values[key])) is not None
        ]
        if not steps or len(added) >= MAX_EDGE_STEPS:
            return Extension(grid, tuple(added), edges)
        key, edge, step = steps[0]
        added.append((key, edge, step))
        grid = tuple((name, (*options, step) if name == key else options) for name, options in grid)
    return Extension(grid, tuple(added), ())


def choose(study: Study, arm: Arm) -> Point | None:
    """The arm's best point on its extended grid; ``()`` without a grid, None until every
    selection run (the edge steps' included) has finished."""
    if not arm.grid:
        return ()
    return best_point(study, arm, extended_grid(study, arm).grid)


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


def reported_point(study: Study, arm: Arm) -> Point | None:
    """The point the tables report: the choice, or while an edge step's runs are pending, the
    best of the points already run (``chosen_cell`` says so); None while the grid as written is
    incomplete."""
    if not arm.grid:
        return ()
    if best_point(study, arm, arm.grid) is None:
        return None
    extension = extended_grid(study, arm)
    done = tuple(
        (key, tuple(v for v in values if v not in pending_values(study, arm, extension, key)))
        for key, values in extension.grid
    )
    return best_point(study, arm, done)


def pending_values(study: Study, arm: Arm, extension: Extension, key: str) -> set[Any]:
    """The values an edge step added to ``key`` whose selection runs are not all finished."""
    scores = dict(grid_scores(study, arm, extension.grid))
    unfinished = [point for point, score in scores.items() if score is None]
    steps = {step for name, _, step in extension.added if name == key}
    return {
        value
        for point in unfinished
        if (value := point_values(arm, extension.grid, point)[key]) in steps
    }


def finished_runs(study: Study, arm: Arm) -> list[RunView]:
    """The arm's finished seeds at its reported point (none while its grid is incomplete)."""
    point = reported_point(study, arm)
    if point is None:
        return []
    runs = []
    for seed in study.seeds:
        out = study.run_dir(arm, seed, point)
        if (out / "summary.md").is_file():
            runs.append(read_run(out))
    return runs


def plateau_key(study: Study, run: RunView) -> str:
    """The metric the plateau rule watches: the study's choice, else validation where the run
    has it, else the first quality metric."""
    if study.plateau_metric:
        return study.plateau_metric
    validation = f"val_{study.metrics[0]}"
    return validation if run.final(validation) is not None else study.metrics[0]


def run_plateaued(study: Study, run: RunView) -> bool | None:
    key = plateau_key(study, run)
    curve = [(m["round"], m[key]) for m in run.evaluated if key in m]
    return plateaued(curve, study.plateau_tolerance, lower_is_better(key))


def label_counts(run: RunView) -> list[int] | None:
    """Examples per class over every client, from summary.md's client data table (the split
    is stratified, so the test set has the same shares); None where the run has no such
    table (a language model's data)."""
    summary = run.path / "summary.md"
    if not summary.is_file():
        return None
    lines = summary.read_text().split("## Client data", 1)[-1].splitlines()
    rows = [line for line in lines if line.startswith("| ")]
    if len(rows) < 2 or not rows[0].startswith("| client |"):
        return None
    columns = len(rows[0].split("|")) - 4  # | client | label ... | total |
    totals = [0] * columns
    for row in rows[1:]:
        cells = [cell.strip() for cell in row.strip("|").split("|")][1:-1]
        if len(cells) != columns or not all(cell.isdigit() for cell in cells):
            return None
        totals = [t + int(c) for t, c in zip(totals, cells, strict=True)]
    return totals if sum(totals) else None


def untrained_levels(run: RunView, key: str) -> list[float]:
    """What the run scores without training: its round-0 value and, for accuracy and
    macro-F1, the majority-class level (``fedlora.convergence.majority_levels``)."""
    levels = [m[key] for m in run.metrics if m["round"] == 0 and key in m]
    base = key.removeprefix("val_")
    counts = label_counts(run) if base in ("accuracy", "macro_f1") else None
    if counts:
        levels.append(majority_levels(counts)[base])
    return levels


def run_trained(study: Study, run: RunView) -> bool:
    """The trained rule on the study's first metric, and on macro-F1 too where the run has it
    (on imbalanced classes, accuracy alone can sit at the majority share and look trained)."""
    keys = [study.metrics[0], *(["macro_f1"] if "macro_f1" in run.metrics[-1] else [])]
    for key in dict.fromkeys(keys):
        final = run.final(key)
        if final is None or not trained(
            final, untrained_levels(run, key), lower_is_better=lower_is_better(key)
        ):
            return False
    return True


def plateau_cell(study: Study, runs: list[RunView]) -> str:
    """The table's plateau cell: "yes" when every seed trained and plateaued, else the marked
    reason."""
    untrained = sum(1 for run in runs if not run_trained(study, run))
    if untrained:
        return f"**did not train**: {untrained} of {len(runs)} seeds"
    states = [run_plateaued(study, run) for run in runs]
    rising = states.count(False)
    if rising:
        return f"**NO**: {rising} of {len(runs)} seeds still improving"
    if None in states:
        return "**unknown**: too few evaluations"
    return f"yes ({plateau_key(study, runs[0])})"


def chosen_cell(study: Study, arm: Arm) -> str:
    """The arm's chosen point, flagged when the grid was extended or is still at an edge."""
    shown = ", ".join(reported_point(study, arm) or ()) or "-"
    if not arm.grid:
        return shown
    extension = extended_grid(study, arm)
    if choose(study, arm) is None and reported_point(study, arm) is not None:
        return f"{shown} (**edge step pending**: the grid's best is at its edge)"
    if extension.at_edge:
        return f"{shown} (**at the grid's edge**)"
    if extension.added:
        return f"{shown} (grid extended past its edge)"
    return shown


def results_table(study: Study) -> str:
    """One row per arm: mean ± std over the finished seeds of each quality metric (final, and
    best for the first), of each ``extra`` key (the last metrics row's, or the run's
    ``accounting.json``), mean bytes and wall time, and whether it plateaued; with grids, the
    chosen value per arm and a table of every point's score; with claims, their verdicts."""
    main = study.metrics[0]
    grids = any(arm.grid for arm in study.arms)
    header = ["arm", "seeds", *(["chosen"] if grids else []), f"final {main}", f"best {main}"]
    header += [f"final {m}" for m in study.metrics[1:]] + list(study.extra)
    header += ["up / client / round", "total bytes", "wall s", "plateau"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm in study.arms:
        runs = finished_runs(study, arm)
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
        cells = [arm.label, str(len(runs))]
        cells += [chosen_cell(study, arm)] if grids else []
        cells.append(mean_std(present(run.final(main) for run in runs)))
        cells.append(mean_std(present(run.best(main) for run in runs)))
        cells += [mean_std(present(run.final(m) for run in runs)) for m in study.metrics[1:]]
        cells += [mean_std(present(extra_value(run, key) for run in runs)) for key in study.extra]
        cells.append(human_bytes(int(statistics.mean(uploads))) if uploads else "-")
        cells += [human_bytes(int(total)), f"{seconds:.0f}", plateau_cell(study, runs)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n\n".join(
        part for part in ("\n".join(lines), grid_table(study), claims_table(study)) if part
    )


def report(study: Study, figures: Path = REPO / "docs" / "figures") -> str:
    """The results table (``results_table``), written with the study's two figures."""
    table = results_table(study)
    figures.mkdir(parents=True, exist_ok=True)
    write_figures(figure_arms(study), study.metrics[0], figures / study.name, figure_title(study))
    drawn = effects_figure(claim_effects(study), f"{study.title or study.name}: claims")
    if drawn is not None:
        save(drawn, figures / f"{study.name}_effects.png")
    study.directory.mkdir(parents=True, exist_ok=True)
    (study.directory / "results.md").write_text(table + "\n")
    return table


def figure_arms(study: Study) -> list[ArmView]:
    """Each arm's finished seeds as the figures draw them; the claims' references and the arms
    marked ``reference`` are the references."""
    references = {claim.reference for claim in study.claims}
    return [
        ArmView(
            arm.label,
            tuple(finished_runs(study, arm)),
            arm.variant,
            arm.group,
            arm.reference or arm.label in references,
        )
        for arm in study.arms
    ]


def figure_title(study: Study) -> str:
    return f"{study.title or study.name}: {study.metrics[0]}"


def grid_table(study: Study) -> str:
    """Every grid point's selection score (mean over the selection seeds), the choice marked,
    the points added past an edge marked, and a line per arm whose grid was extended or whose
    choice is still at an edge."""
    metric, seeds = study.selection.metric, study.selection.seeds
    budget = " ".join(study.selection.overrides) or "the full budget"
    lines = [
        f"Grid selection by final {metric}, mean over seeds {list(seeds)}, on {budget}:",
        "",
        f"| arm | point | {metric} | chosen |",
        "|---|---|---|---|",
    ]
    notes = []
    for arm in study.arms:
        if not arm.grid:
            continue
        extension = extended_grid(study, arm)
        chosen = best_point(study, arm, extension.grid)
        listed = set(arm.points())
        for point, score in grid_scores(study, arm, extension.grid):
            shown = "not finished" if score is None else f"{score:.4f}"
            marks = ["**chosen**"] if point == chosen else []
            marks += [] if point in listed else ["added past an edge"]
            lines.append(f"| {arm.label} | {', '.join(point)} | {shown} | {'; '.join(marks)} |")
        for key, edge, step in extension.added:
            notes.append(
                f"- {arm.label}: the best {key} was the grid's edge {toml_value(edge)}; "
                f"{toml_value(step)} was added"
            )
        if extension.at_edge and chosen is not None:
            notes.append(
                f"- {arm.label}: **still at the edge** of {', '.join(extension.at_edge)} after "
                f"{len(extension.added)} added values: its optimum lies outside the grid"
            )
    if len(lines) == 4:
        return ""
    return "\n".join([*lines, *(["", *notes] if notes else [])])


def layout(run: RunView) -> tuple[str, str]:
    """What pairing by seed needs to be equal: the data and the partition sections."""
    return tuple(
        json.dumps(run.config.get(key, {}), sort_keys=True) for key in ("data", "partition")
    )


def claim_effect(claim: Claim, arm: list[RunView], reference: list[RunView]) -> Effect | None:
    """Paired by seed where the claim allows it and the arms ran the same seeds on the same
    data layout; else Welch's unpaired difference (the table says which)."""
    lower = lower_is_better(claim.metric)
    finals = [
        {run.seed: value for run in runs if (value := run.final(claim.metric)) is not None}
        for runs in (arm, reference)
    ]
    by_seed = [{run.seed: run for run in runs} for runs in (arm, reference)]
    common = set(finals[0]) & set(finals[1])
    same_layout = all(layout(by_seed[0][seed]) == layout(by_seed[1][seed]) for seed in common)
    if claim.paired and len(common) >= 2 and same_layout:
        return paired_effect(finals[0], finals[1], lower)
    return unpaired_effect(list(finals[0].values()), list(finals[1].values()), lower)


def claim_rows(study: Study) -> list[tuple[Claim, Verdict]]:
    """The study's claims judged by ``fedlora.convergence.verdict`` on the final metric."""
    arms = {arm.label: arm for arm in study.arms}
    judged = []
    for claim in study.claims:
        compared = {
            label: finished_runs(study, arms[label]) for label in (claim.arm, claim.reference)
        }
        untrained = [
            label
            for label, runs in compared.items()
            if not all(run_trained(study, run) for run in runs)
        ]
        unsettled = [
            label
            for label, runs in compared.items()
            if any(run_plateaued(study, run) is not True for run in runs)
        ]
        effect = claim_effect(claim, compared[claim.arm], compared[claim.reference])
        judged.append((claim, verdict(claim.kind, claim.margin, effect, unsettled, untrained)))
    return judged


def claim_effects(study: Study) -> list[ClaimEffect]:
    """The claims with an effect, as the effects figure draws them."""
    return [
        ClaimEffect(
            claim.claim,
            judged.effect.effect,
            judged.effect.effect - judged.effect.half_width,
            judged.effect.effect + judged.effect.half_width,
            claim.margin,
            claim.kind,
            judged.verdict,
            judged.effect.statistics,
        )
        for claim, judged in claim_rows(study)
        if judged.effect is not None
    ]


def claims_table(study: Study) -> str:
    rows = claim_rows(study)
    if not rows:
        return ""
    lines = [
        "| claim | effect ± se | 95% interval | p | statistics | verdict | why |",
        "|---|---|---|---|---|---|---|",
    ]
    for claim, judged in rows:
        effect = judged.effect
        if effect is None:
            cells = ["-", "-", "-", "-"]
        else:
            low, high = effect.effect - effect.half_width, effect.effect + effect.half_width
            cells = [
                f"{effect.effect:+.4f} ± {effect.se:.4f} ({claim.metric})",
                f"[{low:+.4f}, {high:+.4f}]",
                f"{effect.p_value:.3g}",
                effect.statistics,
            ]
        lines.append(
            f"| {claim.claim} | {' | '.join(cells)} | **{judged.verdict}** | {judged.why} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("studies", type=Path, nargs="+", help="study files, run in this order")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one thread each)")
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    try:
        studies = [load_study(path) for path in args.studies]
    except StudyError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if not args.report_only:
        run_studies(studies, args.jobs)
    for study in studies:
        print(f"\n{study.name}\n\n{report(study)}")


if __name__ == "__main__":
    main()
