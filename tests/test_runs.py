"""End-to-end runs through the CLI: outputs, PEFT export, determinism, report, methods list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import (
    ONE,
    TINY,
    assert_adapter_reloads,
    read_metrics,
    run_cli,
    without_timing,
)


def test_run_directory_has_every_output(fedit_run: Path) -> None:
    for name in (
        "config.toml",
        "metrics.jsonl",
        "ledger.jsonl",
        "checkpoint.safetensors",
        "summary.md",
        "accuracy.png",
    ):
        assert (fedit_run / name).is_file(), name
    assert (fedit_run / "adapter" / "adapter_model.safetensors").is_file()
    metrics = read_metrics(fedit_run)
    assert [m["round"] for m in metrics] == [0, 1, 2]  # 0: the initial model
    assert all(0.0 <= m["accuracy"] <= 1.0 for m in metrics)
    ledger = [json.loads(line) for line in (fedit_run / "ledger.jsonl").read_text().splitlines()]
    # 4 clients x 2 rounds, one message down and one up each.
    assert len(ledger) == 16
    assert metrics[-1]["cumulative_bytes"] == sum(r["bytes"] for r in ledger)
    summary = (fedit_run / "summary.md").read_text()
    assert "business" in summary and "| 3 |" in summary  # label histogram of client 3


def test_exported_adapter_reloads_with_identical_logits(fedit_run: Path) -> None:
    assert_adapter_reloads(fedit_run)


def test_same_config_and_seed_give_the_same_numbers(fedit_run: Path, tmp_path: Path) -> None:
    code, output = run_cli(
        "run", str(TINY / "fedit.toml"), "--out", str(tmp_path / "again"), "--quiet", *ONE
    )
    assert code == 0, output
    assert without_timing(read_metrics(tmp_path / "again")) == without_timing(
        read_metrics(fedit_run)
    )
    from safetensors.torch import load_file

    first = load_file(fedit_run / "adapter" / "adapter_model.safetensors")
    second = load_file(tmp_path / "again" / "adapter" / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_output_that_is_not_a_terminal_gets_one_line_a_round_and_no_progress_bars(
    tmp_path: Path,
) -> None:
    """A log (a file, a pipe, CI) gets a plain line per round; the live bars, which a log would
    only show as their last frame repeating those lines, are for terminals."""
    code, output = run_cli("run", str(TINY / "fedit.toml"), "--out", str(tmp_path / "log"), *ONE)
    assert code == 0, output
    lines = output.splitlines()
    for round_index in (0, 1, 2):
        assert sum(line.startswith(f"round {round_index}/2: ") for line in lines) == 1, output
    assert "4/4" not in output, output  # a bar's clients-done column (4 clients a round)


def test_a_different_seed_gives_different_numbers(fedit_run: Path, tmp_path: Path) -> None:
    code, _ = run_cli(
        "run",
        str(TINY / "fedit.toml"),
        "--out",
        str(tmp_path / "s1"),
        "--quiet",
        "--set",
        "experiment.seed=1",
    )
    assert code == 0
    assert (
        read_metrics(tmp_path / "s1")[-1]["train_loss"] != read_metrics(fedit_run)[-1]["train_loss"]
    )


def test_refuses_to_overwrite_a_run(fedit_run: Path) -> None:
    code, output = run_cli("run", str(TINY / "fedit.toml"), "--out", str(fedit_run), "--quiet")
    assert code == 2 and "already holds a run" in output


@pytest.mark.parametrize("method", ["centralized", "local"])
def test_reference_methods_run_end_to_end(method: str, tmp_path: Path) -> None:
    out = tmp_path / method
    code, output = run_cli("run", str(TINY / f"{method}.toml"), "--out", str(out), "--quiet")
    assert code == 0, output
    metrics = read_metrics(out)
    assert metrics[-1]["cumulative_bytes"] == 0  # nothing crosses a party boundary
    if method == "local":
        assert "accuracy_std" in metrics[-1]
        assert len(list((out / "adapters").iterdir())) == 4
    else:
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
        assert metrics[-1]["steps"] == 3


def test_causal_lm_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "llama"
    code, output = run_cli("run", str(TINY / "causal" / "fedit.toml"), "--out", str(out), "--quiet")
    assert code == 0, output
    last = read_metrics(out)[-1]
    assert {"test_loss", "perplexity", "rouge_l"} <= set(last)
    assert last["perplexity"] > 1.0 and 0.0 <= last["rouge_l"] <= 1.0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_report_compares_runs(fedit_run: Path, tmp_path: Path) -> None:
    """The table and, per metric, the curves and final-value figures a study gets (their
    contents: tests/test_report.py)."""
    other = tmp_path / "central"
    assert run_cli("run", str(TINY / "centralized.toml"), "--out", str(other), "--quiet")[0] == 0
    code, output = run_cli("report", str(fedit_run), str(other), "--out", str(tmp_path / "cmp"))
    assert code == 0, output
    text = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "(fedit)" in text and "(centralized)" in text
    for name in ("accuracy.png", "accuracy_final.png"):
        assert (tmp_path / "cmp" / name).is_file() and f"]({name})" in text


def test_methods_lists_every_registered_method() -> None:
    from fedlora.methods import registry

    code, output = run_cli("methods")
    assert code == 0
    for name in registry():
        assert name in output
    assert {"fedit", "local", "centralized"} <= set(registry())
