"""The figures, read back from their matplotlib objects and compared with what the tiny runs'
metrics.jsonl files say: curves, bytes axes, the final-value chart, colours and panels."""

from __future__ import annotations

import itertools
import statistics
from pathlib import Path

import numpy as np
import pytest

from fedlora.config import load_config
from fedlora.experiment import build
from fedlora.methods import registry
from fedlora.report import (
    LOG_BYTES_SPAN,
    MAX_CURVES,
    METHOD_COLOURS,
    ArmView,
    arms_of,
    curves_figure,
    finals_figure,
    read_run,
)
from tests.conftest import TINY, read_metrics, run_cli

KEY = "test_loss"  # varies between rounds and seeds on the tiny model (accuracy barely moves)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """FedIT with 2 rounds on seeds 0 and 1, FFA-LoRA with 3 rounds (another schedule) and
    centralized (sends nothing), as run directories ``<arm>/seed<k>``."""
    root = tmp_path_factory.mktemp("report")
    made: dict[str, list[Path]] = {}
    for arm, config, seeds, rounds in (
        ("fedit", "fedit", (0, 1), 2),
        ("ffa", "ffa", (0,), 3),
        ("central", "centralized", (0,), 2),
    ):
        for seed in seeds:
            out = root / arm / f"seed{seed}"
            code, output = run_cli(
                "run", str(TINY / f"{config}.toml"), "--out", str(out), "--quiet",
                "--set", f"experiment.seed={seed}", "--set", f"experiment.rounds={rounds}",
            )  # fmt: skip
            assert code == 0, output
            made.setdefault(arm, []).append(out)
    return made


def arms(runs: dict[str, list[Path]]) -> list[ArmView]:
    return arms_of([read_run(path) for paths in runs.values() for path in paths])


def expected_curve(paths: list[Path], x_key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From the metrics files alone: x (cumulative examples, or bytes), mean and sample std of
    KEY over the seeds, at every evaluated round from round 0."""
    per_seed = []
    for path in paths:
        seen, rows = 0, {}
        for m in read_metrics(path):
            seen += m.get("examples", 0)
            if KEY in m:
                rows[m["round"]] = (seen if x_key == "examples" else m[x_key], m[KEY])
        per_seed.append(rows)
    rounds = sorted(set.intersection(*(set(rows) for rows in per_seed)))
    x = np.mean([[rows[r][0] for r in rounds] for rows in per_seed], axis=0)
    y = np.array([[rows[r][1] for r in rounds] for rows in per_seed])
    spread = y.std(axis=0, ddof=1) if len(paths) > 1 else np.zeros(len(rounds))
    return x, y.mean(axis=0), spread


def lines_by_label(axis) -> dict:
    return {line.get_label(): line for line in axis.get_lines()}


def test_round_zero_is_the_initial_model(runs: dict[str, list[Path]]) -> None:
    """The first record is the initial adapter's evaluation, before anything trained or moved."""
    path = runs["fedit"][0]
    first = read_metrics(path)[0]
    assert (first["round"], first["steps"], first["examples"], first["cumulative_bytes"]) == (
        0,
        0,
        0,
        0,
    )
    experiment = build(load_config(path / "config.toml"))
    initial = experiment.evaluator.evaluate(dict(experiment.method.context.initial))
    assert first[KEY] == pytest.approx(initial["loss"], rel=1e-6)
    assert first["accuracy"] == pytest.approx(initial["accuracy"])


def test_curves_hold_the_metrics_files_means(runs: dict[str, list[Path]]) -> None:
    """Arms with different rounds: x is training examples seen (not rounds); each line is the
    mean over seeds from round 0, its band ±1 sample std; the bytes axes leave out the arm
    that sends nothing; integer and MB/KB ticks; the legend outside the axes."""
    figure = curves_figure(arms(runs), KEY)
    assert figure is not None
    progress, by_bytes = figure.axes
    assert progress.get_xlabel() == "training examples seen, all clients"
    drawn, on_wire = lines_by_label(progress), lines_by_label(by_bytes)
    labels = {
        "fedit": "fedit (n=2)",  # two seeds in one directory: named by it
        "ffa": "ffa/seed0 (n=1)",  # one run: its directory's shortest distinct ending
        "central": "central/seed0 (centralized) (n=1)",
    }
    assert set(drawn) == set(labels.values())
    assert set(on_wire) == {labels["fedit"], labels["ffa"]}  # centralized sends nothing
    for arm, paths in runs.items():
        x, mean, _ = expected_curve(paths, "examples")
        line = drawn[labels[arm]]
        np.testing.assert_allclose(line.get_xdata(), x)
        np.testing.assert_allclose(line.get_ydata(), mean)
        assert x[0] == 0 and mean[0] == np.mean([read_metrics(p)[0][KEY] for p in paths])
        if arm != "central":
            x, mean, _ = expected_curve(paths, "cumulative_bytes")
            np.testing.assert_allclose(on_wire[labels[arm]].get_xdata(), x)
            np.testing.assert_allclose(on_wire[labels[arm]].get_ydata(), mean)
    x, mean, spread = expected_curve(runs["fedit"], "examples")
    assert spread.any()
    (band,) = progress.collections  # the only arm with two seeds
    corners = band.get_paths()[0].vertices
    for point in (*zip(x, mean + spread, strict=True), *zip(x, mean - spread, strict=True)):
        assert np.isclose(corners, point).all(axis=1).any(), point

    figure.canvas.draw()
    assert all(float(t).is_integer() for t in progress.get_xticks())
    ticks = [t.get_text() for t in by_bytes.get_xticklabels() if t.get_text()]
    assert ticks and all(t.endswith(("B", "KB", "MB", "GB")) for t in ticks)
    legend = by_bytes.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == list(drawn)  # every arm of the row
    assert legend.get_window_extent().x0 >= by_bytes.get_window_extent().x1
    caption = " ".join(t.get_text() for t in figure.texts)
    assert "Seeds 0, 1; n = 1 to 2 runs per arm; test examples: 60." in caption
    assert "Not on the bytes axes (they send nothing): central/seed0 (centralized)." in caption


def test_bytes_spanning_more_than_a_decade_get_a_log_axis(
    runs: dict[str, list[Path]], tmp_path: Path
) -> None:
    """Full-weight averaging (DWA) next to FFA-LoRA at rank 1 sends more than ten times the
    bytes: the bytes axis turns symmetric-log from the smallest positive cumulative bytes in
    the metrics files, with round 0's zero on it and the lines' data unchanged. FedIT next to
    FFA-LoRA (about twice) stays linear."""
    made = {}
    for arm, config, extra in (("dwa", "dwa", []), ("ffa1", "ffa", ["lora.rank=1"])):
        out = tmp_path / arm / "seed0"
        sets = [item for value in extra for item in ("--set", value)]
        code, output = run_cli(
            "run", str(TINY / f"{config}.toml"), "--out", str(out), "--quiet", *sets
        )
        assert code == 0, output
        made[arm] = [out]
    totals = {arm: read_metrics(paths[0])[-1]["cumulative_bytes"] for arm, paths in made.items()}
    assert totals["dwa"] > LOG_BYTES_SPAN * totals["ffa1"]
    figure = curves_figure(arms(made), KEY)
    assert figure is not None
    _, by_bytes = figure.axes
    smallest = min(
        m["cumulative_bytes"]
        for paths in made.values()
        for m in read_metrics(paths[0])
        if m["cumulative_bytes"] > 0
    )
    assert by_bytes.get_xscale() == "symlog"
    assert by_bytes.xaxis.get_transform().linthresh == smallest
    assert by_bytes.get_xlabel().endswith("(log scale)")
    for arm, paths in made.items():
        x, mean, _ = expected_curve(paths, "cumulative_bytes")
        (line,) = [v for k, v in lines_by_label(by_bytes).items() if k.startswith(f"{arm}/")]
        np.testing.assert_allclose(line.get_xdata(), x)
        np.testing.assert_allclose(line.get_ydata(), mean)
        assert x[0] == 0
    figure.canvas.draw()
    labelled = [t for t in by_bytes.get_xticklabels() if t.get_text()]
    assert all(t.get_position()[0] == 0 or t.get_position()[0] >= smallest for t in labelled)
    linear = curves_figure(arms({"fedit": runs["fedit"], "ffa": runs["ffa"]}), KEY)
    assert linear is not None and linear.axes[1].get_xscale() == "linear"


def test_the_same_schedule_is_drawn_by_round(runs: dict[str, list[Path]]) -> None:
    figure = curves_figure(arms({"fedit": runs["fedit"]}), KEY)
    assert figure is not None
    (line,) = figure.axes[0].get_lines()
    assert figure.axes[0].get_xlabel().startswith("round")
    assert list(line.get_xdata()) == [0, 1, 2]


def test_final_chart_is_the_mean_and_std_of_each_last_evaluation(
    runs: dict[str, list[Path]],
) -> None:
    made = [
        ArmView(arm.label, arm.runs, reference=arm.method == "centralized") for arm in arms(runs)
    ]
    figure = finals_figure(made, KEY)
    assert figure is not None
    (axis,) = figure.axes
    bars = {container.get_label(): container for container in axis.containers}
    finals = {arm: [read_metrics(p)[-1][KEY] for p in paths] for arm, paths in runs.items()}
    for arm, label in (("fedit", "fedit (n=2)"), ("ffa", "ffa/seed0 (n=1)")):
        dot, _, (segments,) = bars[label].lines
        assert dot.get_xdata()[0] == pytest.approx(statistics.mean(finals[arm]))
        ((low, _), (high, _)) = segments.get_segments()[0]
        spread = statistics.stdev(finals[arm]) if len(finals[arm]) > 1 else 0.0
        assert (high - low) / 2 == pytest.approx(spread)
    (reference,) = [c for c in axis.collections if c.get_linestyle()[0][1]]  # the dashed line
    assert reference.get_segments()[0][0][0] == pytest.approx(finals["central"][0])
    names = [t.get_text() for t in axis.get_yticklabels()]
    assert names == [
        "fedit (n=2)",
        "ffa/seed0 (n=1)",
        "central/seed0 (centralized) (n=1)  [reference]",
    ]


def test_one_colour_per_method_in_every_figure(runs: dict[str, list[Path]]) -> None:
    """A curves figure and a final chart with the arms in another order: each method has its
    one colour, its own in METHOD_COLOURS, and no two methods share one."""
    made = arms(runs)
    curves = curves_figure(made, KEY)
    finals = finals_figure(made[::-1], KEY)
    assert curves is not None and finals is not None
    methods = {arm.legend(): arm.method for arm in made}
    seen = {methods[line.get_label()]: line.get_color() for line in curves.axes[0].get_lines()}
    for container in finals.axes[0].containers:
        assert container.lines[0].get_color() == seen[methods[container.get_label()]]
    assert seen == {m: METHOD_COLOURS[m] for m in ("fedit", "ffa", "centralized")}
    assert set(registry()) <= set(METHOD_COLOURS)
    assert len(set(METHOD_COLOURS.values())) == len(METHOD_COLOURS)


def test_many_arms_become_panels_of_at_most_eight_curves(runs: dict[str, list[Path]]) -> None:
    """Eleven FedIT arms and centralized: without groups, one group per method, FedIT's cut
    into panels of 8 and 3; with groups, one row per group, a variant keeping its line style
    in every group."""
    fedit = tuple(read_run(p) for p in runs["fedit"])
    central = tuple(read_run(p) for p in runs["central"])
    many = [ArmView(f"fedit {i}", fedit) for i in range(11)] + [ArmView("central", central)]
    figure = curves_figure(many, KEY)
    assert figure is not None
    progress = figure.axes[::2]  # each row: progress, bytes
    counts = [len(axis.get_lines()) for axis in progress]
    assert counts == [8, 3, 1] and max(counts) <= MAX_CURVES
    drawn = [line.get_label() for axis in progress for line in axis.get_lines()]
    assert sorted(drawn) == sorted(arm.legend() for arm in many)

    grouped = [
        ArmView(f"fedit {v} r={r}", fedit, variant=v, panel=f"r={r}")
        for r in (2, 4)
        for v in ("ring", "ER", "star")
    ]
    figure = curves_figure(grouped, KEY)
    assert figure is not None
    assert [axis.get_title() for axis in figure.axes[::2]] == ["r=2", "r=4"]
    style = {
        line.get_label(): (line.get_linestyle(), line.get_marker())
        for axis in figure.axes
        for line in axis.get_lines()
    }
    for v in ("ring", "ER", "star"):
        assert style[f"fedit {v} r=2 (n=2)"] == style[f"fedit {v} r=4 (n=2)"]
    assert len({style[f"fedit {v} r=2 (n=2)"] for v in ("ring", "ER", "star")}) == 3


STUDY_RUNS = Path(__file__).resolve().parents[1] / "runs" / "studies" / "converged_declora"


def test_thousands_of_examples_get_ticks_that_do_not_overlap() -> None:
    """A committed study's runs (7,200 examples per arm, in 18 and in 90 rounds): the progress
    axis's tick labels are integers with gaps between them (an unbounded locator wrote
    0800160024003200...)."""
    centralized = read_run(STUDY_RUNS / "centralized" / "train.lr=0.001" / "seed0")
    ring = read_run(STUDY_RUNS / "dec-lora-ring-k-1" / "train.lr=0.005" / "seed0")
    figure = curves_figure(arms_of([centralized, ring]), "accuracy")
    assert figure is not None
    progress = figure.axes[0]
    assert progress.get_xlabel() == "training examples seen, all clients"
    figure.canvas.draw()
    left, right = progress.get_xlim()
    assert right > 7000
    shown = [t for t in progress.get_xticklabels() if left <= t.get_position()[0] <= right]
    assert len(shown) >= 3 and all(float(t.get_position()[0]).is_integer() for t in shown)
    spans = sorted((e.x0, e.x1) for e in (t.get_window_extent() for t in shown))
    assert all(a[1] < b[0] for a, b in itertools.pairwise(spans)), spans
