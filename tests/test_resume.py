"""A run killed with SIGKILL mid-round and resumed ends exactly where an uninterrupted run does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from fedlora.checkpoint import load_checkpoint
from tests.conftest import TINY, timeless_metrics

# Long enough rounds that a kill right after a checkpoint lands inside the next round.
SLOW = ["--set", "experiment.rounds=4", "--set", "train.local_steps=25", "--quiet"]


def fedlora(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedlora",
            "run",
            str(TINY / "fedit.toml"),
            "--out",
            str(out),
            *SLOW,
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


metrics = timeless_metrics


def test_sigkill_mid_round_then_resume_matches_uninterrupted(tmp_path: Path) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    reference = fedlora(whole)

    victim = fedlora(killed)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        checkpoint = (
            load_checkpoint(killed) if (killed / "checkpoint.safetensors").exists() else None
        )
        if checkpoint is not None and checkpoint.completed_rounds >= 1:
            break
        time.sleep(0.05)
    else:
        victim.kill()
        raise AssertionError("the run never completed a round")
    time.sleep(0.3)  # well inside the next round
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    interrupted_at = load_checkpoint(killed).completed_rounds
    assert 1 <= interrupted_at < 4, "the kill must land before the run finished"
    assert not (killed / "adapter").exists()

    resumed = fedlora(killed, "--resume")
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    assert f"resuming after round {interrupted_at}" in output
    reference.communicate(timeout=600)
    assert reference.returncode == 0

    assert metrics(killed) == metrics(whole)
    first = load_file(whole / "adapter" / "adapter_model.safetensors")
    second = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first)
    ledger_whole = (whole / "ledger.jsonl").read_text()
    assert (killed / "ledger.jsonl").read_text() == ledger_whole


def test_resume_without_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    code, output = run_cli(
        "run", str(TINY / "fedit.toml"), "--out", str(tmp_path / "none"), "--resume"
    )
    assert code == 2 and "no checkpoint" in output
