"""The issue-3 LoRA-family methods on real adapters and through the real engine.

FFA exactness vs FedIT noise after local training on the tiny model (§7 T1/T2), the cumulative
rank bounds of §7 T6 on a synthetic least-squares problem, a 2-round run of every method with its
measured bytes checked against the §1.4 formula, and an exact FLoRA resume.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as safetensors_bytes

from fedlora.config import Config, config_from_dict, load_config
from fedlora.experiment import Experiment, build
from fedlora.methods import method_class, registry
from fedlora.methods.base import Method, MethodContext
from fedlora.methods.fedit import FedIT
from fedlora.tensors import LoraModule
from tests.conftest import TINY, run, trained, without_timing

ISSUE3 = ["ffa", "fedsa", "flexlora", "hetlora", "flora", "fslora", "fslora_code_compat"]
FULL_WEIGHTS = ["dwa", "fedftg", "fedftg_code_compat"]


# -- §7 T1/T2 on real adapters ----------------------------------------------------------------


def test_ffa_aggregation_is_exact_where_fedit_is_not() -> None:
    experiment = build(load_config(TINY / "ffa.toml"))
    ffa = experiment.method
    fedit = FedIT(ffa.context, ffa.options)
    products: dict[str, list[float]] = {}
    for method in (ffa, fedit):
        replies, full = {}, {}
        for client in (0, 1):
            message = method.server_message(client, 0)
            start = method.client_start(client, message, {})
            result = experiment.trainer.train(
                start, experiment.clients[client], 0, client, method.trainable
            )
            full[client] = result.state
            replies[client] = method.client_reply(client, result.state, message, {})
        sizes = [len(experiment.clients[c]) for c in (0, 1)]
        p = [s / sum(sizes) for s in sizes]
        method.aggregate(0, replies, dict(enumerate(p)))
        merged = method.global_state()
        gaps = []
        for m in experiment.slots.modules:
            ideal = sum(p[c] * full[c][m.b].double() @ full[c][m.a].double() for c in (0, 1))
            gaps.append(float((merged[m.b].double() @ merged[m.a].double() - ideal).norm()))
        products[method.name] = gaps
        if method is ffa:  # A never moved and never travelled
            for m in experiment.slots.modules:
                assert torch.equal(full[0][m.a], ffa.context.initial[m.a])
                assert m.a not in replies[0] and m.b in replies[0]
    assert max(products["ffa"]) < 1e-7  # float32 averaging of B only: exact up to rounding
    assert max(products["fedit"]) > 1e3 * max(max(products["ffa"]), 1e-12)


# -- §7 T6 rank of the cumulative update on synthetic least squares ----------------------------

D, K, R = 10, 8, 2


def synthetic_context(name: str, clients: int = 3) -> MethodContext:
    config: Config = config_from_dict(
        {"lora": {"rank": R, "alpha": 2.0}, "method": {"name": name}, "train": {"lr": 0.1}}
    )
    module = LoraModule("m", D, K, R, 1.0)
    generator = torch.Generator().manual_seed(0)
    initial = {module.b: torch.zeros(D, R), module.a: torch.randn(R, K, generator=generator)}
    return MethodContext(config, [module], initial, [10] * clients, [R] * clients)


def local_least_squares(method: Method, client: int, start: dict, target: torch.Tensor, base):
    """A few GD steps on ‖W0 + s·B·A − W*_i‖² over the tensors the method trains."""
    scale = (method.client_scales(client) or {"m": 1.0})["m"]
    state = {k: v.clone().requires_grad_(method.trainable(k)) for k, v in start.items()}
    for _ in range(5):
        loss = (
            (base + scale * state["m.lora_B.weight"] @ state["m.lora_A.weight"] - target) ** 2
        ).sum()
        grads = torch.autograd.grad(loss, [v for v in state.values() if v.requires_grad])
        with torch.no_grad():
            for v, g in zip([v for v in state.values() if v.requires_grad], grads, strict=True):
                v -= 0.01 * g
    return {k: v.detach() for k, v in state.items()}


@pytest.mark.parametrize("name", ["fedit", "ffa", "flexlora", "flora"])
def test_t6_rank_of_the_cumulative_update(name: str) -> None:
    context = synthetic_context(name)
    method = method_class(name)(context, method_class(name).Options())
    generator = torch.Generator().manual_seed(1)
    targets = [torch.randn(D, K, generator=generator) for _ in range(3)]  # full-rank optima
    rounds = 4
    for round_index in range(rounds):
        offset = method.base_offset()
        base = offset["m"] if offset else torch.zeros(D, K)
        replies = {}
        for client in range(3):
            message = method.server_message(client, round_index)
            start = method.client_start(client, message, {})
            trained = local_least_squares(method, client, start, targets[client], base)
            replies[client] = method.client_reply(client, trained, message, {})
        method.aggregate(round_index, replies, {c: 1 / 3 for c in range(3)})
    if name == "flora":
        update = method.base_offset()["m"]
        assert R < int(torch.linalg.matrix_rank(update)) <= min(rounds * 3 * R, D, K)
        return
    state = method.global_state()
    update = state["m.lora_B.weight"] @ state["m.lora_A.weight"]
    assert 0 < int(torch.linalg.matrix_rank(update)) <= R
    if name == "ffa":  # row space stays inside rowspace(A0)
        a0 = context.initial["m.lora_A.weight"]
        projector = torch.linalg.pinv(a0) @ a0
        assert torch.allclose(update @ projector, update, atol=1e-5)


# -- every method end to end, with the ledger checked against §1.4 -----------------------------


def framed(shapes: dict[str, tuple[int, ...]]) -> int:
    """Bytes of a safetensors message of float32 tensors with these names and shapes: 4 bytes a
    value plus the 8-byte length and the JSON header (names, dtypes, shapes, offsets), whose size
    depends only on names and shapes. Computed by serialising zeros of the formula's shapes."""
    return len(safetensors_bytes({k: torch.zeros(s) for k, s in shapes.items()}))


def expected_shapes(name: str, experiment: Experiment, client: int, round_index: int, up: bool):
    """§1.4 per client and round: {tensor: shape}; the values per module are the formula's."""
    method, modules = experiment.method, experiment.slots.modules
    head = {k: tuple(v.shape) for k, v in method.context.initial.items() if ".lora_" not in k}
    r_i = method.context.rank(client)
    shapes: dict[str, tuple[int, ...]] = {}
    for target in experiment.config.lora.target_modules or experiment.spec.default_targets:
        for path, layer in experiment.slots.model.named_modules():
            if name in FULL_WEIGHTS and path.endswith(f".{target}.base_layer"):  # d·k
                key = path.removesuffix(".base_layer") + ".ln_tuning_layers.weight"
                shapes[key] = (layer.out_features, layer.in_features)
    for m in modules:
        d, k = m.d_out, m.d_in
        if name == "ffa":  # r·d
            shapes[m.b] = (d, r_i)
        elif name == "fedsa":  # r·k
            shapes[m.a] = (r_i, k)
        elif name == "flora" and not up:  # (Σ_j r_j)(d+k), nothing before the first merge
            if round_index > 0:
                total = sum(method.context.rank(c) for c in range(len(experiment.clients)))
                shapes[m.b], shapes[m.a] = (d, total), (total, k)
        else:  # r_i(d+k), FSLoRA k_i(d+k) + the index set
            shapes[m.b], shapes[m.a] = (d, r_i), (r_i, k)
            if name == "fslora" and not up and r_i < m.rank:
                shapes[m.key + ".sketch_index"] = (r_i,)
    if name != "fedsa":
        shapes.update(head)
    return shapes


@pytest.mark.parametrize("name", ISSUE3 + FULL_WEIGHTS)
def test_two_round_run_and_measured_bytes_match_the_formula(name: str, finished) -> None:
    experiment, _, result = finished(name)
    assert [m["round"] for m in result.metrics] == [0, 1, 2]  # 0: the initial model
    assert all(math.isfinite(m["train_loss"]) for m in trained(result.metrics))
    assert 0.0 <= result.metrics[-1]["accuracy"] <= 1.0
    pruned = 0
    for record in result.ledger.records:
        up = record.receiver == "server"
        client = int((record.sender if up else record.receiver).removeprefix("client"))
        shapes = expected_shapes(name, experiment, client, record.round, up)
        if name == "hetlora" and up and record.bytes != framed(shapes):
            # Self-pruning: the reply carries ⌊γ r_i⌋ components instead of r_i.
            low = max(1, math.floor(0.99 * experiment.method.context.rank(client)))
            shapes = {
                k: (s[0], low)
                if k.endswith("lora_B.weight")
                else (low, s[1])
                if k.endswith("lora_A.weight")
                else s
                for k, s in shapes.items()
            }
            pruned += 1
        assert record.bytes == framed(shapes), (record, shapes)
        payload = 4 * sum(math.prod(s) for s in shapes.values())
        assert 0 < record.bytes - payload <= 8 + sum(len(k) + 80 for k in shapes)
    if name == "hetlora":
        assert pruned == sum(
            r != experiment.method.current[c] for c, r in enumerate(experiment.method.context.ranks)
        )


@pytest.mark.parametrize("name", ["flora", "fedex", "fedsb", "frlora"])
def test_resume_rebuilds_method_state_and_base_exactly(name: str, tmp_path: Path, finished) -> None:
    """Methods that merge into the frozen base (or keep server state beyond the adapter):
    a run resumed after round 1 ends with the metrics and base weights of a straight run."""
    _, straight, full = finished(name)
    _, first = run(name, tmp_path / "resumed", rounds=1)
    first.run(show_progress=False)
    experiment, engine = run(name, tmp_path / "resumed")
    assert engine.resume() == 1
    resumed = engine.run(1, show_progress=False)
    assert without_timing(resumed.metrics) == without_timing(full.metrics)
    weights = {k: v for k, v in experiment.slots.model.state_dict().items() if "base_layer" in k}
    reference = straight.exp.slots.model.state_dict()
    assert weights and all(torch.equal(v, reference[k]) for k, v in weights.items())


def test_every_issue3_method_is_registered() -> None:
    assert set(ISSUE3 + FULL_WEIGHTS) <= set(registry())
