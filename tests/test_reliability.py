"""Reliability (issue 10): replies checked at the receiver, dropouts, stragglers and skipped
rounds, robust aggregation against numpy, and simulated attackers, on real tiny runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from fedlora.attack import tamper
from fedlora.channel import Channel, MessageError, decode, encode
from fedlora.config import AttackConfig, FederationConfig, load_config
from fedlora.engines.client import required_steps
from fedlora.engines.loop import RunLoop
from fedlora.engines.placements import local_loop
from fedlora.experiment import Experiment, build
from fedlora.robust import combine
from fedlora.training import derived_seed
from tests.conftest import TINY, read_metrics, run_cli, trained

FEDIT = TINY / "fedit.toml"


pytestmark = pytest.mark.usefixtures("one_thread")


def engine_for(
    overrides: list[str], tmp_path: Path, name: str = "fedit.toml"
) -> tuple[Experiment, RunLoop]:
    experiment = build(load_config(TINY / name, overrides))
    out = tmp_path / "run"
    out.mkdir(parents=True, exist_ok=True)
    return experiment, local_loop(experiment, out, Console(quiet=True), pooled=False)


def honest_replies(overrides: list[str], round_index: int = 0) -> dict[int, dict]:
    """Every client's reply to the first round, computed on a separately built experiment."""
    experiment, engine = engine_for(overrides, Path("/tmp/unused-honest"))
    method = experiment.method
    replies = {}
    for client in range(len(experiment.clients)):
        message = method.server_message(client, round_index)
        replies[client], _ = engine.round.runtime.train(client, message, round_index)
    return replies


def numpy_weighted_mean(replies: dict[int, dict], sizes: dict[int, int], key: str) -> np.ndarray:
    total = sum(sizes.values())
    return sum(sizes[c] / total * replies[c][key].double().numpy() for c in replies)


# -- 1. every message checked at the receiver ---------------------------------------------------
def test_the_receiver_refuses_malformed_messages_with_the_reason() -> None:
    good = {"a": torch.ones(2, 3)}
    expect = {"a": (2, 3)}
    assert torch.equal(decode(encode(good), expect)["a"], good["a"])
    cases = {
        "unexpected ['b']": {"a": torch.ones(2, 3), "b": torch.ones(1)},
        "missing ['a']": {"c": torch.ones(2, 3)},
        "has shape [3, 3]; expected [2, 3]": {"a": torch.ones(3, 3)},
        "has dtype torch.float64; expected float32": {"a": torch.ones(2, 3, dtype=torch.float64)},
        "NaN or infinite": {"a": torch.full((2, 3), float("inf"))},
    }
    for fragment, tensors in cases.items():
        with pytest.raises(MessageError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            decode(encode(tensors), expect)
    with pytest.raises(MessageError, match="exceeds the limit of 10"):
        decode(encode(good), expect, limit=10)
    # A broadcastable shape is no excuse: (1, 3) would sum silently into (2, 3).
    with pytest.raises(MessageError, match="shape"):
        decode(encode({"a": torch.ones(1, 3)}), expect)
    # The channel records a refused message with its reason, then raises.
    channel = Channel()
    with pytest.raises(MessageError):
        channel.send({"a": torch.ones(3, 3)}, "client1", "server", 4, expect)
    (record,) = channel.ledger.records
    assert (record.round, record.sender, record.tensors) == (4, "client1", 0)
    assert "shape" in record.rejected and record.bytes == len(encode({"a": torch.ones(3, 3)}))


@pytest.mark.parametrize("kind", ["nan", "wrong_shape"])
def test_a_refused_reply_never_reaches_the_global_model(kind: str, tmp_path: Path) -> None:
    overrides = ["experiment.rounds=1", "attack.clients=[1]", f"attack.kind='{kind}'"]
    experiment, engine = engine_for(overrides, tmp_path)
    result = engine.run(show_progress=False)
    (record,) = trained(result.metrics)
    assert record["aggregated"] == [0, 2, 3]
    assert list(record["absent"]) == ["1"] and "reply refused" in record["absent"]["1"]
    (rejected,) = record["rejected"]
    assert rejected["sender"] == "client1"
    assert ("NaN" if kind == "nan" else "shape") in rejected["reason"]
    assert [r.sender for r in result.ledger.rejections()] == ["client1"]
    # The global model is the size-weighted mean of the three honest replies, nothing else.
    honest = honest_replies(["experiment.rounds=1"])
    sizes = {c: len(experiment.clients[c]) for c in (0, 2, 3)}
    state = experiment.method.global_state()
    for key in state:
        expected = numpy_weighted_mean({c: honest[c] for c in sizes}, sizes, key)
        np.testing.assert_allclose(state[key].double().numpy(), expected, rtol=1e-5, atol=1e-7)
    ledger = [
        json.loads(line) for line in (engine.run_dir / "ledger.jsonl").read_text().splitlines()
    ]
    assert [row["sender"] for row in ledger if row.get("rejected")] == ["client1"]


def test_every_tiny_method_accepts_its_own_honest_replies(tmp_path: Path) -> None:
    """The expected-reply schema of each method matches what its clients really send (the
    server methods' tiny configs are checked by tests/test_fault_matrix.py's dropout runs)."""
    from tests.test_fault_matrix import SERVER_METHODS

    for config in sorted(TINY.glob("*.toml")):
        if config.stem in SERVER_METHODS:
            continue
        experiment = build(load_config(config))
        out = tmp_path / config.stem
        out.mkdir()
        engine = local_loop(experiment, out, Console(quiet=True))
        result = engine.run(show_progress=False)
        assert result.ledger.rejections() == [], config.stem
        assert all("absent" not in m for m in result.metrics), config.stem


# -- 2. dropouts, stragglers, skipped rounds ----------------------------------------------------
def dropped(seed: int, round_index: int, client: int, p: float) -> bool:
    """The documented rule: a seeded uniform draw per (seed, round, client) below p."""
    rng = np.random.default_rng(derived_seed(seed, round_index, client, 0xD0))
    return bool(rng.random() < p)


def test_dropout_aggregates_exactly_the_clients_that_replied(tmp_path: Path) -> None:
    overrides = ["experiment.rounds=4", "federation.dropout=0.5"]
    experiment, engine = engine_for(overrides, tmp_path)
    result = engine.run(show_progress=False)
    clients = range(len(experiment.clients))
    expected_missing = {r: [c for c in clients if dropped(0, r, c, 0.5)] for r in range(4)}
    assert any(expected_missing.values())  # the seeds exercise dropout
    for r, record in enumerate(trained(result.metrics)):
        missing = expected_missing[r]
        if not missing:
            assert "absent" not in record
            continue
        assert record["absent"] == {str(c): "dropout" for c in missing}
        assert record["aggregated"] == [c for c in clients if c not in missing]
        uploads = [
            t.sender for t in result.ledger.records if t.round == r and t.receiver == "server"
        ]
        assert uploads == [f"client{c}" for c in clients if c not in missing]


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("fedsa.toml", []),  # per-client B and head
        ("hetlora.toml", []),  # per-client current ranks
        ("fedit.toml", ["train.keep_optimizer_state=true"]),  # per-client AdamW moments
    ],
)
def test_a_client_that_misses_a_round_keeps_its_state(
    name: str, overrides: list[str], tmp_path: Path
) -> None:
    experiment, engine = engine_for(
        ["experiment.rounds=4", "federation.dropout=0.5", *overrides], tmp_path, name
    )
    clients = range(len(experiment.clients))
    # a round r >= 1 with a client that trained in round r - 1 and misses round r
    r, client = next(
        (r, c)
        for r in range(1, 4)
        for c in clients
        if dropped(0, r, c, 0.5) and not dropped(0, r - 1, c, 0.5)
    )
    from rich.progress import Progress

    with Progress(disable=True) as progress:
        for index in range(r):
            engine.metrics.append(engine.run_round(index, progress))
        store = {k: v.clone() for k, v in engine.round.runtime.stores[client].items()}
        optimizer = {
            k: v.clone() for k, v in engine.round.runtime.optimizers.get(client, {}).items()
        }
        ranks = list(getattr(experiment.method, "current", []))
        record = engine.run_round(r, progress)
    assert record["absent"][str(client)] == "dropout"
    assert store.keys() == engine.round.runtime.stores[client].keys()
    assert all(torch.equal(store[k], engine.round.runtime.stores[client][k]) for k in store)
    assert all(
        torch.equal(optimizer[k], engine.round.runtime.optimizers[client][k]) for k in optimizer
    )
    if ranks:  # HetLoRA: the missing client's rank is untouched by the round
        assert experiment.method.current[client] == ranks[client]
    if "keep_optimizer_state" in " ".join(overrides):
        assert optimizer  # the state that had to survive exists


def test_below_min_replies_the_round_is_skipped_and_the_model_stays(tmp_path: Path) -> None:
    overrides = ["experiment.rounds=3", "federation.dropout=0.5", "federation.min_replies=4"]
    experiment, engine = engine_for(overrides, tmp_path)
    from rich.progress import Progress

    skipped_rounds = [r for r in range(3) if any(dropped(0, r, c, 0.5) for c in range(4))]
    assert skipped_rounds
    with Progress(disable=True) as progress:
        for r in range(3):
            before = {k: v.clone() for k, v in experiment.method.global_state().items()}
            record = engine.run_round(r, progress)
            after = experiment.method.global_state()
            unchanged = all(torch.equal(before[k], after[k]) for k in before)
            assert record.get("skipped", False) == (r in skipped_rounds)
            assert unchanged == (r in skipped_rounds)


def test_a_deadline_cuts_or_drops_stragglers(tmp_path: Path) -> None:
    # Two epochs of a client's data at batch 8: clients with more rows need more steps.
    base = ["experiment.rounds=1", "train.local_epochs=2", "federation.deadline_steps=12"]
    experiment, engine = engine_for([*base, "federation.stragglers='drop'"], tmp_path / "drop")
    needs = {c: required_steps(experiment, c) for c in range(len(experiment.clients))}
    slow = sorted(c for c, n in needs.items() if n > 12)
    assert slow == [0, 2]  # needs 16, 9, 16, 11 steps (2 epochs at batch 8)
    (record,) = trained(engine.run(show_progress=False).metrics)
    assert sorted(int(c) for c in record["absent"]) == slow
    assert all(why.startswith("straggler: needs") for why in record["absent"].values())
    _, cut = engine_for([*base, "federation.stragglers='cut'"], tmp_path / "cut")
    (record,) = trained(cut.run(show_progress=False).metrics)
    assert "absent" not in record
    assert record["steps"] == sum(min(n, 12) for n in needs.values())


# -- 3. robust aggregation against numpy --------------------------------------------------------
def random_states(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        {"w": torch.randn(4, 3, generator=generator), "b": torch.randn(5, generator=generator)}
        for _ in range(count)
    ]


@pytest.mark.parametrize("count", [5, 6])
def test_median_and_trimmed_mean_match_numpy(count: int) -> None:
    states = random_states(count)
    weights = [1.0] * count
    median = combine(states, weights, FederationConfig(aggregator="median"))
    trimmed = combine(
        states, weights, FederationConfig(aggregator="trimmed_mean", trim_fraction=0.2)
    )
    for key in ("w", "b"):
        stack = np.stack([s[key].numpy() for s in states])
        np.testing.assert_allclose(median[key].numpy(), np.median(stack, axis=0), rtol=1e-6)
        cut = int(np.floor(0.2 * count))
        expected = np.sort(stack, axis=0)[cut : count - cut].mean(axis=0)
        np.testing.assert_allclose(trimmed[key].numpy(), expected, rtol=1e-6, atol=1e-7)


def test_norm_clipping_bounds_each_update_then_averages() -> None:
    states = random_states(4)
    reference = {"w": torch.zeros(4, 3) + 0.5, "b": torch.zeros(5) - 0.25}
    states[2] = {k: v * 100 for k, v in states[2].items()}  # one far-off client
    weights = [1.0, 2.0, 3.0, 4.0]
    rule = FederationConfig(aggregator="norm_clip", clip_norm=1.5)
    combined = combine(states, weights, rule, reference)
    p = np.asarray(weights) / sum(weights)
    flat_ref = np.concatenate([reference["w"].numpy().ravel(), reference["b"].numpy().ravel()])
    total = np.zeros_like(flat_ref, dtype=np.float64)
    for weight, state in zip(p, states, strict=True):
        update = np.concatenate([state["w"].numpy().ravel(), state["b"].numpy().ravel()]) - flat_ref
        total += weight * update * min(1.0, 1.5 / np.linalg.norm(update))
    expected = flat_ref + total
    got = np.concatenate([combined["w"].numpy().ravel(), combined["b"].numpy().ravel()])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert np.linalg.norm(got - flat_ref) <= 1.5 + 1e-5


def test_median_resists_a_scaling_attacker_where_the_mean_does_not(tmp_path: Path) -> None:
    attack = [
        "attack.clients=[0]",
        "attack.kind='scale'",
        "attack.factor=50",
        "experiment.rounds=1",
    ]
    states = {}
    for aggregator in ("mean", "median"):
        experiment, engine = engine_for(
            [*attack, f"federation.aggregator='{aggregator}'"], tmp_path / aggregator
        )
        engine.run(show_progress=False)
        states[aggregator] = experiment.method.global_state()
    honest = honest_replies(["experiment.rounds=1"])
    initial = experiment.method.context.initial
    key = next(k for k in initial if ".lora_B." in k)
    updates = np.stack([(honest[c][key] - initial[key]).numpy() for c in (1, 2, 3)])
    # The median of 3 honest values and 1 outlier lies within the honest range per coordinate.
    bound = float(np.linalg.norm(np.abs(updates).max(axis=0)))
    assert float((states["mean"][key] - initial[key]).norm()) > 5 * bound
    assert float((states["median"][key] - initial[key]).norm()) <= bound + 1e-6


def test_a_method_without_a_mean_refuses_robust_aggregation(tmp_path: Path) -> None:
    code, output = run_cli(
        "run",
        str(TINY / "flexlora.toml"),
        "--out",
        str(tmp_path),
        "--set",
        "federation.aggregator='median'",
    )
    assert code == 2 and "Traceback" not in output
    text = " ".join(output.split())
    assert "federation.aggregator 'median': method 'flexlora' does not aggregate by a mean" in text
    assert "fedit" in text and "fedsa" in text


@pytest.mark.parametrize("config", ["declora.toml", "dlora.toml"])
def test_faults_are_refused_where_no_server_round_simulates_them(config: str) -> None:
    code, output = run_cli(
        "run", str(TINY / config), "--set", "federation.dropout=0.2", "--set", "attack.clients=[1]"
    )
    text = " ".join(output.split())
    assert code == 2 and "federation.dropout, attack.clients: method" in text
    assert "simulated faults and attackers apply to server-based methods" in text


def test_norm_clip_needs_a_bound_and_attackers_must_exist(tmp_path: Path) -> None:
    code, output = run_cli("run", str(FEDIT), "--set", "federation.aggregator='norm_clip'")
    assert code == 2 and "needs clip_norm" in output
    code, output = run_cli("run", str(FEDIT), "--set", "attack.clients=[7]")
    assert code == 2 and "attack.clients [7]: the run has clients 0..3" in " ".join(output.split())


# -- 4. the attacks themselves ------------------------------------------------------------------
def test_attacks_change_the_update_as_stated() -> None:
    generator = torch.Generator().manual_seed(1)
    message = {"w": torch.randn(3, 2, generator=generator)}
    reply = {"w": message["w"] + torch.randn(3, 2, generator=generator), "h": torch.ones(2)}
    update = (reply["w"] - message["w"]).numpy()

    def attacked(kind: str, **options: float) -> dict[str, torch.Tensor]:
        return tamper(reply, message, AttackConfig(clients=[3], kind=kind, **options), 3, 0, 0)

    scaled = attacked("scale", factor=-4.0)
    np.testing.assert_allclose(scaled["w"].numpy(), message["w"].numpy() - 4 * update, rtol=1e-6)
    np.testing.assert_allclose(scaled["h"].numpy(), -4 * np.ones(2))  # no reference: the reply
    flipped = attacked("sign_flip")
    np.testing.assert_allclose(flipped["w"].numpy(), message["w"].numpy() - update, rtol=1e-6)
    noisy = attacked("noise", noise_std=0.5)
    assert not torch.equal(noisy["w"], reply["w"])
    assert torch.equal(attacked("noise", noise_std=0.5)["w"], noisy["w"])  # seeded
    assert torch.isnan(attacked("nan")["h"]).any()
    assert attacked("wrong_shape")["h"].shape == (3,)
    honest = tamper(reply, message, AttackConfig(clients=[3], kind="scale"), 2, 0, 0)
    assert honest is reply


def test_a_gossip_node_refuses_a_poisoned_neighbour_and_mixes_the_rest(tmp_path: Path) -> None:
    experiment = build(load_config(TINY / "declora.toml", ["experiment.rounds=1"]))
    out = tmp_path / "gossip"
    out.mkdir()
    engine = local_loop(experiment, out, Console(quiet=True))
    graph = engine.round.topology.at(0)
    nodes = range(len(experiment.clients))
    messages = {n: dict(experiment.method.context.initial) for n in nodes}
    poisoned = next(iter(graph.neighbours(0)))
    first = sorted(messages[poisoned])[0]
    bad = messages[poisoned][first].clone()
    bad.view(-1)[0] = float("nan")
    messages[poisoned] = {**messages[poisoned], first: bad}
    received = engine.round._exchange(messages, graph, 0)
    for node in nodes:
        neighbours = set(graph.neighbours(node))
        expected = neighbours - {poisoned}
        assert set(received[node]) == expected, node
    refused = engine.round.channel.ledger.rejections(0)
    assert {r.sender for r in refused} == {f"node{poisoned}"}
    assert all("NaN" in r.rejected for r in refused)


def test_fslora_robust_scatter_combines_each_component_over_its_drawers(tmp_path: Path) -> None:
    overrides = ["experiment.rounds=1", "federation.aggregator='median'"]
    experiment, engine = engine_for(overrides, tmp_path, "fslora.toml")
    method = experiment.method
    replies = {}
    for client in range(len(experiment.clients)):
        reply, _ = engine.round.runtime.train(client, method.server_message(client, 0), 0)
        replies[client] = reply
    delta = method._robust_delta(0, replies)
    for position, m in enumerate(method.context.modules):
        expected_b = np.zeros((m.d_out, m.rank))
        drawers: dict[int, list[np.ndarray]] = {}
        for client, reply in replies.items():
            for column, j in enumerate(method._index(0, client, position).tolist()):
                drawers.setdefault(j, []).append(reply[m.b][:, column].numpy())
        assert any(len(v) < len(replies) for v in drawers.values())  # sketches really differ
        for j, columns in drawers.items():
            expected_b[:, j] = np.median(np.stack(columns), axis=0)
        np.testing.assert_allclose(delta[m.b].numpy(), expected_b, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    ("overrides", "aggregated"),
    [
        (["federation.dropout=0.5"], 3),
        # Round 0's downloads are 8,588 bytes, the ones carrying the factors 9,652: refused
        # every round, so the clients never train on them, and the run still ends cleanly.
        (["federation.max_message_bytes=9000"], 1),
    ],
)
def test_fedsb_sends_its_fixed_factors_until_a_reply_shows_they_arrived(
    overrides: list[str], aggregated: int, tmp_path: Path
) -> None:
    """Fed-SB's server state changes when a reply arrives, not when a download is built: a
    client that dropped out, or whose download carrying the factors was refused, gets them
    again (before, it was marked as served and its next round failed with a KeyError)."""
    code, output = run_cli(
        "run", str(TINY / "fedsb.toml"), "--out", str(tmp_path), "--quiet",
        "--set", "experiment.rounds=4", *[a for o in overrides for a in ("--set", o)],
    )  # fmt: skip
    assert code == 0, output
    metrics = read_metrics(tmp_path)
    assert any(m.get("absent") for m in metrics)  # the fault did happen
    assert sum(1 for m in trained(metrics) if not m.get("skipped")) >= aggregated
