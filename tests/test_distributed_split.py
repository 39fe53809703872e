"""DLoRA on two real processes (``--engine distributed --nproc 2 --observer``): rank 0 the cloud
with the frozen base, rank 1 the edge hosting both users of configs/tiny/dlora.toml, rank 0 also
the observer that receives the users' state. Every activation and gradient crosses between the
processes; the run must be the in-process split engine's run. (The deployment mode, where the
cloud is sent nothing but the protocol, on 2 and 3 processes: tests/test_deployment.py.)

Tolerance: none. Adapters, metrics (loss, accuracy, F1), the ledger and the per-step and
per-module traffic must be bit-identical to the in-process run with the same seed: both processes
run the same ops in the same order as the one process does (the cloud's base forward and backward,
the device's LoRA products, loss and AdamW step), on the same decoded safetensors bytes, with the
base's dropout seeded per user block on the cloud exactly as in one process, and with one
intra-op thread per rank (the reference runs with one thread too; see tests/test_distributed.py).

The tiny config is kept as is (3 rounds of 6 steps per user, Kill-and-Revive every 4 steps): the
rounds take well under a second each, so a launch's time is its two processes starting up, and
the schedule still kills, uploads factors and revives modules.
"""

from __future__ import annotations

import csv
from pathlib import Path

from fedlora.checkpoint import load_checkpoint
from fedlora.config import load_config
from fedlora.engines.launch import layout_notes
from tests.conftest import TINY, run_cli
from tests.frames import received, tensor_keys
from tests.test_distributed import assert_same_run, finish, kill_mid_run, launch, reference

CONFIG = "dlora.toml"
# Option (b): the device still computes killed modules' forward, so x and u of killed modules
# cross too (train=False requests); the default, option (a), uploads their factors instead.
KILLED_ON_EDGE = ["--set", "method.killed_forward=edge"]
# Written by the split engine beside the usual run files; equal text means equal bytes per step,
# module and direction, equal schedules and equal totals.
SPLIT_FILES = ("schedule.json", "accounting.json", "traffic.csv")


def assert_same_split_run(first: Path, second: Path, steps_text: bool = True) -> None:
    """The usual files (metrics, ledger, every user's adapter) and the split engine's own.
    ``steps.csv`` of a resumed run holds the checkpointed rows as floats ("1.0" for 1), as it
    does in one process, so there it is compared by value."""
    assert_same_run(first, second)
    for name in SPLIT_FILES:
        assert (first / name).read_text() == (second / name).read_text(), name
    if steps_text:
        assert (first / "steps.csv").read_text() == (second / "steps.csv").read_text()
    else:
        assert steps(first) == steps(second)


def steps(run: Path) -> list[dict[str, float]]:
    with (run / "steps.csv").open() as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def test_dlora_on_two_processes_matches_the_simulation(tmp_path: Path) -> None:
    out, log, frames = tmp_path / "two", tmp_path / "two.log", tmp_path / "frames"
    frames.mkdir()
    record = {"FEDLORA_RECORD_FRAMES": str(frames)}
    run = launch(CONFIG, out, log, "--nproc", "2", "--observer", env=record)
    expected = reference(CONFIG, tmp_path / "one")  # computed here while the ranks run
    output = finish(run, log)
    assert "rank 0 is the cloud" in " ".join(output.split()), output
    assert_same_split_run(expected, out)
    # The audit of tests/test_deployment.py sees what the observer is sent: users' adapters.
    assert any(".lora_B." in key for key in tensor_keys(received(frames, 0)))
    rows = steps(out)  # 2 users x 3 rounds x 6 steps, every one with messages both ways
    assert len(rows) == 36
    assert all(row["bytes_up"] > 0 and row["bytes_down"] > 0 for row in rows)


def test_killed_cloud_stops_the_edge_then_resume_matches(tmp_path: Path) -> None:
    out, log = tmp_path / "killed", tmp_path / "killed.log"
    run = launch(CONFIG, out, log, "--nproc", "2", "--observer", *KILLED_ON_EDGE)
    expected = reference(CONFIG, tmp_path / "one", *KILLED_ON_EDGE)
    kill_mid_run(run, out, log, rank=0)  # the cloud, while the edge is mid-round
    completed = load_checkpoint(out).completed_rounds
    assert 1 <= completed < 3, "the kill must land before the run finished"
    assert not (out / "adapters").exists()

    again = ("--nproc", "2", "--resume", "--observer", *KILLED_ON_EDGE)
    resumed = finish(launch(CONFIG, out, log, *again), log)
    assert f"resuming after round {completed}" in resumed
    assert_same_split_run(expected, out, steps_text=False)


def test_split_needs_at_least_two_processes(tmp_path: Path) -> None:
    args = ["--out", str(tmp_path / "x"), "--engine", "distributed", "--nproc", "1"]
    code, output = run_cli("run", str(TINY / CONFIG), *args)
    text = " ".join(output.split())
    assert code == 2, output
    assert "needs at least --nproc 2 (rank 0 is the cloud" in text, output
    assert "not 1; for one process use --engine simulation" in text, output
    assert not (tmp_path / "x").exists()


def test_the_launcher_says_what_runs_where() -> None:
    config = load_config(TINY / CONFIG, [])  # two users
    roles = (
        "rank 0 is the cloud (frozen base model, writes the run directory); ranks 1..N-1 are "
        "edges (data, adapters, head, loss and optimizer of the users dealt to them)"
    )
    assert layout_notes(config, 2) == layout_notes(config, 3) == [roles]
    assert layout_notes(config, 4) == ["2 clients on 4 ranks: ranks 3 host no client and stay idle"]
