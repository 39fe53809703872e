"""Issue 31's RAVAN and Dec-LoRA with a frozen A.

Each method's defining identities are checked with real numbers against independent numpy
computations (float64, dense products, numpy's own eigenvalues): RAVAN's average of the cores
s_i H_i is the average of the clients' updates, its bases are shared and orthonormal, and its
optimizer trains H_i and s_i as their own parametrisation does; frozen-A gossip leaves A alone,
keeps the mean of B and contracts B's consensus error by at most λ2 a step. Then each runs 2 tiny
rounds through ``fedlora run`` with every ledger record checked against the bytes its message
shapes imply, a 1-round run resumed to 2 rounds equals the straight run, the declared privacy and
robustness combinations run, and each refusal answers with its reason.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from fedlora.checkpoint import load_checkpoint
from fedlora.config import config_from_dict, load_config
from fedlora.engines.gossip import consensus_distance
from fedlora.experiment import Experiment, build
from fedlora.methods import registry
from fedlora.methods.base import MethodContext
from fedlora.methods.declora import DecLoRA, DecLoRAOptions
from fedlora.methods.ravan import CORES, Ravan, RavanOptions, head_optimizer, orthonormal_heads
from fedlora.models import load_base_model, load_tokenizer
from fedlora.preflight import check_config
from fedlora.tensors import LoraModule
from fedlora.topology import erdos_renyi, metropolis_hastings, ring, ring_weights
from tests.conftest import (
    ADAPTIVE_CENTRAL,
    ONE,
    TINY,
    read_metrics,
    run_cli,
)
from tests.test_baselines_2025 import np64
from tests.test_methods_2026 import (
    DP_SGD,
    assert_refused,
    assert_resumes_exactly,
    ledger,
    sets,
)
from tests.test_methods_2026 import straight as straight  # the tiny runs, once per module
from tests.test_methods_server import framed

D, K, HEADS, HEAD_RANK = 12, 10, 2, 3
RANK = HEADS * HEAD_RANK
WEIGHTS = {0: 0.5, 1: 0.3, 2: 0.2}
B_KEY, A_KEY, HEAD = "m.lora_B.weight", "m.lora_A.weight", "classifier.weight"


# -- RAVAN -------------------------------------------------------------------------------------


def ravan(seed: int = 0, optimizer: str = "adamw") -> Ravan:
    """One D×K module of slot rank HEADS·HEAD_RANK (s = 4/RANK) and a head, three clients."""
    config = config_from_dict(
        {
            "experiment": {"seed": seed},
            "lora": {"rank": RANK, "alpha": 4.0},
            "method": {"name": "ravan", "heads": HEADS},
            "train": {"lr": 0.05, "optimizer": optimizer},
        }
    )
    generator = torch.Generator().manual_seed(seed)
    initial = {
        B_KEY: torch.zeros(D, RANK),
        A_KEY: torch.randn(RANK, K, generator=generator),
        HEAD: torch.randn(3, 4, generator=generator),
    }
    context = MethodContext(config, [LoraModule("m", D, K, RANK, 4.0 / RANK)], initial, [10] * 3)
    return Ravan(context, RavanOptions(heads=HEADS))


def bases(method: Ravan) -> tuple[np.ndarray, np.ndarray]:
    """B_i (h × D × r_h) and A_i (h × r_h × K) in numpy."""
    return np64(method.bases_b["m"]), np64(method.bases_a["m"]).transpose(0, 2, 1)


def heads_sum(b: np.ndarray, cores: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Σ_i B_i C_i A_i, dense."""
    return sum(b[i] @ cores[i] @ a[i] for i in range(len(cores)))


def test_ravan_bases_are_shared_orthonormal_and_keep_their_scale_at_any_width() -> None:
    """The same seed gives every party the same bases, another seed others; the stacked B_i
    and A_iᵀ have orthonormal columns (heads in orthogonal subspaces), so ‖Σ_i B_i H_i A_i‖_F =
    ‖H‖_F, also at width 2048 where an unscaled N(0, 1) basis multiplies it by ~√(d·k); where
    h·r_h exceeds the width each head is orthonormal on its own."""
    first, again, other = ravan(0), ravan(0), ravan(1)
    for key in ("m",):
        assert torch.equal(first.bases_b[key], again.bases_b[key])
        assert torch.equal(first.bases_a[key], again.bases_a[key])
        assert not torch.allclose(first.bases_b[key], other.bases_b[key])
    b, a = bases(first)
    stacked_b = np.concatenate(list(b), axis=1)  # D × h·r_h
    stacked_a = np.concatenate(list(a), axis=0)  # h·r_h × K
    np.testing.assert_allclose(stacked_b.T @ stacked_b, np.eye(RANK), atol=1e-6)
    np.testing.assert_allclose(stacked_a @ stacked_a.T, np.eye(RANK), atol=1e-6)
    cores = np.random.default_rng(2).standard_normal((HEADS, HEAD_RANK, HEAD_RANK))
    assert np.linalg.norm(heads_sum(b, cores, a)) == pytest.approx(np.linalg.norm(cores))

    generator = torch.Generator().manual_seed(3)
    wide_b = orthonormal_heads(2048, HEADS, HEAD_RANK, generator).numpy()
    wide_a = orthonormal_heads(1024, HEADS, HEAD_RANK, generator).numpy().transpose(0, 2, 1)
    assert np.linalg.norm(heads_sum(wide_b, cores, wide_a)) == pytest.approx(
        np.linalg.norm(cores), rel=1e-9
    )
    crowded = orthonormal_heads(4, 3, 2, generator).numpy()  # 3·2 > 4
    for head in crowded:
        np.testing.assert_allclose(head.T @ head, np.eye(2), atol=1e-12)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_head_optimizer_trains_h_and_s_as_their_own_parametrisation_does(optimizer: str) -> None:
    """Steps through the slot B = [s_i B_i H_i] equal ``[train]``'s optimizer run directly on
    H and s with autograd through Σ_i s_i B_i H_i A_i (weight decay and momentum included),
    from nonzero cores, so s moves from the first step."""
    train = config_from_dict(
        {"train": {"optimizer": optimizer, "lr": 0.005, "weight_decay": 0.1, "momentum": 0.5}}
    ).train
    generator = torch.Generator().manual_seed(8)
    u = orthonormal_heads(D, HEADS, HEAD_RANK, generator)  # float64: exactly orthonormal
    a = torch.randn(RANK, K, generator=generator, dtype=torch.float64)
    h0 = torch.randn(HEADS, HEAD_RANK, HEAD_RANK, generator=generator, dtype=torch.float64)
    target = torch.randn(D, K, generator=generator, dtype=torch.float64)

    def loss(slot_b: torch.Tensor) -> torch.Tensor:
        return ((2.0 * slot_b @ a - target) ** 2).sum()

    def slot(cores: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return torch.cat([scales[i] * u[i] @ cores[i] for i in range(HEADS)], dim=1)

    slot_b = torch.nn.Parameter(slot(h0, torch.ones(HEADS, dtype=torch.float64)))
    ours = head_optimizer()([(B_KEY, slot_b)], {B_KEY: u}, train)
    h = torch.nn.Parameter(h0.clone())
    s = torch.nn.Parameter(torch.ones(HEADS, dtype=torch.float64))
    reference = (
        torch.optim.AdamW([h, s], lr=0.005, weight_decay=0.1)
        if optimizer == "adamw"
        else torch.optim.SGD([h, s], lr=0.005, momentum=0.5, weight_decay=0.1)
    )
    for _ in range(5):
        ours.zero_grad()
        loss(slot_b).backward()
        ours.step()
        reference.zero_grad()
        loss(slot(h, s)).backward()
        reference.step()
    assert (s.detach() - 1).abs().max() > 1e-3  # the scalars did train
    torch.testing.assert_close(ours.cores[slot_b].detach(), h.detach(), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(ours.scales[slot_b].detach(), s.detach(), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(slot_b.detach(), slot(h, s).detach(), rtol=1e-9, atol=1e-10)


def test_ravan_server_average_is_the_average_of_the_clients_updates() -> None:
    """Two rounds of three clients, each training H_i and s_i by its optimizer on its own
    least-squares target: every reply is s_i^k H_i^k (the optimizer's own tensors), slot A stays
    [A_1; A_2], and the new global model satisfies, in numpy,
    Σ_i B_i H_i^new A_i = Σ_k p_k Σ_i s_i^k B_i H_i^k A_i, with H_i^new downloaded next round."""
    method = ravan()
    b, a = bases(method)
    scale = method.context.modules[0].scale
    generator = torch.Generator().manual_seed(5)
    targets = [torch.randn(D, K, generator=generator) for _ in WEIGHTS]
    for round_index in range(2):
        replies, expected = {}, np.zeros((D, K))
        for client, target in enumerate(targets):
            message = method.server_message(client, round_index)
            assert set(message) == {"m" + CORES, HEAD}
            assert method.expected_reply(client, message) == {
                "m" + CORES: (HEADS, HEAD_RANK, HEAD_RANK),
                HEAD: (3, 4),
            }
            start = method.client_start(client, message, {})
            np.testing.assert_allclose(np64(start[A_KEY]), np.concatenate(list(a)), atol=1e-6)
            slots = {k: torch.nn.Parameter(v.clone()) for k, v in start.items()}
            assert not method.trainable(A_KEY) and method.trainable(B_KEY)
            optimizer = method.local_optimizer([(B_KEY, slots[B_KEY])], method.context.config.train)
            for _ in range(4):
                optimizer.zero_grad()
                ((scale * slots[B_KEY] @ slots[A_KEY] - target) ** 2).sum().backward()
                optimizer.step()
            trained = {k: p.detach() for k, p in slots.items()}
            assert torch.equal(trained[A_KEY], start[A_KEY])
            cores = np64(optimizer.cores[slots[B_KEY]])
            scales = np64(optimizer.scales[slots[B_KEY]])
            if round_index:
                assert np.abs(scales - 1).max() > 1e-3
            replies[client] = method.client_reply(client, trained, message, {})
            np.testing.assert_allclose(
                np64(replies[client]["m" + CORES]), scales[:, None, None] * cores, atol=1e-5
            )
            expected += WEIGHTS[client] * heads_sum(b, scales[:, None, None] * cores, a)
        method.aggregate(round_index, replies, WEIGHTS)
        state = method.global_state()
        np.testing.assert_allclose(np64(state[B_KEY]) @ np64(state[A_KEY]), expected, atol=1e-5)
        np.testing.assert_allclose(
            heads_sum(b, np64(method.server_message(0, round_index + 1)["m" + CORES]), a),
            expected,
            atol=1e-5,
        )


def test_ravan_secure_mean_step_equals_the_step_on_each_reply() -> None:
    """Declared secure aggregation: the server step from Σ p_k reply_k alone is the same."""
    each, mean_only = ravan(), ravan()
    generator = torch.Generator().manual_seed(6)
    replies = {
        c: {
            "m" + CORES: torch.randn(HEADS, HEAD_RANK, HEAD_RANK, generator=generator),
            HEAD: torch.randn(3, 4, generator=generator),
        }
        for c in WEIGHTS
    }
    each.aggregate(0, replies, WEIGHTS)
    mean = {k: sum(WEIGHTS[c] * replies[c][k] for c in replies) for k in replies[0]}
    mean_only.aggregate_mean(0, mean)
    for key, value in each.global_state().items():
        torch.testing.assert_close(value, mean_only.global_state()[key])


# -- Dec-LoRA with a frozen A ------------------------------------------------------------------

NODES = 6


def frozen_declora() -> DecLoRA:
    config = config_from_dict({"lora": {"rank": 2}, "method": {"name": "declora"}})
    generator = torch.Generator().manual_seed(0)
    initial = {
        B_KEY: torch.zeros(D, 2, dtype=torch.float64),
        A_KEY: torch.randn(2, K, generator=generator, dtype=torch.float64),
        HEAD: torch.zeros(3, 4, dtype=torch.float64),
    }
    context = MethodContext(config, [LoraModule("m", D, K, 2, 1.0)], initial, [10] * NODES)
    return DecLoRA(context, DecLoRAOptions(freeze_a=True))


def trained_nodes(method: DecLoRA, seed: int, direction: np.ndarray | None = None) -> list[dict]:
    """Every node's full model after local steps: the frozen A, its own B and head (B_i =
    direction_i · M for one matrix M when ``direction`` is given)."""
    generator = torch.Generator().manual_seed(seed)
    common = torch.randn(D, 2, generator=generator, dtype=torch.float64)
    nodes = []
    for node in range(NODES):
        b = torch.randn(D, 2, generator=generator, dtype=torch.float64)
        if direction is not None:
            b = float(direction[node]) * common
        head = torch.randn(3, 4, generator=generator, dtype=torch.float64)
        nodes.append({**method.own_model(node, {}), B_KEY: b, HEAD: head})
    return nodes


def gossip_step(method: DecLoRA, nodes: list[dict], w: np.ndarray) -> list[dict]:
    """One round's exchange through the method's hooks: replies, mix with row i of W, keep."""
    messages = [method.client_reply(i, nodes[i], {}, {}) for i in range(NODES)]
    mixed = []
    for i in range(NODES):
        row = {j: float(w[i, j]) for j in range(NODES) if w[i, j] > 0}
        store: dict = {}
        method.keep(store, method.mix(i, {j: messages[j] for j in row}, row))
        mixed.append(method.client_start(i, {}, store))
    return mixed


GRAPHS = {
    "ring": lambda: ring_weights(ring(NODES)),
    "erdos_renyi": lambda: metropolis_hastings(erdos_renyi(NODES, 0.5, 3)),
}


@pytest.mark.parametrize("graph", sorted(GRAPHS))
def test_frozen_a_gossip_keeps_a_and_the_mean_of_b_and_is_numpys_w_times_b(graph: str) -> None:
    """A never moves and never leaves the node; each node's B is numpy's Σ_j w_ij B_j (so the
    products mix exactly: B_i′A = Σ_j w_ij B_j A), the mean of B and of the products is kept."""
    method, w = frozen_declora(), GRAPHS[graph]()
    a0 = np64(method.context.initial[A_KEY])
    assert not method.trainable(A_KEY) and method.trainable(B_KEY)
    assert method.message_schema({A_KEY: (2, K), B_KEY: (D, 2), HEAD: (3, 4)}) == {
        B_KEY: (D, 2),
        HEAD: (3, 4),
    }
    nodes = trained_nodes(method, seed=1)
    assert A_KEY not in method.client_reply(0, nodes[0], {}, {})
    mixed = gossip_step(method, nodes, w)
    stack = np.stack([np64(n[B_KEY]) for n in nodes])
    expected = np.einsum("ij,jdr->idr", w, stack)
    for i, node in enumerate(mixed):
        np.testing.assert_array_equal(np64(node[A_KEY]), a0)
        np.testing.assert_allclose(np64(node[B_KEY]), expected[i], atol=1e-12)
        np.testing.assert_allclose(
            np64(node[B_KEY]) @ a0, sum(w[i, j] * stack[j] @ a0 for j in range(NODES)), atol=1e-12
        )
    mixed_stack = np.stack([np64(n[B_KEY]) for n in mixed])
    np.testing.assert_allclose(mixed_stack.mean(0), stack.mean(0), atol=1e-12)
    np.testing.assert_allclose(
        np.mean([b @ a0 for b in mixed_stack], 0), np.mean([b @ a0 for b in stack], 0), atol=1e-12
    )


@pytest.mark.parametrize("graph", sorted(GRAPHS))
def test_frozen_a_consensus_error_contracts_by_at_most_lambda2_per_step(graph: str) -> None:
    """‖B′ − B̄‖ ≤ |λ2(W)|·‖B − B̄‖ over three mixing steps from random B (λ2 from numpy's
    eigenvalues), with equality when B starts along λ2's eigenvector; A stays one matrix."""
    method, w = frozen_declora(), GRAPHS[graph]()
    eigenvalues, vectors = np.linalg.eigh(w)
    order = np.argsort(-np.abs(eigenvalues))  # 1 first, then the largest other |λ|
    lambda2 = abs(eigenvalues[order[1]])
    assert lambda2 < 1
    names = [A_KEY, B_KEY]
    nodes = trained_nodes(method, seed=2)
    for _ in range(3):
        before = math.sqrt(consensus_distance(nodes, names))
        nodes = gossip_step(method, nodes, w)
        after = math.sqrt(consensus_distance(nodes, names))
        assert 0 < after <= lambda2 * before * (1 + 1e-9)
        assert all(torch.equal(n[A_KEY], method.context.initial[A_KEY]) for n in nodes)
    nodes = trained_nodes(method, seed=3, direction=vectors[:, order[1]])
    before = math.sqrt(consensus_distance(nodes, names))
    after = math.sqrt(consensus_distance(gossip_step(method, nodes, w), names))
    assert after == pytest.approx(lambda2 * before, rel=1e-9)


# -- end to end ----------------------------------------------------------------------------------

TINY_RUNS = ["ravan", "declora_frozen_a"]


def head_shapes(experiment: Experiment) -> dict[str, tuple[int, ...]]:
    initial = experiment.method.context.initial
    shapes = {k: tuple(v.shape) for k, v in initial.items() if ".lora_" not in k}
    assert shapes  # the tiny configs train the head
    return shapes


def ravan_message(experiment: Experiment) -> dict[str, tuple[int, ...]]:
    """RAVAN's message either way: per module h cores of r_h × r_h (h = method.heads, r_h =
    lora.rank / h), and the head; no factor crosses."""
    config = experiment.config
    heads = config.method.options()["heads"]
    head_rank = config.lora.rank // heads
    shapes = head_shapes(experiment)
    for m in experiment.slots.modules:
        shapes[m.key + CORES] = (heads, head_rank, head_rank)
    return shapes


def gossip_message(experiment: Experiment, with_a: bool) -> dict[str, tuple[int, ...]]:
    """A node's message: B (d_out × r) per module, A (r × d_in) unless frozen, and the head."""
    shapes = head_shapes(experiment)
    for m in experiment.slots.modules:
        shapes[m.b] = (m.d_out, m.rank)
        if with_a:
            shapes[m.a] = (m.rank, m.d_in)
    return shapes


def finite_rounds(run: Path) -> list[dict]:
    metrics = read_metrics(run)
    assert [m["round"] for m in metrics] == [0, 1, 2]
    for m in metrics[1:]:
        assert math.isfinite(m["train_loss"]) and math.isfinite(m["test_loss"])
        assert 0.0 <= m["accuracy"] <= 1.0
    return metrics[1:]


def test_tiny_ravan_run_sends_only_cores_and_exports_a_standard_lora_adapter(straight) -> None:
    """Every message is h r_h × r_h cores per module plus the head, up and down (the bytes of
    those shapes); the exported adapter's A is the stacked bases [A_1; …; A_h] and PEFT's
    ``from_pretrained`` reproduces the final model's logits exactly."""
    run = straight("ravan")
    finite_rounds(run)
    experiment = build(load_config(run / "config.toml"))
    expected = framed(ravan_message(experiment))
    records = ledger(run)
    assert len(records) == 2 * 2 * 4  # rounds × directions × clients
    assert all(record["bytes"] == expected for record in records)
    lora_floats = sum(m.rank * (m.d_in + m.d_out) for m in experiment.slots.modules)
    core_floats = sum(math.prod(s) for k, s in ravan_message(experiment).items() if CORES in k)
    assert core_floats * 2 <= lora_floats  # 4·4² = 64 floats a module against LoRA's 16·64
    method = experiment.method
    assert isinstance(method, Ravan)
    checkpoint = load_checkpoint(run)
    assert checkpoint is not None
    method.load_state_dict(checkpoint.method)
    final = method.global_state()
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    assert adapter.keys() == final.keys()
    assert all(torch.equal(adapter[k], final[k]) for k in final)
    for m in experiment.slots.modules:
        stacked = np.concatenate(list(np64(method.bases_a[m.key]).transpose(0, 2, 1)))
        np.testing.assert_array_equal(np64(adapter[m.a]), stacked.astype(np.float32))
    experiment.slots.load(final)
    experiment.slots.model.eval()
    batch = experiment.train_set.batch(list(range(6)))
    config = experiment.config
    base = load_base_model(
        config.model.name,
        len(experiment.split.label_names),
        load_tokenizer(config.model.name),
        seed=config.experiment.seed,
    )
    reloaded = PeftModel.from_pretrained(base, run / "adapter").eval()
    with torch.no_grad():
        expected = experiment.slots.model(**batch).logits
        torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=0, atol=0)


def test_tiny_frozen_a_run_never_sends_or_moves_a(straight) -> None:
    """Each of the 2 × 8 directed ring messages is B and the head (the bytes of those shapes,
    less than Dec-LoRA's B, A and head); every node's exported A is the common initial A; the
    consensus metrics are finite and shrink in the mix."""
    run = straight("declora_frozen_a")
    for m in finite_rounds(run):
        assert m["consensus_distance"] < m["consensus_before_mix"]
    experiment = build(load_config(run / "config.toml"))
    expected = framed(gossip_message(experiment, with_a=False))
    records = ledger(run)
    assert len(records) == 2 * 8
    assert all(record["bytes"] == expected for record in records)
    assert expected < framed(gossip_message(experiment, with_a=True))
    initial = experiment.method.context.initial
    for node in range(4):
        adapter = load_file(run / "adapters" / f"client_{node}" / "adapter_model.safetensors")
        for m in experiment.slots.modules:
            assert torch.equal(adapter[m.a], initial[m.a])
    stores = load_file(run / "checkpoint.safetensors")
    assert not any(k.startswith("store/") and ".lora_A." in k for k in stores)


@pytest.mark.parametrize("private", [False, True])
def test_frozen_a_local_steps_move_b_and_never_a(private: bool) -> None:
    """A node's local steps on the tiny model, plain and under DP-SGD, leave every A as the
    common init and move every B."""
    experiment = build(load_config(TINY / "declora_frozen_a.toml", DP_SGD if private else []))
    method = experiment.method
    start = method.client_start(0, {}, {})
    result = experiment.trainer.train(start, experiment.clients[0], 0, 0, method.trainable)
    for m in experiment.slots.modules:
        assert torch.equal(result.state[m.a], method.context.initial[m.a])
        assert not torch.equal(result.state[m.b], start[m.b])


@pytest.mark.parametrize("name", TINY_RUNS)
def test_a_resumed_run_ends_where_the_straight_run_does(
    name: str, straight, tmp_path: Path
) -> None:
    """1 round, then --resume to 2: the same metrics, ledger and checkpoint tensors."""
    assert_resumes_exactly(name, straight(name), tmp_path / "part")


COMBINATIONS = {
    ("ravan", "central DP"): [*ADAPTIVE_CENTRAL, "privacy.client_stats=true"],
    ("ravan", "secure aggregation"): ["privacy.secure_aggregation=true"],
    ("ravan", "median"): ["federation.aggregator=median"],
    ("ravan", "DP-SGD"): DP_SGD,
    ("declora_frozen_a", "DP-SGD"): DP_SGD,
    ("declora_frozen_a", "CHOCO 4-bit"): [
        "topology.quantize_bits=4",
        "topology.error_feedback=true",
        "topology.consensus_step=0.5",
    ],
}


@pytest.mark.parametrize(("name", "combination"), sorted(COMBINATIONS))
def test_declared_combinations_run(name: str, combination: str, tmp_path: Path) -> None:
    overrides = COMBINATIONS[(name, combination)]
    code, output = run_cli(
        "run", str(TINY / f"{name}.toml"), "--out", str(tmp_path), "--quiet", *ONE, *sets(overrides)
    )
    assert code == 0, output
    metrics = finite_rounds(tmp_path)
    assert not any(m.get("skipped") for m in metrics)
    if "DP" in combination:
        assert 0 < metrics[0]["epsilon"] < metrics[1]["epsilon"]


@pytest.mark.parametrize(
    ("name", "overrides", "reason"),
    [
        ("ravan", ["ranks.profile=uniform"], "method 'ravan' trains every client at lora.rank"),
        ("ravan", ["method.heads=3"], "choose heads dividing lora.rank"),
        ("ravan", ["method.heads=0"], "method.heads"),
        ("ravan", ["lora.rank=64", "method.heads=1"], "heads have rank 64, more than"),
        ("declora_frozen_a", ["topology.mix_space='products'"], "mix_space 'products'"),
        ("declora_frozen_a", ["method.freeze_a='sometimes'"], "method.freeze_a"),
        (
            "declora_frozen_a",
            ["ranks.profile=uniform"],
            "method 'declora' trains every client at lora.rank",
        ),
        ("declora_frozen_a", ADAPTIVE_CENTRAL, "does not aggregate by a mean of client updates"),
        ("declora_frozen_a", ["privacy.secure_aggregation=true"], "'gossip' engine"),
        ("declora_frozen_a", ["federation.aggregator=median"], "does not aggregate by a mean"),
    ],
)
def test_refusals_give_their_reason(
    name: str, overrides: list[str], reason: str, tmp_path: Path
) -> None:
    assert_refused(name, overrides, reason, tmp_path)


def test_the_declared_compatibility_passes_the_config_checks() -> None:
    """RAVAN: a mean of replies (robust rules, central DP) that needs nothing but the mean
    (secure aggregation), DP-SGD; Dec-LoRA with a frozen A: DP-SGD on the gossip engine."""
    cls = registry()["ravan"]
    assert cls.mean_of_replies and not cls.needs_each_reply and not cls.heterogeneous_ranks
    for combination in (ADAPTIVE_CENTRAL, ["privacy.secure_aggregation=true"], DP_SGD):
        check_config(load_config(TINY / "ravan.toml", combination))
    check_config(load_config(TINY / "ravan.toml", ["federation.aggregator=trimmed_mean"]))
    check_config(load_config(TINY / "declora_frozen_a.toml", DP_SGD))
