"""The distributed engine with real processes on localhost: same results as the in-process
engine, a killed worker stops the run with an error naming it, and --resume finishes the run.
The observer mode (``--observer``, rank 0 also receives every client's state) is checked
here; the deployment mode's own proofs are in tests/test_deployment.py. A global model is
evaluated on rank 0 in both modes, so the fault test (FedIT) runs as a deployment.

Tolerance: none. Results must be bit-identical to the in-process run with the same seed, because
every process runs the same ops in the same order: the same base model and initial adapter built
from the seed, each client's steps with RNG derived from (seed, round, client), the server's
aggregation (or a node's mixing) in the same client order on the same decoded bytes. The one
condition is the same intra-op thread count: ranks run with one thread each, and a kernel that
splits a reduction over two threads sums in another order (we measured ~6e-8 differences in the
adapter at the default two threads), so the reference runs with one thread too.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedlora.checkpoint import load_checkpoint
from fedlora.config import load_config
from fedlora.engines.launch import (
    LaunchError,
    free_port,
    layout_notes,
    run_forked_rank,
    watch,
)
from tests.conftest import TINY, run_cli, timeless_metrics, trained
from tests.frames import received, tensor_keys
from tests.test_privacy_dp import BUDGET_STOP

# Four rounds of 20 steps, optimizer states kept on the clients: there are worker-held states to
# gather into checkpoints, and rounds long enough for a kill to land inside the run.
FEDIT = [
    "--set",
    "experiment.rounds=4",
    "--set",
    "train.local_steps=20",
    "--set",
    "train.keep_optimizer_state=true",
]
LAUNCH_TIMEOUT = 420  # seconds for a whole launched run (4 ranks start on 2 busy cores)


@contextmanager
def one_thread() -> Iterator[None]:
    """The ranks' intra-op thread count, for an in-process reference (see the docstring)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def reference(config: str, out: Path, *extra: str) -> Path:
    """The in-process engine's run of the same config and seed."""
    with one_thread():
        code, output = run_cli("run", str(TINY / config), "--out", str(out), "--quiet", *extra)
    assert code == 0, output
    return out


@pytest.fixture(scope="module")
def fedit_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return reference("fedit.toml", tmp_path_factory.mktemp("reference") / "fedit", *FEDIT)


def launch(
    config: str, out: Path, log: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """``fedlora run --engine distributed`` in a new process, its output into ``log``;
    ``env``: added to the environment every rank inherits."""
    command = [sys.executable, "-m", "fedlora", "run", str(TINY / config), "--out", str(out)]
    command += ["--quiet", "--engine", "distributed", *extra]
    with log.open("w") as handle:  # the child keeps its own descriptor
        return subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )


def finish(process: subprocess.Popen, log: Path) -> str:
    try:
        process.wait(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    output = log.read_text()
    assert process.returncode == 0, output
    return output


metrics = timeless_metrics


def assert_same_run(first: Path, second: Path) -> None:
    """Metrics (but timings), ledger and every exported adapter, bit for bit."""
    assert metrics(first) == metrics(second)
    assert (first / "ledger.jsonl").read_text() == (second / "ledger.jsonl").read_text()
    adapters = sorted(p.relative_to(first) for p in first.rglob("adapter_model.safetensors"))
    assert adapters, "the run exported no adapter"
    assert adapters == sorted(p.relative_to(second) for p in second.rglob(adapters[0].name))
    for path in adapters:
        a, b = load_file(first / path), load_file(second / path)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"{path} differs"


def kill_mid_run(run: subprocess.Popen, out: Path, log: Path, rank: int) -> None:
    """SIGKILL ``rank`` once the first checkpoint exists; the launcher must stop the others
    within 30 s with an error naming the rank."""
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while not (out / "checkpoint.safetensors").exists():
        assert run.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    pids = dict(
        item.split(" pid ")
        for item in log.read_text().split("ranks: ")[1].splitlines()[0].split(", ")
    )
    os.kill(int(pids[str(rank)]), signal.SIGKILL)
    killed_at = time.monotonic()
    run.wait(timeout=60)
    stopped_after = time.monotonic() - killed_at
    output = log.read_text()
    assert run.returncode == 1, output
    assert f"rank {rank} (pid {pids[str(rank)]}) was killed by SIGKILL" in output
    assert stopped_after < 30, f"the other ranks took {stopped_after:.1f} s to stop"


def test_fedit_and_declora_on_four_processes_match_the_simulation(
    tmp_path: Path, fedit_reference: Path
) -> None:
    # Both launches run while the in-process Dec-LoRA reference is computed here.
    observe = ("--nproc", "4", "--observer")
    fedit = launch("fedit.toml", tmp_path / "fedit", tmp_path / "fedit.log", *observe, *FEDIT)
    frames = tmp_path / "frames"
    frames.mkdir()
    record = {"FEDLORA_RECORD_FRAMES": str(frames)}
    declora = launch("declora.toml", tmp_path / "dec", tmp_path / "dec.log", *observe, env=record)
    declora_reference = reference("declora.toml", tmp_path / "dec_ref")
    for process, name in ((fedit, "fedit"), (declora, "dec")):
        log = finish(process, tmp_path / f"{name}.log")
        assert "ranks: 0 pid" in log and "3 pid" in log
        assert "--observer: after every round the workers send rank 0" in " ".join(log.split())
    assert_same_run(fedit_reference, tmp_path / "fedit")
    assert_same_run(declora_reference, tmp_path / "dec")
    # The audit of tests/test_deployment.py sees what the observer is sent: other nodes' state.
    assert any(key.startswith("model.") for key in tensor_keys(received(frames, 0)))


def test_killed_worker_stops_the_run_then_resume_matches(
    tmp_path: Path, fedit_reference: Path
) -> None:
    out, log = tmp_path / "killed", tmp_path / "killed.log"
    run = launch("fedit.toml", out, log, "--nproc", "3", "--observer", *FEDIT)
    kill_mid_run(run, out, log, rank=1)
    completed = load_checkpoint(out).completed_rounds
    assert 1 <= completed < 4, "the kill must land before the run finished"
    assert not (out / "adapter").exists()

    # An observer's checkpoint holds the worker-held states, so it resumes on another number
    # of processes.
    again = ("--nproc", "2", "--resume", "--observer")
    resumed = finish(launch("fedit.toml", out, log, *again, *FEDIT), log)
    assert f"resuming after round {completed}" in resumed
    assert_same_run(fedit_reference, out)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--engine", "distributed", "--nproc", "0"], "--nproc must be at least 1, got 0"),
        (["--engine", "distributed"], "needs --nproc N, or a launcher (torchrun)"),
        (["--nproc", "2"], "--nproc needs --engine distributed"),
        (["--engine", "mpi"], "--engine must be simulation or distributed"),
        (["--observer"], "--observer needs --engine distributed"),
    ],
)
def test_cli_errors(tmp_path: Path, args: list[str], message: str) -> None:
    code, output = run_cli("run", str(TINY / "fedit.toml"), "--out", str(tmp_path / "x"), *args)
    assert code == 2 and message in " ".join(output.split()), output


def test_idle_ranks_are_named() -> None:
    fedit = load_config(TINY / "fedit.toml", [])  # 4 clients on ranks 1-4, rank 0 the server
    declora = load_config(TINY / "declora.toml", [])  # 4 nodes on ranks 0-3
    assert layout_notes(fedit, 7) == [
        "4 clients on 7 ranks: ranks 5, 6 host no client and stay idle"
    ]
    assert layout_notes(declora, 6) == [
        "4 clients on 6 ranks: ranks 4, 5 host no client and stay idle"
    ]
    assert layout_notes(fedit, 5) == []
    assert layout_notes(declora, 1) == ["one process: the in-process gossip engine runs in it"]
    assert layout_notes(fedit, 5, observer=True)[0].startswith("--observer: after every round")


def test_nproc_must_agree_with_an_external_launcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under torchrun the environment decides the ranks; a different --nproc is a mistake."""
    world = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    for name, value in world.items():
        monkeypatch.setenv(name, value)
    args = ["--out", str(tmp_path / "x"), "--engine", "distributed", "--nproc", "3"]
    code, output = run_cli("run", str(TINY / "fedit.toml"), *args)
    assert code == 2 and "--nproc 3, but the launcher started WORLD_SIZE=2" in output, output


def test_under_torchrun_the_ranks_join_from_the_environment_and_match_the_simulation(
    tmp_path: Path, fedit_run: Path
) -> None:
    """torchrun, torch's own launcher (the one for several machines), starts three fresh ranks;
    each finds RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set and joins the group, and the
    run equals the in-process one."""
    out = tmp_path / "torchrun"
    command = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", "3"]
    command += ["--master-port", str(free_port()), "-m", "fedlora", "run", str(TINY / "fedit.toml")]
    command += ["--out", str(out), "--quiet", "--engine", "distributed"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_same_run(out, fedit_run)  # the in-process run at one thread, as the ranks run


def exit_with(code: int) -> None:
    sys.exit(code)


def test_watch_names_a_rank_that_exits_with_an_error_and_stops_the_others() -> None:
    """The launcher's watch over real forked ranks: one exits with the CLI's code 2 while
    another would run for a minute; the error names the failed rank and the other is stopped
    within the grace period."""
    context = multiprocessing.get_context("fork")
    ranks = [
        context.Process(target=time.sleep, args=(60,)),
        context.Process(target=exit_with, args=(2,)),
    ]
    for rank in ranks:
        rank.start()
    began = time.monotonic()
    with pytest.raises(LaunchError) as error:
        watch(ranks, grace=5.0)
    assert str(error.value).startswith(f"rank 1 (pid {ranks[1].pid}) exited with code 2.")
    assert "--resume continues from the last completed round" in str(error.value)
    assert not ranks[0].is_alive() and ranks[0].exitcode == -signal.SIGTERM
    assert time.monotonic() - began < 30

    finished = [context.Process(target=exit_with, args=(0,)) for _ in range(2)]
    for rank in finished:
        rank.start()
    watch(finished)
    assert [rank.exitcode for rank in finished] == [0, 0]


@pytest.mark.parametrize("fresh", [False, True], ids=["forked", "exec"])
def test_a_forked_rank_runs_the_cli_with_its_environment_and_exits_with_its_code(
    tmp_path: Path, fresh: bool
) -> None:
    """Both ways a rank runs (in the fork on the CPU, exec'd afresh on a GPU) run the ``fedlora``
    command with the rank's variables and exit with its code, which the launcher's watch reads:
    a config that is not there is the CLI's usage error (2), one that is runs (0)."""
    context = multiprocessing.get_context("fork")
    missing = tmp_path / "missing.toml"
    environment = {"FEDLORA_TOKEN_CACHE": str(tmp_path / "cache")}
    runs = {
        2: ["run", str(missing), "--out", str(tmp_path / "a"), "--quiet"],
        0: ["run", str(TINY / "fedit.toml"), "--out", str(tmp_path / "b"), "--quiet"],
    }
    for code, arguments in runs.items():
        rank = context.Process(target=run_forked_rank, args=(arguments, environment, fresh))
        rank.start()
        rank.join(LAUNCH_TIMEOUT)
        assert rank.exitcode == code
    assert (tmp_path / "b" / "metrics.jsonl").is_file()
    assert any((tmp_path / "cache").rglob("*.safetensors")), "the rank's environment was not set"


FAULTS = [
    "--set",
    "experiment.rounds=3",
    "--set",
    "federation.dropout=0.3",
    "--set",
    "attack.clients=[2]",
    "--set",
    "attack.kind='nan'",
]


def test_dropouts_and_refused_replies_match_the_simulation_across_processes(
    tmp_path: Path,
) -> None:
    """Workers skip the same dropped clients the server skips, the server refuses the same
    poisoned replies: the same run, ledger rejections included, as in one process."""
    run = launch("fedit.toml", tmp_path / "dist", tmp_path / "dist.log", "--nproc", "3", *FAULTS)
    expected = reference("fedit.toml", tmp_path / "ref", *FAULTS)
    finish(run, tmp_path / "dist.log")
    assert_same_run(expected, tmp_path / "dist")
    rounds = metrics(expected)
    assert any(why == "dropout" for m in rounds for why in m.get("absent", {}).values())
    assert all(m["rejected"][0]["sender"] == "client2" for m in rounds if "rejected" in m)
    assert any("rejected" in m for m in rounds)


def test_dp_sgd_gossip_budget_stop_matches_the_simulation_across_processes(tmp_path: Path) -> None:
    """Dec-LoRA with DP-SGD on every node, stopped by privacy.max_epsilon after round 2 of 3:
    the other rank stops at the same round as rank 0 (the budget is a pure function of the
    config), every node is accounted, and the run is the in-process one bit for bit (with
    --observer: a deployment reports node metrics, not the network-averaged model's; and seeded
    noise: across processes the default is secure noise, which no two runs share)."""
    sets = [*BUDGET_STOP, "topology.per_node_eval=false", "privacy.noise_source=seeded"]
    args = [arg for value in sets for arg in ("--set", value)]
    log = tmp_path / "dist.log"
    run = launch("declora.toml", tmp_path / "dist", log, "--nproc", "2", "--observer", *args)
    expected = reference("declora.toml", tmp_path / "ref", *args)
    finish(run, tmp_path / "dist.log")
    assert_same_run(expected, tmp_path / "dist")
    rounds = trained(metrics(expected))
    assert [m["round"] for m in rounds] == [1, 2]
    assert all(len(m["epsilon_clients"]) == 4 for m in rounds)
