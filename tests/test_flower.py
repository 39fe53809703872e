"""fedlora on real Flower processes: a SuperLink and SuperNodes on loopback, ``flwr run``
(through ``fedlora flower-run``), against the in-process engine.

Tolerance: none. The ServerApp and every ClientApp build the experiment from the same config
and seed, a client's steps draw from generators seeded by (seed, round, client), the reply
crosses as the channel's safetensors bytes, and the server aggregates them in client order, so
metrics, ledger and adapter are bit-identical to ``fedlora run`` with the same thread count
(the apps run one intra-op thread each, like distributed ranks; the reference does too).

Time: Flower starts a fresh ClientApp process per message, and each imports torch and
transformers and rebuilds the tiny experiment; the configs here have two clients, one per
SuperNode, so a round costs one such start per node, in parallel.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedlora.config import load_config
from fedlora.experiment import build
from fedlora.flower.app_dir import run_key
from fedlora.flower.loopback import federation
from fedlora.flower.protocol import STATUS_FILE
from tests.conftest import TINY, read_metrics, run_cli, timeless_metrics, trained
from tests.flower_nodes import make_node_key, make_tls
from tests.seeded_kills import (
    KILLED,
    SEEDED_LIKE_KILLED,
    assert_like_the_seeded_drops,
    settings,
)
from tests.test_methods_server import framed

TWO_CLIENTS = ["--set", "partition.num_clients=2"]
RUN_TIMEOUT = 600  # seconds for one `fedlora flower-run` on two busy cores
# The SuperNodes' waits between polls capped (`fedlora flower-node --poll-interval`), in every
# federation but the killed-SuperNode one, which keeps flwr's own timing.
POLL = 0.2


def reference(config: str, out: Path, *overrides: str) -> Path:
    """The in-process run of the same config, one intra-op thread (see the docstring)."""
    code, output = run_cli(
        "run",
        str(TINY / config),
        "--out",
        str(out),
        "--quiet",
        "--set",
        "compute.threads=1",
        *overrides,
    )
    assert code == 0, output
    return out


def make_app(config: str, tmp_path: Path, *options: str) -> tuple[Path, Path]:
    app, run = tmp_path / "app", tmp_path / "run"
    code, output = run_cli(
        "flower-app", str(TINY / config), "--out", str(app), "--run-dir", str(run), *options
    )
    assert code == 0, output
    return app, run


def flower_run(app: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedlora", "flower-run", str(app)],
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )


def assert_same_run(run: Path, ref: Path) -> None:
    assert timeless_metrics(run) == timeless_metrics(ref)
    assert (run / "ledger.jsonl").read_text() == (ref / "ledger.jsonl").read_text()
    ours = load_file(run / "adapter" / "adapter_model.safetensors")
    theirs = load_file(ref / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    files = {p.name for p in ref.iterdir()}
    assert files <= {p.name for p in run.iterdir()}, "a simulation run's file is missing"


def assert_completed(result: subprocess.CompletedProcess, run: Path, rounds: int) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    status = json.loads((run / STATUS_FILE).read_text())
    assert status["status"] == "completed" and status["rounds"] == rounds
    assert "SuperNodes (Flower deployment)" in (run / "summary.md").read_text()


COLD = "working in this process"  # what a ClientApp logs when no runtime answers


def assert_warm(fed, nodes: tuple[str, ...] = ("node0", "node1")) -> None:
    """Every message to ``nodes`` went through the node's warm runtime."""
    for node in nodes:
        assert "fedlora node runtime listening" in fed.log(node)
        assert COLD not in fed.log(node), fed.log(node)


# Secure aggregation among 3 clients on the 2 nodes (node 0 hosts clients 0 and 2), threshold 2,
# one round. Seed 1 with these rates (a pure function of the seed): client 0 drops after
# ShareKeys (its masks are recovered). Clients really killed at both stages of the protocol are
# the next test's.
SECURE = [
    "partition.num_clients=3",
    "privacy.secure_aggregation=true",
    "privacy.threshold=2",
    "experiment.seed=1",
    "experiment.rounds=1",
    "federation.dropout=0.2",
    "federation.dropout_after_masking=0.2",
]


def test_secure_fedit_over_tls_on_authenticated_supernodes_equals_the_simulation(
    tmp_path: Path,
) -> None:
    """Everything over TLS (a CA and a server certificate made here), SuperNodes authenticated
    by keys registered with the SuperLink; a third SuperNode with an unregistered key claims
    partition 1 as well. Had it been let in, the ServerApp would stop on two nodes hosting one
    partition; it is refused. The run aggregates securely: each node's warm runtime keeps its
    clients' replies and answers the masking protocol's steps; no reply reaches the server
    (Flower's train replies carry reports only), the drop is recovered, and the run equals the
    in-process secure run bit for bit."""
    tls = make_tls(tmp_path / "tls")
    keys = {name: make_node_key(tmp_path / "keys", name) for name in ("node0", "node1", "intruder")}
    secure = settings(SECURE)
    app, run = make_app("fedit.toml", tmp_path, *secure)
    with federation(tmp_path / "flower", tls=tls, auth=True, poll=POLL) as fed:
        for name in ("node0", "node1"):
            registered = fed.flwr("supernode", "register", str(keys[name][1]))
            assert registered.returncode == 0, registered.stdout + registered.stderr
        fed.node(0, 2, key=keys["node0"][0])
        fed.node(1, 2, key=keys["node1"][0])
        intruder = fed.node(1, 2, key=keys["intruder"][0], tag="-intruder")
        refused = intruder.wait(120)  # it exits by itself, refused at activation
        result = flower_run(app, fed.env)
        listed = fed.flwr("supernode", "ls", "--format", "json")
        assert_warm(fed)
    assert refused != 0 and "Failed to activate SuperNode" in fed.log("node1-intruder")
    assert listed.returncode == 0, listed.stderr
    assert len(json.loads(listed.stdout)["nodes"]) == 2, listed.stdout
    assert_completed(result, run, 1)
    assert_same_run(run, reference("fedit.toml", tmp_path / "ref", *secure))
    records = {r["round"]: r for r in read_metrics(run)}
    assert records[1]["absent"] == {"0": "dropout"} and "skipped" not in records[1]

    # Flower's bytes hold the ledger's (the tensors' safetensors bytes) plus its own framing of
    # each message (metadata, record names, JSON): a little more, never less. Train replies
    # carry a report and no reply bytes; the uploads are the protocol's messages only.
    flower = json.loads((run / STATUS_FILE).read_text())["flower_bytes"]
    rows = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]
    downloads = sum(r["bytes"] for r in rows if r["sender"] == "server" and "kind" not in r)
    protocol_down = sum(r["bytes"] for r in rows if r["sender"] == "server" and "kind" in r)
    protocol_up = sum(r["bytes"] for r in rows if r["receiver"] == "server")
    assert {r["kind"] for r in rows if r["receiver"] == "server"} <= {
        "secagg.advertise_keys", "secagg.share_keys", "secagg.masked_input", "secagg.unmasking"
    }  # fmt: skip
    train, steps = flower["train"], flower["query.secagg"]
    assert train["messages"] == 3  # 3 clients, the dropout's download too
    assert downloads < train["down"] < downloads + 2048 * train["messages"], (train, downloads)
    assert train["up"] < 2048 * train["messages"], train
    assert protocol_down < steps["down"] < protocol_down + 4096 * steps["messages"]
    assert protocol_up < steps["up"] < protocol_up + 4096 * steps["messages"]


def test_secure_aggregation_recovers_clients_killed_after_share_keys_and_after_masked_input(
    tmp_path: Path,
) -> None:
    """Two clients really die mid-protocol (their node's runtime, which holds their keys and
    reply, is SIGKILLed by ``FEDLORA_DRILL_EXIT``) on 3 nodes (node 0 hosts clients 0 and 3):
    client 1 after ShareKeys (its pairwise masks are rebuilt from the survivors' shares), client
    2 after its masked input (its input stays in the sum; its self-mask is rebuilt). The two
    survivors meet the threshold, and the run equals the seeded one as
    ``tests.seeded_kills`` says."""
    app, run = make_app("fedit.toml", tmp_path, *settings(KILLED))
    with federation(tmp_path / "flower", poll=POLL) as fed:
        fed.node(0, 3)
        fed.node(1, 3, drill="share_keys@1")
        fed.node(2, 3, drill="masked_input@1")
        result = flower_run(app, fed.env)
        killed = {n: "killing this process after" in fed.log(f"node{n}") for n in (0, 1, 2)}
    assert_completed(result, run, 1)
    assert killed == {0: False, 1: True, 2: True}, killed
    ref = reference("fedit.toml", tmp_path / "ref", *settings(KILLED + SEEDED_LIKE_KILLED))
    why = assert_like_the_seeded_drops(run, ref)
    assert "MaskedInputCollection" in why and "warm fedlora runtime" in why, why


def test_flower_node_refuses_a_malformed_fault_drill(monkeypatch: pytest.MonkeyPatch) -> None:
    for drill in ("share_keys", "share_keys@0", "masked@1", "train@x"):
        monkeypatch.setenv("FEDLORA_DRILL_EXIT", drill)
        code, output = run_cli("flower-node", "--partition-id", "0", "--num-partitions", "1")
        assert code == 2 and "Traceback" not in output, output
        assert "STEP@ROUND" in output and "masked_input" in output, output


def test_methods_outside_a_server_round_are_refused_naming_their_engines(tmp_path: Path) -> None:
    for method, engine in (("declora", "gossip"), ("dlora", "split")):
        code, output = run_cli("flower-app", str(TINY / f"{method}.toml"), "--out", str(tmp_path))
        assert code == 2, output
        assert f"{engine!r} engine" in output and "--engine simulation" in output
        assert "Traceback" not in output
    assert not (tmp_path / "pyproject.toml").exists()


def test_flower_run_refuses_a_directory_that_is_not_an_app(tmp_path: Path) -> None:
    code, output = run_cli("flower-run", str(tmp_path))
    assert code == 2 and "fedlora flower-app" in output and "Traceback" not in output


@pytest.mark.parametrize("args", [["abc"], ["0"], ["-1", "--insecure"], []])
def test_a_capped_supernode_refuses_a_bad_interval(args: list[str]) -> None:
    command = [sys.executable, "-m", "fedlora.flower.supernode", *args]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "SECONDS must be a positive number" in result.stdout


def test_flower_node_refuses_a_bad_poll_interval() -> None:
    code, output = run_cli(
        "flower-node", "--partition-id", "0", "--num-partitions", "1", "--poll-interval", "0"
    )
    assert code == 2 and "--poll-interval must be a positive number" in output


def wait_for_round(fed, run: Path, launched: subprocess.Popen, round_number: int) -> None:
    """Until ``run``'s metrics hold round ``round_number`` (the run still going)."""
    deadline = time.monotonic() + RUN_TIMEOUT
    metrics = run / "metrics.jsonl"
    while not (metrics.is_file() and f'"round": {round_number},' in metrics.read_text()):
        assert launched.poll() is None and time.monotonic() < deadline, fed.log("flower-run")
        time.sleep(0.2)


def pids(pattern: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, check=False)
    return [int(pid) for pid in found.stdout.split()]


def running_on_two_nodes(fed, app: Path, run: Path) -> subprocess.Popen:
    """``fedlora flower-run APP`` under way on two warm nodes, once round 1 is recorded."""
    fed.node(0, 2)
    fed.node(1, 2)
    launched = fed.start("flower-run", [sys.executable, "-m", "fedlora", "flower-run", str(app)])
    wait_for_round(fed, run, launched, 1)
    return launched


def assert_node_adapters_equal(tmp_path: Path, run: Path, ref: Path) -> None:
    """Each node exported its own client's adapter, equal to the in-process run's, and the
    server's run directory has no client model."""
    assert not (run / "adapters").exists(), "a client's model reached the server"
    for client in (0, 1):
        node = tmp_path / "flower" / f"node{client}" / f"run-{run_key(run)}"
        ours = load_file(node / "adapters" / f"client_{client}" / "adapter_model.safetensors")
        theirs = load_file(ref / "adapters" / f"client_{client}" / "adapter_model.safetensors")
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_fedsa_on_the_nodes_survives_a_killed_server_app_and_equals_the_simulation(
    tmp_path: Path,
) -> None:
    """FedSA-LoRA's clients keep their own B and head on their SuperNodes; each evaluation
    round the server asks the nodes for their clients' metrics. The ServerApp and the command
    that started it are killed (SIGKILL) once round 1 is recorded. A plain ``flower-run`` of
    the app is refused, naming ``--resume``; ``--resume`` continues from the server's
    checkpoint on the same nodes, whose clients' state is kept under the run's key (a new
    Flower run id) and versioned by round, so a round the killed ServerApp had begun is
    replayed from the state before it. Metrics (their means, spreads and minima over the
    clients), ledger and each node's exported adapters equal the in-process run's bit for bit."""
    rounds = ["--set", "experiment.rounds=2", "--set", "eval.every=2"]  # evaluated at 0 and 2
    app, run = make_app("fedsa.toml", tmp_path, *TWO_CLIENTS, *rounds)
    with federation(tmp_path / "flower", poll=POLL) as fed:
        launched = running_on_two_nodes(fed, app, run)
        # this federation's ServerApp (tests beside it run their own)
        (server_app,) = pids(f"flwr-serverapp --runtime-api-address 127.0.0.1:{fed.link_port}")
        os.kill(server_app, signal.SIGKILL)
        os.killpg(launched.pid, signal.SIGKILL)  # its `flwr run` with it, as a lost machine
        launched.wait()
        code, output = run_cli("flower-run", str(app))  # not without --resume
        assert code == 2 and "--resume" in output, output
        resumed = subprocess.run(
            [sys.executable, "-m", "fedlora", "flower-run", str(app), "--resume"],
            env=fed.env, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False,
        )  # fmt: skip
        assert_warm(fed)
    assert_completed(resumed, run, 2)
    ref = reference("fedsa.toml", tmp_path / "ref", *TWO_CLIENTS, *rounds)
    assert timeless_metrics(run) == timeless_metrics(ref)
    assert "accuracy_std" in trained(read_metrics(run))[-1]
    assert (run / "ledger.jsonl").read_text() == (ref / "ledger.jsonl").read_text()
    assert_node_adapters_equal(tmp_path, run, ref)


def test_flora_on_a_node_whose_runtime_dies_works_cold_and_equals_the_simulation(
    tmp_path: Path,
) -> None:
    """FLoRA merges each round's stacked update into the frozen base: round 2's clients train
    on W0 + the merged offset, which reaches each node with its download. Node 1's warm runtime
    is killed (SIGKILL) once round 1 is recorded: its later ClientApps say so in the node's
    log and build the experiment themselves, reading the moved base from the node's state files.
    A node that trained on W0 would give a different round-2 loss, adapter and metrics; the run
    equals the in-process run bit for bit. The two clients train at ranks 4 and 8, so their
    uploads differ in size, and Flower's bytes hold the ledger's."""
    rounds = ["--set", "experiment.rounds=3"]  # round 3 is cold even if round 2 began warm
    app, run = make_app("flora.toml", tmp_path, *TWO_CLIENTS, *rounds)
    with federation(tmp_path / "flower", poll=POLL) as fed:
        launched = running_on_two_nodes(fed, app, run)
        (runtime,) = pids(f"flower-runtime --state-dir {tmp_path / 'flower' / 'node1'}")
        os.kill(runtime, signal.SIGKILL)
        code = launched.wait(RUN_TIMEOUT)
        assert code == 0, fed.log("flower-run")
        assert COLD in fed.log("node1")
        assert_warm(fed, ("node0",))
    assert_same_run(run, reference("flora.toml", tmp_path / "ref", *TWO_CLIENTS, *rounds))
    rows = [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]
    up = {r["sender"]: r["bytes"] for r in rows if r["round"] == 0 and r["receiver"] == "server"}
    assert len(up) == 2 and up["client0"] < up["client1"], up  # ranks 4 and 8
    # Flower's bytes hold the ledger's (the tensors' safetensors bytes) plus its own framing of
    # each message (metadata, record names, the JSON report): a little more, never less. Each
    # train message also carries FLoRA's merged base offset, dense (d x k per module): bytes the
    # ledger, which counts the method's messages, does not hold (docs/flower.md says so).
    flower = json.loads((run / STATUS_FILE).read_text())["flower_bytes"]["train"]
    modules = build(load_config(run / "config.toml")).slots.modules
    offset = framed({m.key: (m.d_out, m.d_in) for m in modules})
    down_total = sum(r["bytes"] for r in rows if r["sender"] == "server") + 6 * offset
    up_total = sum(r["bytes"] for r in rows if r["receiver"] == "server")
    assert flower["messages"] == 6  # 3 rounds x 2 clients
    assert down_total < flower["down"] < down_total + 2048 * flower["messages"], flower
    assert up_total < flower["up"] < up_total + 2048 * flower["messages"], flower


def test_a_supernode_killed_mid_run_leaves_its_client_absent_and_the_run_finishes(
    tmp_path: Path,
) -> None:
    """SuperNode 1 is killed (SIGKILL, its ClientApp too) as soon as round 1 is recorded, while
    round 2 is under way. Flower answers for it once its heartbeats stop; round 2 aggregates
    client 0 alone, records client 1 absent with the reason, and the run completes."""
    rounds = ["--set", "experiment.rounds=2"]
    app, run = make_app("fedit.toml", tmp_path, *TWO_CLIENTS, *rounds, "--reply-timeout", "300")
    with federation(tmp_path / "flower") as fed:
        launched = running_on_two_nodes(fed, app, run)
        os.killpg(fed.nodes[1].pid, signal.SIGKILL)
        code = launched.wait(RUN_TIMEOUT)
    assert code == 0, fed.log("flower-run")
    records = [r for r in read_metrics(run) if r["round"] >= 1]  # not the initial model's
    assert [r["round"] for r in records] == [1, 2]
    first, second = records
    assert "absent" not in first
    assert second["aggregated"] == [0] and list(second["absent"]) == ["1"]
    assert "SuperNode" in second["absent"]["1"]
    assert "## Reliability" in (run / "summary.md").read_text()
