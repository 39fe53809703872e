"""Dec-LoRA (algorithms.md §2, §7 T9): mixing algebra on real tensors, the gossip engine's
exchange (quantized, CHOCO), and end-to-end runs through the CLI with resume."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedlora import experiment as experiments
from fedlora.config import Config, TopologyConfig, load_config
from fedlora.engines.gossip import GossipRound, consensus_distance, node_name
from fedlora.engines.placements import local_loop
from fedlora.lora import weighted_average
from fedlora.methods.base import MethodContext, NoOptions
from fedlora.methods.declora import DecLoRA
from fedlora.tensors import LoraModule, TensorDict
from fedlora.topology import Topology, erdos_renyi, laplacian, ring, ring_weights
from tests.conftest import TINY, run_cli, timeless_metrics, trained

MODULES = [LoraModule("m0", 6, 5, 2, 2.0), LoraModule("m1", 4, 7, 2, 2.0)]
FACTORS = [name for m in MODULES for name in (m.a, m.b)]
HEAD = "classifier.weight"


def random_states(nodes: int, seed: int = 0) -> list[TensorDict]:
    g = torch.Generator().manual_seed(seed)
    states = []
    for _ in range(nodes):
        state = {HEAD: torch.randn(3, 4, generator=g, dtype=torch.float64)}
        for m in MODULES:
            state[m.a] = torch.randn(m.rank, m.d_in, generator=g, dtype=torch.float64)
            state[m.b] = torch.randn(m.d_out, m.rank, generator=g, dtype=torch.float64)
        states.append(state)
    return states


def declora(**topology: object) -> DecLoRA:
    config = Config(topology=TopologyConfig(**topology))
    initial = random_states(1)[0]
    return DecLoRA(MethodContext(config, MODULES, initial, [10] * 6), NoOptions())


def mix_all(method: DecLoRA, states: list[TensorDict], w: torch.Tensor) -> list[TensorDict]:
    n = len(states)
    return [
        method.mix(
            i,
            {j: states[j] for j in range(n) if w[i, j] > 0},
            {j: float(w[i, j]) for j in range(n)},
        )
        for i in range(n)
    ]


def mean(states: list[TensorDict], key: str) -> torch.Tensor:
    return torch.stack([s[key] for s in states]).mean(0)


def mean_product(states: list[TensorDict], m: LoraModule) -> torch.Tensor:
    return torch.stack([s[m.b] @ s[m.a] for s in states]).mean(0)


# -- T9 on the method's own mixing ----------------------------------------------------------
def test_factor_mixing_keeps_the_average_factors_but_not_the_average_product() -> None:
    method = declora()
    for w in (ring_weights(ring(6)), laplacian(erdos_renyi(6, 0.5, 3))):
        states = random_states(6)
        mixed = mix_all(method, states, torch.as_tensor(w))
        for key in [*FACTORS, HEAD]:
            assert torch.allclose(mean(mixed, key), mean(states, key), atol=1e-10)
        for m in MODULES:
            assert (mean_product(mixed, m) - mean_product(states, m)).abs().max() > 1e-3
        assert consensus_distance(mixed, FACTORS) < consensus_distance(states, FACTORS)


def test_complete_graph_mixing_is_fedavg() -> None:
    states = random_states(6)
    mixed = mix_all(declora(), states, torch.full((6, 6), 1 / 6, dtype=torch.float64))
    fedavg = weighted_average(states, [10] * 6)
    for node in mixed:
        assert all(torch.allclose(node[k], fedavg[k], atol=1e-12) for k in fedavg)
    assert consensus_distance(mixed, FACTORS) < 1e-20


def test_product_mixing_is_the_best_rank_r_approximation_of_the_mixed_product() -> None:
    states = random_states(6)
    w = torch.as_tensor(ring_weights(ring(6)))
    mixed = mix_all(declora(mix_space="products"), states, w)
    for m in MODULES:
        target = sum(float(w[0, j]) * states[j][m.b] @ states[j][m.a] for j in (5, 0, 1))
        singular = torch.linalg.svdvals(target)
        error = torch.linalg.matrix_norm(mixed[0][m.b] @ mixed[0][m.a] - target) ** 2
        assert float(error) == pytest.approx(float((singular[m.rank :] ** 2).sum()), rel=1e-9)
        a = mixed[0][m.a]
        assert torch.allclose(a @ a.T, torch.eye(m.rank, dtype=a.dtype), atol=1e-12)  # gauge
    assert torch.allclose(mixed[0][HEAD], sum(states[j][HEAD] for j in (5, 0, 1)) / 3, atol=1e-12)


def test_network_model_in_factor_and_product_space() -> None:
    states = random_states(5)
    factors = declora().network_model(states)
    assert all(torch.allclose(factors[k], mean(states, k)) for k in [*FACTORS, HEAD])
    products = declora(average_model="products").network_model(states)
    for m in MODULES:
        singular = torch.linalg.svdvals(mean_product(states, m))
        error = (
            torch.linalg.matrix_norm(products[m.b] @ products[m.a] - mean_product(states, m)) ** 2
        )
        assert float(error) == pytest.approx(float((singular[m.rank :] ** 2).sum()), rel=1e-9)


# -- the engine's exchange on a real tiny model ----------------------------------------------
@pytest.fixture(scope="module")
def tiny_experiment() -> experiments.Experiment:
    return experiments.build(load_config(TINY / "declora.toml"))


def engine_for(exp: experiments.Experiment, tmp_path: Path, **topology: object) -> GossipRound:
    config = exp.config.model_copy(update={"topology": TopologyConfig(**topology)})
    round_ = local_loop(dataclasses.replace(exp, config=config), tmp_path, pooled=False).round
    assert isinstance(round_, GossipRound)
    return round_


def perturbed(exp: experiments.Experiment, nodes: int) -> dict[int, TensorDict]:
    g = torch.Generator().manual_seed(0)
    initial = exp.method.context.initial
    return {
        i: {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in initial.items()}
        for i in range(nodes)
    }


def test_quantized_gossip_keeps_the_own_term_exact(tiny_experiment, tmp_path: Path) -> None:
    engine = engine_for(tiny_experiment, tmp_path, kind="complete", quantize_bits=4)
    messages = perturbed(tiny_experiment, 4)
    graph = engine.topology.at(0)
    mixed = engine._gossip(messages, graph, round_index=0)
    codec = engine.codec
    for i in range(4):
        quantized = {
            j: codec.decode(codec.encode(messages[j], 0, node_name(j))) for j in range(4) if j != i
        }
        for key in messages[i]:
            expected = 0.25 * messages[i][key] + sum(0.25 * q[key] for q in quantized.values())
            assert torch.allclose(mixed[i][key], expected, atol=1e-6)
    assert len(engine.channel.ledger.records) == 12  # one message per directed edge


def test_choco_without_compression_is_plain_gossip(tiny_experiment, tmp_path: Path) -> None:
    plain = engine_for(tiny_experiment, tmp_path, kind="ring")
    choco = engine_for(tiny_experiment, tmp_path, kind="ring", error_feedback=True)
    messages = perturbed(tiny_experiment, 4)
    graph = plain.topology.at(0)
    expected = plain._gossip(messages, graph, 0)
    got = choco._choco(messages, graph, 0)
    for i in range(4):
        assert all(torch.allclose(got[i][k], expected[i][k], atol=1e-6) for k in expected[i])


def test_choco_compressed_gossip_converges_to_the_exact_average(
    tiny_experiment, tmp_path: Path
) -> None:
    """Pure gossip (no training) with 2-bit messages: error feedback reaches the true average."""
    engine = engine_for(
        tiny_experiment,
        tmp_path,
        kind="ring",
        quantize_bits=2,
        error_feedback=True,
        consensus_step=0.2,
    )
    states = perturbed(tiny_experiment, 4)
    target = {k: mean(list(states.values()), k) for k in states[0]}
    graph = engine.topology.at(0)
    start = consensus_distance(list(states.values()), engine.factors)
    for r in range(30):
        states = engine._choco(states, graph, r)
    assert consensus_distance(list(states.values()), engine.factors) < 1e-3 * start
    assert all(torch.allclose(mean(list(states.values()), k), target[k], atol=1e-6) for k in target)


# -- end to end through the CLI ----------------------------------------------------------------
rows = timeless_metrics


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "declora"
    code, output = run_cli("run", str(TINY / "declora.toml"), "--out", str(out), "--quiet")
    assert code == 0, output
    return out


def test_tiny_declora_run_end_to_end(tiny_run: Path) -> None:
    out = tiny_run
    metrics = rows(out)
    assert [m["round"] for m in metrics] == [0, 1, 2]  # 0: the initial model
    for m in trained(metrics):
        assert {"accuracy", "node_accuracy", "node_accuracy_std", "consensus_distance"} <= set(m)
        assert m["lambda2"] == pytest.approx(1 / 3)
        assert m["consensus_distance"] < m["consensus_before_mix"]
    ledger = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    assert len(ledger) == 2 * 8  # rounds × directed ring edges
    assert all(r["sender"].startswith("node") and r["receiver"].startswith("node") for r in ledger)
    assert len({r["bytes"] for r in ledger}) == 1
    summary = (out / "summary.md").read_text()
    assert "λ2 = 0.3333, spectral gap = 0.6667" in summary and "graph.png" in summary
    assert (out / "graph.png").is_file() and (out / "adapter").is_dir()
    assert sorted(p.name for p in (out / "adapters").iterdir()) == [f"client_{i}" for i in range(4)]


def test_resume_after_a_round_matches_the_uninterrupted_run(tiny_run: Path, tmp_path: Path) -> None:
    """A 1-round run continued with --resume equals the 2-round run: node states, ledger
    and metrics. (The constant learning rate makes a 1-round run's first round
    identical to a 2-round run's; the saved config is then swapped for the 2-round one.)"""
    part = tmp_path / "part"
    config = str(TINY / "declora.toml")
    assert (
        run_cli("run", config, "--out", str(part), "--set", "experiment.rounds=1", "--quiet")[0]
        == 0
    )
    (part / "config.toml").write_text((tiny_run / "config.toml").read_text())
    code, output = run_cli("run", config, "--out", str(part), "--resume", "--quiet")
    assert code == 0, output
    assert rows(part) == rows(tiny_run)
    finals = [load_file(run / "checkpoint.safetensors") for run in (tiny_run, part)]
    assert finals[0].keys() == finals[1].keys()
    assert {k.split("/")[1] for k in finals[0] if k.startswith("store/")} == {"0", "1", "2", "3"}
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


def test_topology_errors_stop_the_cli_with_one_message(tmp_path: Path) -> None:
    edges = tmp_path / "edges.txt"
    edges.write_text("0 1\n1 2\n2 9\n")
    code, output = run_cli(
        "run",
        str(TINY / "declora.toml"),
        "--out",
        str(tmp_path / "x"),
        "--quiet",
        "--set",
        "topology.kind=file",
        "--set",
        f"topology.edge_file={edges}",
    )
    assert code == 2 and "edges.txt:3" in output and "node ids must lie in 0..3" in output
    assert Topology(TopologyConfig(kind="ring"), 4, 0).at(0).lambda2 == pytest.approx(1 / 3)


# -- the 4-bit NF4 base (Dec-LoRA Table 4) ---------------------------------------------------
def test_nf4_base_trains_lora_through_quantized_layers() -> None:
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    from fedlora.nf4 import quantize_nf4

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        num_labels=3,
    )
    model = BertForSequenceClassification(config).eval().requires_grad_(False)
    ids, labels = torch.randint(0, 100, (4, 12)), torch.tensor([0, 1, 2, 1])
    reference = model(input_ids=ids).logits
    assert quantize_nf4(model, "classifier") == 2 * 6 + 1  # q, k, v, o, up, down per layer + pooler
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, bnb.nn.Linear4bit)
    assert type(model.classifier) is torch.nn.Linear  # the trained head stays float32
    assert (model(input_ids=ids).logits - reference).abs().max() < 0.1
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    trainable = [p for p in peft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-2)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = peft(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    first_a = peft.base_model.model.bert.encoder.layer[0].attention.self.query.lora_A["default"]
    assert first_a.weight.grad is not None and first_a.weight.grad.abs().sum() > 0
    assert losses[-1] < losses[0]


def test_nf4_refuses_layers_the_cpu_kernel_cannot_run(tmp_path: Path) -> None:
    code, output = run_cli(
        "run",
        str(TINY / "declora.toml"),
        "--out",
        str(tmp_path / "q"),
        "--quiet",
        "--set",
        "model.quantize_4bit=true",
    )
    assert code == 2 and "in_features 32" in output and "multiple of 64" in output


def test_k_in_epochs_can_be_chosen_from_a_config_file() -> None:
    """§2.2's K_unit: ``local_epochs`` alone (TOML cannot write None) replaces the default steps."""
    from fedlora.config import config_from_dict
    from fedlora.training import steps_per_round

    train = config_from_dict({"train": {"local_epochs": 1, "batch_size": 32}}).train
    assert train.local_steps is None and steps_per_round(train, 170) == 6
    assert config_from_dict({}).train.local_steps == 8
