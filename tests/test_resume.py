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


def saved_run(tmp_path: Path, edit) -> tuple[Path, object]:
    """A run directory holding a checkpoint file and the tiny config as ``edit`` rewrites it."""
    import tomllib

    import tomli_w

    from fedlora.checkpoint import FILE
    from fedlora.config import load_config

    config = load_config(TINY / "fedit.toml")
    data = config.model_dump(exclude_none=True)
    edit(data)
    out = tmp_path / "run"
    out.mkdir(parents=True)
    (out / FILE).write_bytes(b"")
    (out / "config.toml").write_text(tomli_w.dumps(data))
    assert tomllib.loads((out / "config.toml").read_text()) == data
    return out, config


def test_resume_accepts_a_config_saved_before_a_setting_existed(tmp_path: Path) -> None:
    """A run saved by a fedlora without ``eval.own_test_share`` resumes: the missing key takes its
    default, the same value the current config holds."""
    from fedlora import rundir

    out, config = saved_run(tmp_path, lambda data: data["eval"].pop("own_test_share"))
    assert "own_test_share" not in (out / "config.toml").read_text()
    rundir.prepare(out, config, resume=True)
    assert "own_test_share = false" in (out / "config.toml").read_text()


def test_resume_under_another_config_names_the_keys(tmp_path: Path) -> None:
    import pytest

    from fedlora import rundir
    from fedlora.config import ConfigError

    def edit(data: dict) -> None:
        data["train"]["lr"] = data["train"]["lr"] * 2
        data["experiment"]["rounds"] += 1

    out, config = saved_run(tmp_path, edit)
    with pytest.raises(ConfigError, match=r"in experiment\.rounds, train\.lr; resume with"):
        rundir.prepare(out, config, resume=True)
    out2, config = saved_run(tmp_path / "b", lambda data: data["train"].update(speed=1))
    with pytest.raises(ConfigError, match=r"no longer valid: train\.speed"):
        rundir.prepare(out2, config, resume=True)
