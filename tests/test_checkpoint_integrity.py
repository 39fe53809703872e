"""Checkpoints that cannot rot silently (issue 10, item 5): every way a checkpoint can be
damaged gives one clear error naming the file (exit 2), and a run killed while it writes a
checkpoint resumes to exactly the uninterrupted result."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fedlora.checkpoint import FILE, PARTIAL, Checkpoint, load_checkpoint, save_checkpoint
from tests.conftest import ONE, TINY, read_metrics, run_cli, without_timing

FEDIT = str(TINY / "fedit.toml")


@pytest.fixture
def run_copy(fedit_run: Path, tmp_path: Path) -> Path:
    """A private copy of the session's run_copy tiny FedIT run, to damage."""
    copy = tmp_path / "run"
    shutil.copytree(fedit_run, copy)
    return copy


def resume(run: Path) -> tuple[int, str]:
    code, output = run_cli("run", FEDIT, "--out", str(run), "--quiet", "--resume", *ONE)
    return code, " ".join(output.split())


def test_a_truncated_checkpoint_is_refused(run_copy: Path) -> None:
    path = run_copy / FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    code, output = resume(run_copy)
    assert code == 2 and "Traceback" not in output
    assert f"checkpoint {path} is unreadable (truncated" in output


def test_a_flipped_bit_is_detected(run_copy: Path) -> None:
    path = run_copy / FILE
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x10  # inside the tensor data, after the header
    path.write_bytes(bytes(data))
    code, output = resume(run_copy)
    assert code == 2
    assert f"checkpoint {path} is corrupted: its content hash does not match" in output


def test_a_foreign_safetensors_file_is_refused(run_copy: Path) -> None:
    save_file({"weight": torch.ones(3)}, str(run_copy / FILE))
    code, output = resume(run_copy)
    assert code == 2 and "is not a fedlora checkpoint" in output


def write_valid(run: Path, method: dict[str, torch.Tensor], stores: dict | None = None) -> None:
    """A well-formed, correctly hashed checkpoint with the given content."""
    save_checkpoint(run, Checkpoint(1, method, stores or {}, {}, [], []))


def test_an_unknown_key_group_is_refused(run_copy: Path) -> None:
    tensors = {"method/x": torch.ones(2), "bogus/y": torch.zeros(1)}
    from fedlora.checkpoint import FORMAT, digest

    metadata = {"format": FORMAT, "completed_rounds": "1", "metrics": "[]", "ledger": "[]"}
    metadata["sha256"] = digest(tensors, metadata)
    save_file(tensors, str(run_copy / FILE), metadata=metadata)
    code, output = resume(run_copy)
    assert code == 2 and "key 'bogus/y' is under an unknown group" in output


def test_a_checkpoint_of_another_shape_is_refused(run_copy: Path) -> None:
    saved = load_checkpoint(run_copy)
    assert saved is not None
    name = next(k for k in saved.method if ".lora_A." in k)
    write_valid(run_copy, {**saved.method, name: torch.zeros(7, 32)})
    code, output = resume(run_copy)
    assert code == 2
    assert f"method tensor '{name}' is torch.float32 [7, 32], the configured run has" in output
    write_valid(run_copy, saved.method, stores={9: {"x": torch.ones(1)}})
    code, output = resume(run_copy)
    assert code == 2 and "client 9, the run has 4" in output


def test_out_pointing_at_a_file_is_a_clear_error(tmp_path: Path) -> None:
    target = tmp_path / "a_file"
    target.write_text("not a directory")
    code, output = run_cli("run", FEDIT, "--out", str(target), "--quiet")
    assert code == 2 and "Traceback" not in output
    assert "is a file, not a directory" in " ".join(output.split())


KILL_CONFIG = [
    "--set",
    "experiment.rounds=25",
    "--set",
    "method.name='fedsa'",  # a store per client: a checkpoint of some size to be caught writing
    "--set",
    "partition.num_clients=40",
    "--set",
    "partition.min_client_size=1",
    "--set",
    "federation.clients_per_round=2",
    "--set",
    "train.local_steps=1",
    "--set",
    "eval.every=25",
]


def start(out: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "fedlora", "run", FEDIT, "--out", str(out), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [*command, *KILL_CONFIG, *extra],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def kill_while_writing(out: Path) -> bool:
    """Start a run and SIGKILL it the moment a checkpoint save is under way (its partial file
    exists); False if the run ended before one was caught, or if the caught save finished
    (renamed its partial file) between the check and the kill."""
    run = start(out)
    partial = out / PARTIAL
    deadline = time.monotonic() + 120
    try:
        while run.poll() is None and time.monotonic() < deadline:
            if (out / FILE).exists() and partial.exists():  # a second or later save
                os.kill(run.pid, signal.SIGKILL)
                run.wait()
                return partial.exists()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    return False


def test_a_run_killed_during_a_checkpoint_write_resumes_exactly(tmp_path: Path) -> None:
    reference = start(tmp_path / "reference")
    assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()[-2000:]
    for attempt in range(5):
        out = tmp_path / f"killed{attempt}"
        if kill_while_writing(out):
            break
    else:
        pytest.fail("no checkpoint save was caught in progress in 5 runs")
    assert (out / PARTIAL).exists() and (out / FILE).exists()
    interrupted_at = load_checkpoint(out).completed_rounds  # the previous save, intact
    assert 0 < interrupted_at < 25
    resumed = start(out, "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-2000:]
    assert not (out / PARTIAL).exists()
    assert without_timing(read_metrics(out)) == without_timing(read_metrics(tmp_path / "reference"))
    from safetensors.torch import load_file

    for client in (0, 17, 39):
        name = f"adapters/client_{client}/adapter_model.safetensors"
        if (tmp_path / "reference" / name).exists():
            a, b = load_file(tmp_path / "reference" / name), load_file(out / name)
            assert all(torch.equal(a[k], b[k]) for k in a)
