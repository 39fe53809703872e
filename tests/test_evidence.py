"""The rules a study's verdicts rest on (``fedlora.convergence``) and how ``benchmarks/study.py``
applies them: paired statistics against numpy and scipy, the plateau rule on constructed
curves, "did not train", and grids that follow their edges. The study tests work on run
directories written here (config, metrics, summary: what a finished run leaves), so each case
is exactly the one named."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from scipy import stats

from fedlora.convergence import (
    majority_levels,
    paired_effect,
    plateaued,
    trained,
    unpaired_effect,
    verdict,
)
from tests.conftest import TINY

# -- statistics --------------------------------------------------------------------------------

ARM = {0: 0.912, 1: 0.925, 2: 0.931, 3: 0.918, 4: 0.927}
REFERENCE = {0: 0.901, 1: 0.919, 2: 0.915, 3: 0.913, 4: 0.917}


def test_paired_effect_against_numpy_and_scipy() -> None:
    differences = np.array([ARM[k] - REFERENCE[k] for k in range(5)])
    effect = paired_effect(ARM, REFERENCE)
    assert effect is not None and effect.paired and effect.n == 5 and effect.df == 4
    assert effect.effect == pytest.approx(differences.mean())
    assert effect.se == pytest.approx(differences.std(ddof=1) / math.sqrt(5))
    scipy_test = stats.ttest_rel(list(ARM.values()), list(REFERENCE.values()))
    assert effect.p_value == pytest.approx(scipy_test.pvalue)
    interval = stats.t.interval(0.95, 4, loc=differences.mean(), scale=effect.se)
    assert effect.effect - effect.half_width == pytest.approx(interval[0])
    # Pairing removes the seed-to-seed spread both arms share: a much smaller se.
    unpaired = unpaired_effect(list(ARM.values()), list(REFERENCE.values()))
    assert unpaired is not None and unpaired.se > 1.5 * effect.se
    # Only the seeds both arms ran are paired; lower-is-better flips the sign.
    partial = paired_effect({0: 0.3, 1: 0.2, 7: 0.9}, {0: 0.5, 1: 0.6, 3: 0.1}, True)
    assert partial is not None and partial.n == 2 and partial.effect == pytest.approx(0.3)
    assert paired_effect({0: 0.3}, {0: 0.5}) is None


def test_unpaired_effect_is_welchs_test() -> None:
    arm, reference = [0.90, 0.91, 0.93, 0.95], [0.80, 0.83, 0.79]
    effect = unpaired_effect(arm, reference)
    assert effect is not None and not effect.paired
    welch = stats.ttest_ind(arm, reference, equal_var=False)
    assert effect.effect == pytest.approx(np.mean(arm) - np.mean(reference))
    se = math.sqrt(np.var(arm, ddof=1) / 4 + np.var(reference, ddof=1) / 3)
    assert effect.se == pytest.approx(se)
    assert effect.p_value == pytest.approx(welch.pvalue)
    assert unpaired_effect([0.9], reference) is None


def test_verdicts_on_the_interval() -> None:
    effect = paired_effect(ARM, REFERENCE)
    assert effect is not None
    low = effect.effect - effect.half_width
    assert low > 0  # the constructed arm is better on every seed
    assert verdict("better", 0.0, effect).verdict == "reproduced"
    assert verdict("better", low - 1e-9, effect).verdict == "reproduced"
    assert verdict("better", effect.effect, effect).verdict == "inconclusive"
    assert verdict("better", effect.effect + effect.half_width + 1e-9, effect).verdict == (
        "not reproduced"
    )
    assert verdict("within", 0.001, effect).verdict == "not reproduced"  # interval above 0.001
    high = effect.effect + effect.half_width
    assert verdict("within", high, effect).verdict == "reproduced"
    assert verdict("within", (low + high) / 2, effect).verdict == "inconclusive"
    unsettled = verdict("better", 0.0, effect, not_plateaued=["FedIT"])
    assert unsettled.verdict == "inconclusive" and "FedIT" in unsettled.why
    void = verdict("better", 0.0, effect, not_plateaued=["FedIT"], not_trained=["FFA"])
    assert void.verdict == "void" and "did not train: FFA" in void.why
    assert verdict("better", 0.0, None).verdict == "inconclusive"


# -- plateau and trained rules -----------------------------------------------------------------


def test_plateau_rule_on_constructed_curves() -> None:
    rising = [(r, 0.5 + 0.08 * r) for r in range(1, 7)]
    assert plateaued(rising) is False
    slow_but_steady = [(r, 0.8 + 0.01 * r) for r in range(1, 10)]  # no noise: a rise is a rise
    assert plateaued(slow_but_steady) is False
    noisy_flat = [(1, 0.80), (2, 0.95), (3, 0.82), (4, 0.93), (5, 0.81), (6, 0.97)]
    assert plateaued(noisy_flat) is True  # the last evaluation is the best, by luck
    converged = [(1, 0.6), (2, 0.85), (3, 0.9), (4, 0.901), (5, 0.903), (6, 0.902)]
    assert plateaued(converged) is True
    peaked = [(1, 0.7), (2, 0.95), (3, 0.93), (4, 0.9), (5, 0.88), (6, 0.86)]
    assert plateaued(peaked) is True  # falling is not improving
    falling_loss = [(r, 1.5 - 0.2 * r) for r in range(1, 7)]
    assert plateaued(falling_loss, lower_is_better=True) is False
    assert plateaued(falling_loss) is True  # read as accuracy it got worse
    # Round 0 (the initial model) is not an evaluation of training; too few say nothing.
    assert plateaued([(0, 0.2), (2, 0.8), (4, 0.9), (6, 0.95)]) is None
    assert plateaued([*converged[:5], (6, float("nan"))]) is None  # diverged: cannot say
    # The tolerance: means 0.5 and 0.75 with no spread gain exactly 0.25 (binary-exact).
    step = [(1, 0.5), (2, 0.5), (3, 0.75), (4, 0.75)]
    assert plateaued(step, tolerance=0.25) is True
    assert plateaued(step, tolerance=0.2499) is False


def test_majority_levels_and_the_trained_rule() -> None:
    levels = majority_levels([60, 25, 15])  # 100 examples, the first class the majority
    assert levels["accuracy"] == pytest.approx(0.6)
    # Always "class 0": precision 0.6, recall 1 -> F1 0.75 on it, 0 on the others.
    assert levels["macro_f1"] == pytest.approx(0.75 / 3)
    assert trained(0.40, [0.25, 0.26]) is True
    assert trained(0.265, [0.25, 0.26]) is False  # within a point of the majority level
    assert trained(0.5, [float("nan")]) is True
    assert trained(float("nan"), [0.2]) is False
    assert trained(0.3, [0.9], lower_is_better=True) is True  # a loss that fell


# -- studies built on constructed runs ---------------------------------------------------------


def write_run(
    out: Path,
    curve: list[float],
    key: str = "accuracy",
    seed: int = 0,
    labels: tuple[int, ...] = (50, 30, 20),
    validation: list[float] | None = None,
) -> None:
    """A finished run's files: ``curve[i]`` is ``key`` after round i (0: the initial model)."""
    out.mkdir(parents=True, exist_ok=True)
    config = {"experiment": {"seed": seed}, "data": {"dataset": "toy"}, "partition": {}}
    config["method"] = {"name": "fedit"}
    (out / "config.toml").write_text(tomli_w.dumps(config))
    rows = []
    for round_index, value in enumerate(curve):
        row = {"round": round_index, key: value, "cumulative_bytes": 0, "seconds": 1.0}
        if validation is not None:
            row[f"val_{key}"] = validation[round_index]
        if round_index:
            row |= {"clients": [0], "bytes_up": 10}
        rows.append(json.dumps(row))
    (out / "metrics.jsonl").write_text("\n".join(rows) + "\n")
    header = "| client | " + " | ".join(f"c{i}" for i in range(len(labels))) + " | total |"
    counts = " | ".join(str(n) for n in labels)
    (out / "summary.md").write_text(
        "# run\n\n## Client data (training examples per label)\n\n"
        f"{header}\n|{'---|' * (len(labels) + 2)}\n| 0 | {counts} | {sum(labels)} |\n"
    )


def write_study(path: Path, body: str) -> Path:
    config = TINY / "fedit.toml"
    path.write_text(body.replace("CONFIG", str(config)))
    return path


def two_arm_study(tmp_path: Path, name: str, seeds: int, label: str, claims: str):
    """A study of FedIT and an FFA-LoRA arm named ``label`` over seeds 0..``seeds``-1 with
    ``claims`` (TOML), and its two arms."""
    from benchmarks.study import load_study

    study_file = write_study(
        tmp_path / f"{name}.toml",
        f'name = "{name}"\nseeds = {list(range(seeds))}\nmetrics = ["accuracy"]\n'
        '[[arms]]\nlabel = "FedIT"\nconfig = "CONFIG"\n'
        f'[[arms]]\nlabel = "{label}"\nconfig = "CONFIG"\nset = ["method.name=ffa"]\n{claims}',
    )
    study = load_study(study_file, root=tmp_path / "runs")
    fedit, other = study.arms
    return study, fedit, other


def grid_study(tmp_path: Path, grid: str):
    """A one-arm, one-seed study of FedIT with ``grid`` (a TOML inline table), and its arm."""
    from benchmarks.study import load_study

    study_file = write_study(
        tmp_path / "grid.toml",
        'name = "grid"\nseeds = [0]\nmetrics = ["accuracy"]\n'
        'set = ["data.validation_fraction=0.2"]\n'
        f'[[arms]]\nlabel = "FedIT"\nconfig = "CONFIG"\ngrid = {grid}\n',
    )
    study = load_study(study_file, root=tmp_path / "runs")
    (arm,) = study.arms
    return study, arm


def test_a_grid_won_at_its_edge_is_extended_until_the_best_is_inside(tmp_path: Path) -> None:
    from benchmarks.study import choose, extended_grid, grid_table, grid_tasks

    study, arm = grid_study(tmp_path, '{ "train.lr" = [1e-3, 2e-3] }')

    def finish(point: str, score: float) -> None:
        out = study.grid_dir(arm, 0, (point,))
        write_run(out, [0.3, score], validation=[0.3, score])

    finish("train.lr=0.001", 0.50)
    finish("train.lr=0.002", 0.60)  # best at the upper edge: the grid gains 2e-3 · 2 = 4e-3
    assert [t.overrides[-1] for t in grid_tasks(study)][-1] == "train.lr=0.004"
    assert choose(study, arm) is None  # the added point has not run yet
    finish("train.lr=0.004", 0.70)  # the edge again: 8e-3 is added (the second and last step)
    assert extended_grid(study, arm).grid == (("train.lr", (1e-3, 2e-3, 4e-3, 8e-3)),)
    finish("train.lr=0.008", 0.65)
    assert choose(study, arm) == ("train.lr=0.004",)
    extension = extended_grid(study, arm)
    assert extension.added == (("train.lr", 2e-3, 4e-3), ("train.lr", 4e-3, 8e-3))
    assert extension.at_edge == ()
    table = grid_table(study)
    assert "| FedIT | train.lr=0.004 | 0.7000 | **chosen**; added past an edge |" in table
    assert "the best train.lr was the grid's edge 0.002; 0.004 was added" in table


def test_a_grid_still_at_its_edge_after_two_steps_says_so(tmp_path: Path) -> None:
    from benchmarks.study import choose, extended_grid, grid_table, results_table

    study, arm = grid_study(tmp_path, '{ "train.local_steps" = [8, 4] }')
    for steps, score in ((8, 0.6), (4, 0.7), (2, 0.8), (1, 0.9)):  # best ever smaller
        out = study.grid_dir(arm, 0, (f"train.local_steps={steps}",))
        write_run(out, [0.3, score], validation=[0.3, score])
    extension = extended_grid(study, arm)
    assert extension.grid == (("train.local_steps", (8, 4, 2, 1)),)  # integers stay integers
    assert extension.at_edge == ("train.local_steps",)
    assert choose(study, arm) == ("train.local_steps=1",)
    assert "**still at the edge** of train.local_steps after 2 added values" in grid_table(study)
    assert "(**at the grid's edge**)" in results_table(study)


def test_an_arm_stuck_at_the_majority_class_did_not_train(tmp_path: Path) -> None:
    from benchmarks.study import claims_table, results_table

    study, fedit, stuck = two_arm_study(
        tmp_path,
        "stuck",
        3,
        "Stuck",
        '[[claims]]\nclaim = "Stuck is within 1 point of FedIT"\narm = "Stuck"\n'
        'reference = "FedIT"\nkind = "within"\nmargin = 0.01\n',
    )
    for seed in (0, 1, 2):
        rising = [0.30, 0.60, 0.75, 0.80, 0.81, 0.80, 0.81]
        write_run(study.run_dir(fedit, seed), [v + 0.01 * seed for v in rising], seed=seed)
        # Flat at 0.5: the majority share of labels (50, 30, 20), a "plateau" at nothing.
        write_run(study.run_dir(stuck, seed), [0.5] * 7, seed=seed)
    table = results_table(study)
    stuck_row = next(line for line in table.splitlines() if line.startswith("| Stuck |"))
    assert "**did not train**: 3 of 3 seeds" in stuck_row
    fedit_row = next(line for line in table.splitlines() if line.startswith("| FedIT |"))
    assert "yes (accuracy)" in fedit_row
    claims = claims_table(study)
    assert "**void**" in claims and "did not train: Stuck" in claims


def test_a_claim_on_shared_seeds_is_paired_and_says_so(tmp_path: Path) -> None:
    from benchmarks.study import claims_table

    study, fedit, ffa = two_arm_study(
        tmp_path,
        "paired",
        5,
        "FFA",
        '[[claims]]\nclaim = "FFA beats FedIT"\narm = "FFA"\nreference = "FedIT"\n'
        '[[claims]]\nclaim = "FFA beats FedIT, unpaired"\narm = "FFA"\nreference = "FedIT"\n'
        "paired = false\n",
    )
    finals = {"FedIT": {}, "FFA": {}}
    for seed in range(5):
        # A seed effect both arms share (+0.02 a seed), and FFA ahead by ARM - REFERENCE.
        finals["FedIT"][seed] = REFERENCE[seed] + 0.02 * seed
        finals["FFA"][seed] = ARM[seed] + 0.02 * seed
        for label, arm in (("FedIT", fedit), ("FFA", ffa)):
            final = finals[label][seed]
            write_run(
                study.run_dir(arm, seed), [0.3, 0.6, 0.8, final, final, final, final], seed=seed
            )
    lines = claims_table(study).splitlines()
    paired_row = next(line for line in lines if line.startswith("| FFA beats FedIT |"))
    unpaired_row = next(line for line in lines if line.startswith("| FFA beats FedIT, unpaired |"))
    assert "paired, 5 seeds" in paired_row and "**reproduced**" in paired_row
    expected = paired_effect(finals["FFA"], finals["FedIT"])
    assert expected is not None
    assert f"{expected.effect:+.4f} ± {expected.se:.4f}" in paired_row
    # Unpaired, the shared seed effect is spread, not signal: the same data is inconclusive.
    assert "unpaired (Welch), 10 runs" in unpaired_row and "**inconclusive**" in unpaired_row
    # The effects figure draws each claim's effect and its interval.
    from benchmarks.study import claim_effects, report

    drawn = claim_effects(study)
    assert [c.claim for c in drawn] == ["FFA beats FedIT", "FFA beats FedIT, unpaired"]
    assert drawn[0].effect == pytest.approx(expected.effect)
    assert drawn[0].low == pytest.approx(expected.effect - expected.half_width)
    report(study, tmp_path / "figures")
    assert (tmp_path / "figures" / "paired_effects.png").stat().st_size > 10_000


def test_tables_report_the_best_run_point_while_an_edge_step_is_pending(tmp_path: Path) -> None:
    from benchmarks.study import choose, reported_point, results_table

    study, arm = grid_study(tmp_path, '{ "train.lr" = [1e-3, 2e-3] }')
    for point, score in (("train.lr=0.001", 0.5), ("train.lr=0.002", 0.6)):
        write_run(study.grid_dir(arm, 0, (point,)), [0.3, score], validation=[0.3, score])
    assert choose(study, arm) is None  # 4e-3 must run before the choice stands
    assert reported_point(study, arm) == ("train.lr=0.002",)
    assert "train.lr=0.002 (**edge step pending**" in results_table(study)


def test_runs_saved_before_a_setting_existed_still_pair_and_group(tmp_path: Path) -> None:
    """A run saved by an older fedlora lacks the settings added since (their defaults keep its
    behaviour): it still pairs by seed with a newer run of the same layout, and ``fedlora
    report`` draws it in the same arm as a newer run of the same config."""
    from benchmarks.study import claims_table
    from fedlora.config import load_config
    from fedlora.report import arms_of, read_run

    study, fedit, ffa = two_arm_study(
        tmp_path,
        "versions",
        3,
        "FFA",
        '[[claims]]\nclaim = "FFA beats FedIT"\narm = "FFA"\nreference = "FedIT"\n',
    )
    for seed in range(3):
        for arm, name, final in ((fedit, "fedit", REFERENCE[seed]), (ffa, "ffa", ARM[seed])):
            out = study.run_dir(arm, seed)
            write_run(out, [0.3, 0.6, 0.8, final, final, final, final], seed=seed)
            config = load_config(TINY / "fedit.toml", [f"experiment.seed={seed}"])
            saved = config.model_dump(mode="json", exclude_none=True)
            saved["method"]["name"] = name
            if name == "ffa":  # saved before these data settings existed
                for key in ("chat_template", "list_choices", "truncation"):
                    del saved["data"][key]
            (out / "config.toml").write_text(tomli_w.dumps(saved))
    row = next(line for line in claims_table(study).splitlines() if "| FFA beats FedIT |" in line)
    assert "paired, 3 seeds" in row, row

    old = [read_run(study.run_dir(ffa, seed)) for seed in range(3)]
    new = [read_run(study.run_dir(fedit, seed)) for seed in range(3)]
    for run in old:  # the same config as a newer FFA-LoRA run: one arm
        run.config["method"]["name"] = "fedit"
    assert len(arms_of([*old, *new])) == 1


# -- the verdict table at the top of docs/results.md -------------------------------------------


def test_the_verdict_table_finds_every_claim_it_names(tmp_path: Path) -> None:
    """Every row's claims exist in their study files (a renamed claim is a KeyError), and with
    no runs every cell says why it has no verdict."""
    from benchmarks.verdicts import ROWS, progress, study, table

    lines = table(tmp_path).splitlines()[2:]
    assert len(lines) == len(ROWS)
    for row, line in zip(ROWS, lines, strict=True):
        assert line.startswith(f"| {row.claim} |")
        assert line.count("fewer than two seeds on a side") == (2 if row.language_model else 1)
    # With no runs, every study behind the table waits on each of its grid arms.
    for line in progress(tmp_path).splitlines()[2:]:
        name = line.split("`")[1]
        grid_arms = [arm.label for arm in study(name, tmp_path).arms if arm.grid]
        assert line.endswith(f"| {', '.join(grid_arms) or '-'} |"), line


def test_the_verdict_table_says_where_encoder_and_language_model_disagree() -> None:
    from benchmarks.verdicts import agreement
    from fedlora.convergence import Effect, Verdict

    def judged(outcome: str, effect: float, se: float) -> Verdict:
        return Verdict(outcome, Effect(effect, se, 4, 5, True), "")  # type: ignore[arg-type]

    above, below = judged("reproduced", 0.03, 0.005), judged("not reproduced", -0.03, 0.005)
    assert agreement(above, judged("reproduced", 0.01, 0.002)) == "agree"
    assert agreement(above, below) == "**disagree**"
    assert agreement(above, None) == "-"
    # Both undecided (not plateaued) but each clearly off zero, in opposite directions.
    assert agreement(judged("inconclusive", 0.03, 0.005), judged("inconclusive", -0.03, 0.005)) == (
        "**disagree** (opposite effects)"
    )
    assert agreement(above, judged("inconclusive", -0.01, 0.02)) == "not yet decided on both"
