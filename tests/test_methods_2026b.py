"""Issue 31's RAVAN.

Its defining identities are checked with real numbers against independent numpy computations
(float64, dense products): RAVAN's average of the cores s_i H_i is the average of the clients'
updates, its bases are shared and orthonormal, and its optimizer trains H_i and s_i as their
own parametrisation does. Then it runs 2 tiny rounds through ``fedlora run`` with every ledger
record checked against the bytes its message shapes imply, a 1-round run resumed to 2 rounds
equals the straight run, the declared privacy and robustness combinations run, and each refusal
answers with its reason.
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
from fedlora.experiment import Experiment, build
from fedlora.methods import registry
from fedlora.methods.base import MethodContext
from fedlora.methods.ravan import CORES, Ravan, RavanOptions, head_optimizer, orthonormal_heads
from fedlora.models import load_base_model, load_tokenizer
from fedlora.preflight import check_config
from fedlora.tensors import LoraModule
from tests.conftest import (
    ADAPTIVE_CENTRAL,
    ONE,
    TINY,
    read_metrics,
    run_cli,
    timeless_metrics,
)
from tests.test_baselines_2025 import np64
from tests.test_methods_2026 import DP_SGD, ledger, sets
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


# -- end to end ----------------------------------------------------------------------------------

TINY_RUNS = ["ravan"]


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


@pytest.mark.parametrize("name", TINY_RUNS)
def test_a_resumed_run_ends_where_the_straight_run_does(
    name: str, straight, tmp_path: Path
) -> None:
    """1 round, then --resume to 2: the same metrics, ledger and checkpoint tensors."""
    whole, part = straight(name), tmp_path / "part"
    config = str(TINY / f"{name}.toml")
    args = ("--out", str(part), "--quiet", *ONE)
    assert run_cli("run", config, *args, "--set", "experiment.rounds=1")[0] == 0
    (part / "config.toml").write_text((whole / "config.toml").read_text())
    code, output = run_cli("run", config, *args, "--resume")
    assert code == 0, output
    assert timeless_metrics(part) == timeless_metrics(whole)
    assert ledger(part) == ledger(whole)
    finals = [load_file(run / "checkpoint.safetensors") for run in (whole, part)]
    assert finals[0].keys() == finals[1].keys()
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


COMBINATIONS = {
    ("ravan", "central DP"): ADAPTIVE_CENTRAL,
    ("ravan", "secure aggregation"): ["privacy.secure_aggregation=true"],
    ("ravan", "median"): ["federation.aggregator=median"],
    ("ravan", "DP-SGD"): DP_SGD,
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
    ],
)
def test_refusals_give_their_reason(
    name: str, overrides: list[str], reason: str, tmp_path: Path
) -> None:
    config = str(TINY / f"{name}.toml")
    code, output = run_cli("run", config, "--out", str(tmp_path), "--quiet", *sets(overrides))
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and reason in errors[0], output


def test_the_declared_compatibility_passes_the_config_checks() -> None:
    """RAVAN: a mean of replies (robust rules, central DP) that needs nothing but the mean
    (secure aggregation), DP-SGD."""
    cls = registry()["ravan"]
    assert cls.mean_of_replies and not cls.needs_each_reply and not cls.heterogeneous_ranks
    for combination in (ADAPTIVE_CENTRAL, ["privacy.secure_aggregation=true"], DP_SGD):
        check_config(load_config(TINY / "ravan.toml", combination))
    check_config(load_config(TINY / "ravan.toml", ["federation.aggregator=trimmed_mean"]))
