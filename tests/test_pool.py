"""Clients trained by forked worker processes (``compute.workers``) against the in-process
engine: bit-identical at the same thread count per client, for every server method's tiny
config, among them per-client stores and dropouts (FedSA-LoRA), kept optimizer states
(FedFTG's GaLore), DP-SGD (FFA-LoRA) and a moved base (FLoRA); a killed worker; the
refusals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedlora.checkpoint import load_checkpoint
from fedlora.compute import cores, pool_pays, pool_size
from fedlora.config import load_config
from tests.conftest import (
    ADAPTIVE_CENTRAL,
    ONE,
    TINY,
    read_metrics,
    run_cli,
    timeless_metrics,
    trained,
)

TWO_WORKERS = ("--set", "compute.workers=2")
OTHER_SERVER_METHODS = (
    "dwa",
    "fedex",
    "fedftg_code_compat",
    "fedsb",
    "flexlora",
    "frlora",
    "fslora",
    "fslora_code_compat",
    "hetlora",
    "local",
    "lora_fair",
    "rolora",
)


def run(config: str, out: Path, *overrides: str) -> Path:
    code, output = run_cli(
        "run", str(TINY / config), "--out", str(out), "--quiet", *ONE, *overrides
    )
    assert code == 0, output
    return out


def adapters(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every PEFT adapter a run exported (the global one, and each client's own)."""
    return {
        str(path.parent.relative_to(run_dir)): load_file(path)
        for path in sorted(run_dir.rglob("adapter_model.safetensors"))
    }


def assert_identical(pooled: Path, alone: Path) -> None:
    assert timeless_metrics(pooled) == timeless_metrics(alone)
    assert (pooled / "ledger.jsonl").read_text() == (alone / "ledger.jsonl").read_text()
    ours, theirs = adapters(pooled), adapters(alone)
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        assert ours[name].keys() == theirs[name].keys()
        assert all(torch.equal(ours[name][k], theirs[name][k]) for k in ours[name]), name


@pytest.mark.parametrize(
    ("config", "overrides"),
    [
        ("fedit.toml", ()),
        # per-client stores (B and head) that live with the server between rounds; a seeded
        # dropout, so some clients get no task at all
        ("fedsa.toml", ("--set", "federation.dropout=0.3", "--set", "experiment.rounds=3")),
        ("fedftg.toml", ()),  # GaLore's optimizer state kept per client across rounds
        # DP-SGD's per-example clipping and seeded noise, in the worker
        ("ffa.toml", ("--set", "privacy.mechanism=dp_sgd", "--set", "privacy.noise_multiplier=1")),
        ("flora.toml", ()),  # every round's clients train on the base moved by the merges
        # every other server method: what a client does may read only its download and store
        *((f"{name}.toml", ()) for name in OTHER_SERVER_METHODS),
    ],
)
def test_worker_processes_give_the_in_process_run_bit_for_bit(
    tmp_path: Path, config: str, overrides: tuple[str, ...]
) -> None:
    alone = run(config, tmp_path / "alone", *overrides)
    pooled = run(config, tmp_path / "pooled", *overrides, *TWO_WORKERS)
    assert_identical(pooled, alone)
    if "federation.dropout=0.3" in overrides:  # some clients did drop (they got no task)
        assert any(r.get("absent") for r in trained(read_metrics(pooled)))
    assert "## Worker processes" in (pooled / "summary.md").read_text()
    assert "## Worker processes" not in (alone / "summary.md").read_text()


@pytest.mark.parametrize(
    ("config", "overrides", "says"),
    [
        ("dlora.toml", (), "'split' engine"),
        ("fedit.toml", ("--engine", "distributed"), "--nproc"),
    ],
)
def test_workers_are_refused_where_they_cannot_run(
    tmp_path: Path, config: str, overrides: tuple[str, ...], says: str
) -> None:
    code, output = run_cli(
        "run", str(TINY / config), "--out", str(tmp_path), *overrides, *TWO_WORKERS
    )
    assert code == 2, output
    assert "compute.workers = 2" in output and says in output
    assert "Traceback" not in output


def test_flower_apps_refuse_workers(tmp_path: Path) -> None:
    code, output = run_cli(
        "flower-app", str(TINY / "fedit.toml"), "--out", str(tmp_path), *TWO_WORKERS
    )
    assert code == 2 and "compute.workers = 2" in output and "SuperNodes" in output, output


def test_workers_must_be_a_positive_count_or_auto(tmp_path: Path) -> None:
    code, output = run_cli(
        "run", str(TINY / "fedit.toml"), "--out", str(tmp_path), "--set", "compute.workers=0"
    )
    assert code == 2 and "workers" in output and "'auto'" in output, output


def test_a_killed_worker_stops_the_run_clearly_and_resume_finishes_it_exactly(
    tmp_path: Path,
) -> None:
    """A worker process killed (SIGKILL, as the out-of-memory killer does) after round 1: the
    run stops with exit code 1 and a message naming the worker, its checkpoint kept; a rerun
    with --resume finishes it, equal to the uninterrupted run."""
    longer = ("--set", "experiment.rounds=3", "--set", "train.local_steps=30")
    alone = run("fedit.toml", tmp_path / "alone", *longer)
    out = tmp_path / "pooled"
    command = [sys.executable, "-m", "fedlora", "run", str(TINY / "fedit.toml"), "--out"]
    command += [str(out), "--quiet", *ONE, *longer, *TWO_WORKERS]
    victim = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (out / "checkpoint.safetensors").exists() or load_checkpoint(out) is None:
        assert victim.poll() is None and time.monotonic() < deadline, "no round completed"
        time.sleep(0.05)
    workers = subprocess.run(
        ["pgrep", "-P", str(victim.pid)], capture_output=True, text=True, check=False
    ).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[0]), signal.SIGKILL)
    output, _ = victim.communicate(timeout=300)
    assert victim.returncode == 1, output
    assert f"worker process {workers[0]} exited" in output and "--resume" in output
    assert "Traceback" not in output
    assert 1 <= load_checkpoint(out).completed_rounds < 3
    code, resumed = run_cli(
        "run", str(TINY / "fedit.toml"), "--out", str(out), "--quiet", "--resume",
        *ONE, *longer, *TWO_WORKERS,
    )  # fmt: skip
    assert code == 0, resumed
    assert_identical(out, alone)


def makespan(clients: int, workers: int) -> int:
    """Naive schedule: each client, in turn, to the least-loaded single-thread worker."""
    loads = [0] * workers
    for _ in range(clients):
        loads[loads.index(min(loads))] += 1
    return max(loads)


@pytest.mark.parametrize("cores", [2, 4, 8])
def test_auto_pools_exactly_where_the_schedule_beats_threads(cores: int) -> None:
    """``auto``'s rule against a simulated schedule: the pool's rounds take the longest
    worker's count of single-thread client times; one process takes n client times at the
    measured intra-op speed-up, 0.9 per core."""
    for clients in range(1, 40):
        expected = clients / (0.9 * cores) > makespan(clients, cores)
        assert pool_pays(clients, cores) == expected, (clients, cores)
    assert pool_pays(2, 2) and pool_pays(10, 2) and pool_pays(11, 2)
    assert not pool_pays(3, 2) and not pool_pays(9, 2) and not pool_pays(1, 2)
    assert not pool_pays(10, 1)


def test_auto_resolves_from_the_clients_per_round() -> None:
    cpu = torch.device("cpu")
    here = cores()
    for per_round in (1, 2, 3, 4):
        config = load_config(
            TINY / "fedit.toml",
            [f"federation.clients_per_round={per_round}", "compute.workers=auto"],
        )
        workers, threads = pool_size(config, cpu)
        if pool_pays(per_round, here):
            assert (workers, threads) == (here, 1)
        else:
            assert (workers, threads) == (1, here)


@pytest.mark.parametrize(
    ("config", "overrides"),
    [
        # the masking protocol's parties run in the server's process; the pool trains them
        ("fedit.toml", ("--set", "privacy.secure_aggregation=true")),
        # seeded DP-SGD noise in the workers, as in one process
        ("ffa.toml", ("--set", "privacy.mechanism=dp_sgd", "--set", "privacy.noise_multiplier=1")),
        # secure aggregation of central-DP updates
        (
            "fedit.toml",
            ("--set", "privacy.secure_aggregation=true",
             *(arg for item in ADAPTIVE_CENTRAL for arg in ("--set", item))),
        ),
    ],
)  # fmt: skip
def test_auto_workers_with_privacy_give_the_in_process_run(
    tmp_path: Path, config: str, overrides: tuple[str, ...]
) -> None:
    """``workers = "auto"`` takes the pool for 4 clients on 2 cores. With secure aggregation
    that once ended in a ``KeyError``; now the pool runs it, bit for bit as one process."""
    auto = ("--set", "compute.workers='auto'", "--set", "experiment.rounds=2")
    alone = run(config, tmp_path / "alone", *overrides, *auto[2:], "--set", "compute.workers=1")
    pooled = run(config, tmp_path / "auto", *overrides, *auto)
    if pool_pays(4, cores()):
        assert "## Worker processes" in (pooled / "summary.md").read_text()
    assert_identical(pooled, alone)


@pytest.mark.parametrize("config", ["declora.toml", "dlora.toml"])
def test_auto_workers_keep_gossip_and_the_split_in_one_process(tmp_path: Path, config: str) -> None:
    """``auto`` takes the pool for server rounds only: gossip runs on it when asked by count,
    the split not at all."""
    code, output = run_cli(
        "run", str(TINY / config), "--out", str(tmp_path), "--quiet",
        "--set", "compute.workers='auto'", "--set", "experiment.rounds=1",
    )  # fmt: skip
    assert code == 0, output
    assert "## Worker processes" not in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize(
    "overrides",
    [
        (),
        # CHOCO-gossip with 4-bit messages: the estimates live in the nodes' stores
        ("--set", "topology.quantize_bits=4", "--set", "topology.error_feedback=true"),
    ],
)
def test_gossip_on_worker_processes_gives_the_in_process_run_bit_for_bit(
    tmp_path: Path, overrides: tuple[str, ...]
) -> None:
    """Dec-LoRA's local steps on two workers, the exchange and mixing in the server's
    process: the same metrics, ledger and adapters as every node in one process."""
    alone = run("declora.toml", tmp_path / "alone", *overrides)
    pooled = run("declora.toml", tmp_path / "pooled", *overrides, *TWO_WORKERS)
    assert_identical(pooled, alone)
    assert "## Worker processes" in (pooled / "summary.md").read_text()
