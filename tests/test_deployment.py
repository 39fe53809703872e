"""``--engine distributed`` as a deployment (issue 15): a process receives only what the protocol
sends, each rank evaluates and checkpoints what it holds, and ``--resume`` restores each rank
from its own files.

The proof records every frame each rank received (``FEDLORA_RECORD_FRAMES``, at the transport
layer every receive goes through) and decodes it here with ``json`` and ``safetensors`` only
(tests/frames.py). The key sets rank 0 ever decoded are then checked against what the protocol
sends: FedSA's server sees A and nothing else, DLoRA's cloud only embeddings, module
activations, gradients and killed modules' factors, Dec-LoRA's rank 0 only its own nodes'
neighbour messages. The observer runs of tests/test_distributed.py and
tests/test_distributed_split.py decode the forbidden keys at rank 0 with the same decoder,
so these checks can fail.

Tolerances against the in-process run (which the observer mode equals bit for bit): none,
except DLoRA's ``train_loss``. Each client's model is evaluated on its own rank with the same
ops on the same state as rank 0 would, and rank 0 summarizes the reported values in client
order exactly as one process does, so test metrics are bit-identical; FedSA's and Dec-LoRA's
train losses are the clients' reported local losses as before. DLoRA's ``train_loss`` is the
mean of every step's loss, which the cloud never sees: it divides the sum of the edges'
``math.fsum`` of their losses by their count, where one process takes numpy's pairwise mean
of one list, so it may differ in the last bits (relative 1e-12 allowed).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fedlora.checkpoint import (
    PREVIOUS,
    Checkpoint,
    CheckpointError,
    checkpoint_at,
    load_checkpoint,
    save_checkpoint,
)
from fedlora.engines.layout import Placement, check_deployment, refuse_deployment
from tests.conftest import TINY, run_cli
from tests.frames import Frame, received, tensor_keys
from tests.test_distributed import assert_same_run, finish, kill_mid_run, launch, metrics, reference

RECORD = "FEDLORA_RECORD_FRAMES"
DLORA = "dlora.toml"
NODE_EVAL = ["--set", "topology.per_node_eval=true"]
# What DLoRA's protocol sends the cloud: the step's embeddings and mask, module outputs u, the
# gradients of the head input and of module inputs, and (option (a)) killed modules' factors.
CLOUD_MAY_SEE = {"embeddings", "attention_mask", "u", "grad_hidden", "grad_x", "A", "B"}


def recorded(config: str, out: Path, *extra: str):
    """A deployment launch with every rank's received frames recorded in ``out``'s sibling."""
    frames = out.with_name(out.name + "_frames")
    frames.mkdir()
    log = out.with_name(out.name + ".log")
    return launch(config, out, log, *extra, env={RECORD: str(frames)}), log, frames


def adapter_keys(run: Path, client: int) -> set[str]:
    return set(load_file(run / "adapters" / f"client_{client}" / "adapter_model.safetensors"))


def layout(path: Path) -> dict:
    """The placement a checkpoint file records (read straight from its metadata)."""
    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()["extra"])["layout"]


def assert_control_only(frames: list[Frame], allowed: set[str]) -> None:
    """Every JSON record a rank received names only ``allowed`` fields."""
    for frame in frames:
        if frame.kind == "control":
            assert set(frame.header) <= allowed, frame.header.keys()


@pytest.fixture(scope="module")
def dlora_reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return reference(DLORA, tmp_path_factory.mktemp("dlora") / "one")


def test_fedsa_and_declora_deployments_keep_each_partys_state(tmp_path: Path) -> None:
    fedsa, fedsa_log, fedsa_frames = recorded("fedsa.toml", tmp_path / "fedsa", "--nproc", "3")
    dec, dec_log, dec_frames = recorded(
        "declora.toml", tmp_path / "dec", "--nproc", "3", *NODE_EVAL
    )
    fedsa_ref = reference("fedsa.toml", tmp_path / "fedsa_ref")
    dec_ref = reference("declora.toml", tmp_path / "dec_ref", *NODE_EVAL)
    finish(fedsa, fedsa_log)
    finish(dec, dec_log)

    # FedSA: the server decoded A and only A (no client's B or head, no state), yet per-client
    # metrics, ledger and every client's adapter (exported by its own rank) are the simulation's.
    out = tmp_path / "fedsa"
    server = received(fedsa_frames, 0)
    shared = {k for k in adapter_keys(out, 0) if "lora_A" in k}
    assert shared and tensor_keys(server) == shared
    assert {f.sender for f in server if f.kind == "tensors"} == {1, 2}
    assert_control_only(server, {"outcome", "reason", "metrics"})
    assert_same_run(fedsa_ref, out)
    with safe_open(str(out / "checkpoint.safetensors"), framework="pt") as handle:
        assert all(key.startswith("method/") for key in handle.keys())  # noqa: SIM118
    for rank, clients in ((1, [0, 2]), (2, [1, 3])):
        assert layout(out / f"rank{rank}" / "checkpoint.safetensors") == {
            "world": 3,
            "rank": rank,
            "clients": clients,
        }
        assert set(load_checkpoint(out / f"rank{rank}").stores) == set(clients)

    # Another placement, the observer mode or one process cannot resume these files.
    refusals = [
        (["--engine", "distributed", "--nproc", "2"], "run with --nproc 3"),
        (["--engine", "distributed", "--nproc", "3", "--observer"], "without --observer"),
        ([], "--engine distributed --nproc 3 (without --observer)"),
    ]
    for args, message in refusals:
        code, output = run_cli(
            "run", str(TINY / "fedsa.toml"), "--out", str(out), "--resume", *args
        )
        assert code == 2 and message in " ".join(output.split()), output
        assert "Traceback" not in output

    # Dec-LoRA: rank 0 (nodes 0 and 3 of the ring 0-1-2-3) decoded exactly its nodes' messages
    # from the other ranks, node 1 -> 0 (rank 1) and node 2 -> 3 (rank 2), each round, and no
    # node's state; each node's metrics and adapter are the simulation's.
    out = tmp_path / "dec"
    tensors = [f for f in received(dec_frames, 0) if f.kind == "tensors"]
    assert [f.sender for f in tensors] == [1, 2, 1, 2]
    assert all(set(f.keys) == adapter_keys(out, 1) for f in tensors)
    assert_control_only(received(dec_frames, 0), {"outcomes", "sent", "metrics"})
    for want, have in zip(metrics(dec_ref), metrics(out), strict=True):
        consensus = {"consensus_before_mix", "consensus_distance"} if want["round"] else set()
        assert {k for k in want if k not in have} == {
            "accuracy",
            "macro_f1",
            "test_loss",
            *consensus,  # round 0, the initial model, is before any mixing
        }
        assert have == {k: want[k] for k in have}
        assert "node_accuracy" in have
    for node in range(4):
        a = load_file(dec_ref / "adapters" / f"client_{node}" / "adapter_model.safetensors")
        b = load_file(out / "adapters" / f"client_{node}" / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert (dec_ref / "ledger.jsonl").read_text() == (out / "ledger.jsonl").read_text()
    assert not (out / "adapter").exists()  # no process holds the network average


def split_rows(path: Path) -> list[dict[str, float]]:
    with path.open() as handle:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def assert_same_dlora(expected: Path, out: Path, edges: dict[int, list[int]]) -> None:
    """Test metrics bit for bit, train_loss to 1e-12 (see the docstring); the ledger, every
    user's adapter and each edge's per-step rows equal the simulation's."""
    want, have = metrics(expected), metrics(out)
    assert [m.keys() for m in want] == [m.keys() for m in have]
    for a, b in zip(want, have, strict=True):
        loss, same = a.pop("train_loss", 0.0), b.pop("train_loss", 0.0)  # none in round 0
        assert math.isclose(loss, same, rel_tol=1e-12, abs_tol=0)
        assert a == b
    assert (expected / "ledger.jsonl").read_text() == (out / "ledger.jsonl").read_text()
    reference_rows = split_rows(expected / "steps.csv")
    for rank, users in edges.items():
        mine = [r for r in reference_rows if int(r["client"]) in users]
        assert split_rows(out / f"rank{rank}" / "steps.csv") == mine
        for user in users:
            a = load_file(expected / "adapters" / f"client_{user}" / "adapter_model.safetensors")
            b = load_file(out / "adapters" / f"client_{user}" / "adapter_model.safetensors")
            assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def assert_cloud_saw_only_the_protocol(frames: list[Frame]) -> None:
    """No lora_A/lora_B/head/label tensor, no state: only CLOUD_MAY_SEE, with A and B only in
    the factors a kill of that user's module announced just before."""
    assert tensor_keys(frames) <= CLOUD_MAY_SEE
    assert not [f for f in frames if f.kind == "tensors"]  # no bare state, only messages
    kills = 0
    for before, frame in itertools.pairwise(frames):
        if {"A", "B"} & set(frame.keys):
            assert frame.header["kind"] == "factors" and before.header["kind"] == "kill"
            assert (before.sender, before.header["module"]) == (
                frame.sender,
                frame.header["module"],
            )
            kills += 1
    assert kills > 0, "the tiny schedule kills modules under option (a)"
    assert_control_only(frames, {"loss", "steps", "examples", "sums", "metrics"})


def test_dlora_deployment_on_two_and_three_processes(tmp_path: Path, dlora_reference: Path) -> None:
    runs = {n: recorded(DLORA, tmp_path / f"n{n}", "--nproc", str(n)) for n in (2, 3)}
    for process, log, _ in runs.values():
        finish(process, log)
    placements = {2: {1: [0, 1]}, 3: {1: [0], 2: [1]}}
    for n, (_, _, frames) in runs.items():
        cloud = received(frames, 0)
        assert_cloud_saw_only_the_protocol(cloud)
        assert_same_dlora(dlora_reference, tmp_path / f"n{n}", placements[n])
        for rank in placements[n]:  # an edge hears from the cloud only
            assert {f.sender for f in received(frames, rank)} == {0}
    # With two edges the cloud served them as they asked: their steps interleave. One edge's
    # round after the other's would change sender at most twice a round (3 rounds).
    senders = [f.sender for f in received(runs[3][2], 0) if f.header.get("kind") == "embeddings"]
    assert sorted(set(senders)) == [1, 2]
    assert sum(a != b for a, b in itertools.pairwise(senders)) > 2 * 3


def test_killed_edge_stops_the_run_and_each_rank_resumes_from_its_own_files(
    tmp_path: Path, dlora_reference: Path
) -> None:
    out, log = tmp_path / "killed", tmp_path / "killed.log"
    run = launch(DLORA, out, log, "--nproc", "3")
    kill_mid_run(run, out, log, rank=2)  # an edge, once rank 0 has checkpointed a round
    completed = load_checkpoint(out).completed_rounds
    assert 1 <= completed < 3, "the kill must land before the run finished"
    for rank in (1, 2):
        assert checkpoint_at(out / f"rank{rank}", completed).completed_rounds == completed

    args = ["--out", str(out), "--quiet", "--engine", "distributed", "--resume"]
    code, output = run_cli("run", str(TINY / DLORA), *args, "--nproc", "2")
    text = " ".join(output.split())
    assert code == 2, output
    assert (
        "was written by rank 0 of a run on 3 processes (rank 1: clients 0; rank 2: clients 1)"
        in text
    )
    assert "this is rank 0 of 2 processes (rank 1: clients 0, 1)" in text
    assert "run with --nproc 3" in text

    resumed = finish(launch(DLORA, out, log, "--nproc", "3", "--resume"), log)
    assert f"resuming after round {completed}" in resumed
    assert_same_dlora(dlora_reference, out, {1: [0], 2: [1]})


# -- without processes: the files each rank keeps ------------------------------------------


def test_a_rank_keeps_the_round_before_and_finds_the_one_asked_for(tmp_path: Path) -> None:
    def saved(completed: int) -> None:
        state = {"x": torch.full((2,), float(completed))}
        save_checkpoint(tmp_path, Checkpoint(completed, {}, {0: state}, {}, [], []), True)

    saved(1)
    saved(2)
    assert checkpoint_at(tmp_path, 2).stores[0]["x"].tolist() == [2.0, 2.0]
    assert checkpoint_at(tmp_path, 1).stores[0]["x"].tolist() == [1.0, 1.0]
    with pytest.raises(CheckpointError) as error:
        checkpoint_at(tmp_path, 3)
    assert "no checkpoint after round 3" in str(error.value)
    assert (
        "checkpoint.safetensors after round 2, checkpoint.previous.safetensors after round 1"
        in (str(error.value))
    )
    # A crash between the two renames leaves only the previous file: still found.
    os.remove(tmp_path / "checkpoint.safetensors")
    assert (tmp_path / PREVIOUS).is_file()
    assert checkpoint_at(tmp_path, 1).completed_rounds == 1


def test_placement_checks_name_both_placements(tmp_path: Path) -> None:
    three = Placement(4, 3, rank0_hosts=False)
    assert three.describe() == "3 processes (rank 1: clients 0, 2; rank 2: clients 1, 3)"
    saved = {"layout": three.layout(2)}
    check_deployment(tmp_path, saved, three, 2)  # its own file: fine
    with pytest.raises(CheckpointError) as error:
        check_deployment(tmp_path, saved, three, 1)
    assert "written by rank 2 of a run on 3 processes" in str(error.value)
    with pytest.raises(CheckpointError) as error:
        check_deployment(tmp_path, saved, Placement(4, 2, rank0_hosts=False), 1)
    assert "this is rank 1 of 2 processes (rank 1: clients 0, 1, 2, 3)" in str(error.value)
    with pytest.raises(CheckpointError, match="holds every client's state in one file"):
        check_deployment(tmp_path, {}, three, 1)
    with pytest.raises(CheckpointError, match="malformed placement"):
        check_deployment(tmp_path, {"layout": {"world": "3"}}, three, 1)
    refuse_deployment(tmp_path, {})  # an observer or in-process file
    with pytest.raises(CheckpointError, match="--nproc 3 \\(without --observer\\)"):
        refuse_deployment(tmp_path, saved)
