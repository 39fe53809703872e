"""The verdict table at the top of docs/results.md (issue 34): each seed paper's claim once,
with two columns of evidence, the encoder's (MiniLM-L6 on BBC News) and the language model's
(SmolLM2-135M-Instruct on the multiple-choice task), each with its effect and spread as the
claim's own study judges it (``benchmarks/study.py``'s rules: paired by seed where the arms
share seeds and layout, the 95% t interval against the claim's margin, inconclusive where an arm
has not plateaued, void where one did not train).

The last column says where the two columns disagree: both decided and different, or both
effects beyond their intervals in opposite directions. A claim without a language-model study
says so; one whose runs are not finished yet shows what they give so far (the seed count is in
the cell).

    python -m benchmarks.verdicts            # prints the table, then the studies' runs left
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from benchmarks.study import (
    RUNS,
    Claim,
    Study,
    claim_rows,
    final_tasks,
    grid_tasks,
    load_study,
    waiting_arms,
)
from fedlora.convergence import Verdict

STUDIES = Path(__file__).resolve().parent / "studies"


@dataclass(frozen=True)
class Evidence:
    """Where one column's evidence comes from: a study and one of its claims, by its text."""

    study: str
    claim: str


@dataclass(frozen=True)
class Row:
    claim: str
    encoder: Evidence
    language_model: Evidence | None


ROWS = (
    Row(
        "Dec-LoRA within 1 point of centralized LoRA (ring, K = 1, IID)",
        Evidence("converged_declora", "Dec-LoRA ring K=1 (IID) within 1 point of centralized"),
        None,
    ),
    Row(
        "Dec-LoRA within 1 point of centralized LoRA (ring, K = 5, IID)",
        Evidence("converged_declora", "Dec-LoRA ring K=5 (IID) within 1 point of centralized"),
        None,
    ),
    Row(
        "Dec-LoRA within 1 point of centralized LoRA (Erdős–Rényi, K = 1, IID)",
        Evidence("converged_declora", "Dec-LoRA ER K=1 (IID) within 1 point of centralized"),
        None,
    ),
    Row(
        "Dec-LoRA within 1 point of centralized LoRA (Erdős–Rényi, K = 5, IID)",
        Evidence("converged_declora", "Dec-LoRA ER K=5 (IID) within 1 point of centralized"),
        None,
    ),
    *(
        Row(
            f"Dec-LoRA within 1 point of centralized LoRA (ring, K = {k}, Dirichlet 0.5)",
            Evidence(
                "converged_declora",
                f"Dec-LoRA ring K={k} under Dir(0.5) within 1 point of centralized",
            ),
            None,
        )
        for k in (1, 5)
    ),
    *(
        Row(
            f"FSLoRA beats {baseline} at heterogeneous ranks",
            Evidence("converged_heterogeneous_ranks_long", claim),
            Evidence("llm_heterogeneous_ranks", claim),
        )
        for baseline, claim in (
            ("HetLoRA", "FSLoRA beats HetLoRA (paper: +3.7 to +4.4 points over the baselines)"),
            ("FlexLoRA", "FSLoRA beats FlexLoRA"),
            ("FLoRA", "FSLoRA beats FLoRA"),
        )
    ),
    *(
        Row(
            f"{label} beats {baseline}",
            Evidence("converged_full_weights", f"{method} beats {baseline}"),
            Evidence("llm_full_weights", f"{method} beats {baseline}"),
        )
        for label, method in (("DWA", "DWA"), ("FedFTG", "FedFTG (GaLore)"))
        for baseline in ("FedIT", "FFA-LoRA", "FlexLoRA")
    ),
    Row(
        "FFA-LoRA at least FedIT without DP (less than 1 point below)",
        Evidence("converged_full_weights", "FFA-LoRA at least FedIT (within 1 point below)"),
        Evidence("llm_full_weights", "FFA-LoRA at least FedIT (within 1 point below)"),
    ),
    Row(
        "FFA-LoRA at least FedIT under DP-SGD, ε = 6 (less than 1 point below)",
        Evidence(
            "private_ffa_vs_fedit",
            "FFA-LoRA at least FedIT under DP-SGD eps 6 (within 1 point below)",
        ),
        None,
    ),
    Row(
        "Kill-and-Revive (1/8) at parity with all modules active (within 1 point)",
        Evidence(
            "converged_dlora",
            "Kill-and-Revive 1/8 at parity (within 1 point) with all modules active",
        ),
        None,
    ),
)

DECIDED = ("reproduced", "not reproduced")


def study(name: str, root: Path) -> Study:
    return load_study(STUDIES / f"{name}.toml", root=root)


@cache
def study_claims(name: str, root: Path) -> list[tuple[Claim, Verdict]]:
    """Every claim of a study judged once, however many rows draw on it."""
    return claim_rows(study(name, root))


def judge(source: Evidence, root: Path) -> tuple[Claim, Verdict]:
    """The claim's verdict as its study gives it now."""
    for claim, judged in study_claims(source.study, root):
        if claim.claim == source.claim:
            return claim, judged
    raise KeyError(f"study {source.study} has no claim {source.claim!r}")


def cell(judged: Verdict) -> str:
    effect = judged.effect
    if effect is None:
        return f"**{judged.verdict}**: {judged.why}"
    low, high = effect.effect - effect.half_width, effect.effect + effect.half_width
    text = (
        f"**{judged.verdict}**: {100 * effect.effect:+.1f} ± {100 * effect.se:.1f} points "
        f"[{100 * low:+.1f}, {100 * high:+.1f}], {effect.statistics}"
    )
    if judged.verdict in ("inconclusive", "void") and not judged.why.startswith("95%"):
        text += f"; {judged.why}"
    return text


def agreement(encoder: Verdict, language_model: Verdict | None) -> str:
    if language_model is None:
        return "-"
    if encoder.verdict in DECIDED and language_model.verdict in DECIDED:
        return "agree" if encoder.verdict == language_model.verdict else "**disagree**"
    clear = [
        judged.effect
        for judged in (encoder, language_model)
        if judged.effect is not None and abs(judged.effect.effect) > judged.effect.half_width
    ]
    if len(clear) == 2 and (clear[0].effect > 0) != (clear[1].effect > 0):
        return "**disagree** (opposite effects)"
    return "not yet decided on both"


def table(root: Path = RUNS) -> str:
    lines = [
        "| claim | encoder (MiniLM-L6, BBC News) | language model (SmolLM2-135M, multiple choice) "
        "| the two |",
        "|---|---|---|---|",
    ]
    for row in ROWS:
        claim, encoder = judge(row.encoder, root)
        encoder_cell = f"{cell(encoder)} (`{row.encoder.study}`; {claim.metric})"
        language_model, lm_cell = None, "not studied on the language model"
        if row.language_model is not None:
            language_model = judge(row.language_model, root)[1]
            lm_cell = f"{cell(language_model)} (`{row.language_model.study}`)"
        lines.append(
            f"| {row.claim} | {encoder_cell} | {lm_cell} | {agreement(encoder, language_model)} |"
        )
    return "\n".join(lines)


def progress(root: Path = RUNS) -> str:
    """How far each study behind the table is: its runs left, as ``benchmarks/study.py`` lists
    them, and the arms whose seed runs cannot be listed until their grid is complete."""
    lines = [
        "| study | grid runs left | seed runs left | arms waiting on their grid |",
        "|---|---|---|---|",
    ]
    names = dict.fromkeys(
        source.study
        for row in ROWS
        for source in (row.encoder, row.language_model)
        if source is not None
    )
    for name in names:
        loaded = study(name, root)
        grid = sum(not (t.out / "summary.md").is_file() for t in grid_tasks(loaded))
        seeds = sum(not (t.out / "summary.md").is_file() for t in final_tasks(loaded))
        waiting = ", ".join(waiting_arms(loaded)) or "-"
        lines.append(f"| `{name}` | {grid} | {seeds} | {waiting} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=RUNS, help="the studies' run root")
    root = parser.parse_args().runs
    print(table(root), progress(root), sep="\n\n")


if __name__ == "__main__":
    main()
