"""Secure aggregation across processes (issue 33): ``--engine distributed`` ranks keep their
clients' replies and answer only the masking protocol's messages, which rank 0 sends them step
by step.

Tolerance: none against the in-process secure run. Every party computes the same fixed-point
inputs from the same replies, the masks cancel exactly mod 2^32, and the protocol's messages
cross as the same channel bytes, recorded in the same order, so metrics, ledger and adapter are
bit-identical (one intra-op thread in both, as in tests/test_distributed.py). That the secure
sum is the plain weighted mean within the fixed-point bound is tests/test_secure_aggregation.py.

What rank 0 was sent is read back from the transport's frame record (tests/frames.py, decoded
with json and safetensors only): no reply, only the protocol's byte messages.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedlora.checkpoint import load_checkpoint
from tests.conftest import ADAPTIVE_CENTRAL, read_metrics
from tests.frames import received
from tests.seeded_kills import (
    KILLED,
    SEEDED_LIKE_KILLED,
    assert_like_the_seeded_drops,
    settings,
)
from tests.test_distributed import assert_same_run, finish, kill_mid_run, launch, reference

# Seed 1 with these rates gives, over the three rounds (a pure function of the seed): round 1,
# one client drops after ShareKeys, its masks recovered; round 2, one vanishes after its masked
# input, its input recovered; round 3, a drop and two vanishings leave one answer to the
# unmasking, fewer than t = 3 of 4, so the round is skipped, never summed wrong. The clients
# train with DP-SGD (seeded noise, so the in-process run can repeat it): secure aggregation
# sums their noised replies.
DROPS = [
    "privacy.secure_aggregation=true",
    "experiment.rounds=3",
    "experiment.seed=1",
    "federation.dropout=0.2",
    "federation.dropout_after_masking=0.2",
    "privacy.mechanism=dp_sgd",
    "privacy.noise_multiplier=1.0",
    "privacy.noise_source=seeded",
]
CENTRAL = ["privacy.secure_aggregation=true", "privacy.noise_source=seeded", *ADAPTIVE_CENTRAL]
# What the masking protocol's messages carry; a client's reply would carry adapter tensors.
PROTOCOL_KEYS = {
    "cipher_key",
    "mask_key",
    "ciphertexts",
    "masked",
    "seed_shares",
    "key_shares",
}


def test_secure_aggregation_on_three_processes_equals_the_in_process_secure_run(
    tmp_path: Path,
) -> None:
    frames = tmp_path / "frames"
    frames.mkdir()
    record = {"FEDLORA_RECORD_FRAMES": str(frames)}
    three = ("--nproc", "3")
    drops = launch("fedit.toml", tmp_path / "drops", tmp_path / "drops.log", *three,
                   *settings(DROPS), env=record)  # fmt: skip
    central = launch(
        "fedit.toml", tmp_path / "central", tmp_path / "central.log", *three, *settings(CENTRAL)
    )
    drops_reference = reference("fedit.toml", tmp_path / "drops_ref", *settings(DROPS))
    central_reference = reference("fedit.toml", tmp_path / "central_ref", *settings(CENTRAL))
    finish(drops, tmp_path / "drops.log")
    finish(central, tmp_path / "central.log")
    assert_same_run(drops_reference, tmp_path / "drops")
    assert_same_run(central_reference, tmp_path / "central")

    rounds = {m["round"]: m for m in read_metrics(tmp_path / "drops")}
    assert rounds[1]["absent"] == {"0": "dropout"} and "skipped" not in rounds[1]
    assert rounds[1]["aggregated"] == [1, 2, 3]
    assert rounds[2]["left_after_masking"] == [1] and "skipped" not in rounds[2]
    assert rounds[3]["skipped"] and "fewer than the threshold t = 3" in rounds[3]["skip_reason"]
    assert rounds[3]["test_loss"] == rounds[2]["test_loss"]  # the global model stayed
    assert rounds[3]["epsilon"] > rounds[1]["epsilon"] > 0  # DP-SGD's budget, spent each round
    summary = (tmp_path / "drops" / "summary.md").read_text()
    assert "round 2: client 1 vanished after its masked input" in summary

    # Rank 0 (the server) was sent the protocol's byte messages and scalar reports, never a
    # reply: every tensor frame it received holds protocol keys only, the masked inputs among
    # them (one per client that sent one: 3 + 4 + 3 over the three rounds).
    got = received(frames, 0)
    tensor_frames = [f for f in got if f.kind == "tensors"]
    assert tensor_frames and all(set(f.keys) <= PROTOCOL_KEYS for f in tensor_frames)
    assert sum(f.keys == ("masked",) for f in tensor_frames) == 10
    ledger = [json.loads(line) for line in (tmp_path / "drops" / "ledger.jsonl").open()]
    uploads = {row["kind"] for row in ledger if row["receiver"] == "server"}
    assert uploads == {f"secagg.{k}" for k in ("advertise_keys", "share_keys", "masked_input",
                                                "unmasking")}  # fmt: skip


def test_a_rank_killed_under_secure_aggregation_stops_the_run_and_resume_equals_it(
    tmp_path: Path,
) -> None:
    """A worker rank is killed (SIGKILL) once the first checkpoint exists, mid-run: the run
    stops naming it; ``--resume`` on the same processes continues from each rank's own files
    (the replies a killed round held are gone; the round is replayed), and the run equals the
    uninterrupted in-process secure run."""
    values = ["privacy.secure_aggregation=true", "experiment.rounds=4", "train.local_steps=20"]
    expected = reference("fedit.toml", tmp_path / "ref", *settings(values))
    out, log = tmp_path / "killed", tmp_path / "killed.log"
    run = launch("fedit.toml", out, log, "--nproc", "3", *settings(values))
    kill_mid_run(run, out, log, rank=1)
    completed = load_checkpoint(out).completed_rounds
    assert 1 <= completed < 4, "the kill must land before the run finished"
    resumed = finish(
        launch("fedit.toml", out, log, "--nproc", "3", "--resume", *settings(values)), log
    )
    assert f"resuming after round {completed}" in resumed
    assert_same_run(expected, out)


def test_ranks_killed_after_share_keys_and_after_masked_input_are_recovered(
    tmp_path: Path,
) -> None:
    """With ``federation.lost_ranks = "continue"`` rank 0 goes on without a worker whose
    connection fails: the protocol drops its clients at that step and recovers them. 4 clients
    on ranks 1-3 (rank 1 hosts clients 0 and 3): rank 2 kills itself right after client 1
    answers ShareKeys, rank 3 right after client 2 sends its masked input; the run equals the
    seeded one as ``tests.seeded_kills`` says."""
    out, log = tmp_path / "killed", tmp_path / "killed.log"
    drills = {"FEDLORA_DRILL_EXIT": "share_keys@1@rank2,masked_input@1@rank3"}
    run = launch(
        "fedit.toml", out, log, "--nproc", "4",
        *settings([*KILLED, "federation.lost_ranks=continue"]), env=drills,
    )  # fmt: skip
    output = finish(run, log)
    assert "lost: rank 2" in output and "lost: rank 3" in output, output
    assert output.count("was killed by SIGKILL") == 2, output
    ref = reference("fedit.toml", tmp_path / "ref", *settings(KILLED + SEEDED_LIKE_KILLED))
    why = assert_like_the_seeded_drops(out, ref)
    assert why.startswith("secure aggregation, MaskedInputCollection: rank 2 was lost"), why
    assert "Lost during the run" in (out / "summary.md").read_text()
