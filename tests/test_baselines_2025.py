"""The 2025 baselines (issue 12): FedEx-LoRA, RoLoRA, LoRA-FAIR, Fed-SB and FRLoRA.

Each method's defining identity is checked with real numbers against an independent numpy
computation (float64, dense products), then every method runs 2 tiny rounds through the real
engine with each ledger record checked against the byte count its message shapes imply, and the
methods with server state resume exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedlora.config import config_from_dict
from fedlora.core_optimizer import CoreOptimizer
from fedlora.experiment import Experiment
from fedlora.methods import method_class, registry
from fedlora.methods.base import Method, MethodContext
from fedlora.methods.fedsb import CORE
from fedlora.tensors import LoraModule
from tests.conftest import trained
from tests.test_methods_server import framed, local_least_squares

NEW = ["fedex", "rolora", "lora_fair", "fedsb", "frlora"]
D, K, R, CLIENTS = 10, 8, 2, 3
WEIGHTS = {0: 0.5, 1: 0.3, 2: 0.2}
B_KEY, A_KEY = "m.lora_B.weight", "m.lora_A.weight"


def context(name: str, options: dict | None = None, alpha: float = 4.0) -> MethodContext:
    """One d×k module (s = alpha/r = 2) and three clients, no head."""
    config = config_from_dict(
        {
            "lora": {"rank": R, "alpha": alpha},
            "method": {"name": name, **(options or {})},
            "train": {"lr": 0.05},
        }
    )
    module = LoraModule("m", D, K, R, alpha / R)
    generator = torch.Generator().manual_seed(0)
    initial = {B_KEY: torch.zeros(D, R), A_KEY: torch.randn(R, K, generator=generator) / 3}
    return MethodContext(config, [module], initial, [10] * CLIENTS)


def make(name: str, options: dict | None = None) -> Method:
    cls = method_class(name)
    return cls(context(name, options), cls.Options(**(options or {})))


def random_replies(seed: int) -> dict[int, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return {
        c: {
            B_KEY: torch.randn(D, R, generator=generator),
            A_KEY: torch.randn(R, K, generator=generator),
        }
        for c in range(CLIENTS)
    }


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().astype(np.float64)


def exact_average(replies: dict, scale: float, b: str = B_KEY, a: str = A_KEY) -> np.ndarray:
    """Σ p_i s·B_i A_i in numpy."""
    return sum(WEIGHTS[c] * scale * np64(replies[c][b]) @ np64(replies[c][a]) for c in replies)


def factor_average(replies: dict, key: str) -> np.ndarray:
    return sum(WEIGHTS[c] * np64(replies[c][key]) for c in replies)


def rank_truncation(matrix: np.ndarray, rank: int) -> np.ndarray:
    u, sigma, vh = np.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * sigma[:rank]) @ vh[:rank]


def local_round(method: Method, round_index: int, targets: list[torch.Tensor]) -> dict:
    """Every client's hooks around a few GD steps on ‖W + s·B·A − W*_i‖² (its trainable tensors),
    W the base as the method has moved it."""
    offset = method.base_offset()
    base = offset["m"] if offset else torch.zeros(D, K)
    replies = {}
    for client in range(CLIENTS):
        message = method.server_message(client, round_index)
        start = method.client_start(client, message, {})
        trained = local_least_squares(method, client, start, targets[client], base)
        replies[client] = method.client_reply(client, trained, message, {})
    return replies


def least_squares_targets(seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(D, K, generator=generator) for _ in range(CLIENTS)]


# -- FedEx-LoRA --------------------------------------------------------------------------------


@pytest.mark.parametrize("residual", ["dense", "factored"])
def test_fedex_global_model_is_the_exact_average_every_round(residual: str) -> None:
    method = make("fedex", {"residual": residual})
    s = method.context.modules[0].scale
    previous = np.zeros((D, K))
    for round_index, seed in enumerate((3, 4)):
        replies = random_replies(seed)
        method.aggregate(round_index, replies, WEIGHTS)
        state = method.global_state()
        model = np64(method.base_offset()["m"]) + s * np64(state[B_KEY]) @ np64(state[A_KEY])
        # W0 + offset_t + s·B̄Ā = W0 + offset_{t−1} + Σ p_i s·B_i A_i (the clients' exact mean).
        expected = previous + exact_average(replies, s)
        np.testing.assert_allclose(model, expected, atol=1e-4)
        np.testing.assert_allclose(np64(state[B_KEY]), factor_average(replies, B_KEY), atol=1e-6)
        previous = np64(method.base_offset()["m"])  # the base the next round trains on
        message = method.server_message(0, round_index + 1)
        fedit_residual = exact_average(replies, s) - s * factor_average(
            replies, B_KEY
        ) @ factor_average(replies, A_KEY)
        if residual == "dense":  # the d×k residual crosses the channel as it is merged
            np.testing.assert_allclose(np64(message["m.residual"]), fedit_residual, atol=1e-4)
        else:  # (K+1)·r stacked factors, exactly the residual
            assert message["m.residual_B"].shape == (D, (CLIENTS + 1) * R)
            sent = np64(message["m.residual_B"]) @ np64(message["m.residual_A"])
            np.testing.assert_allclose(sent, fedit_residual, atol=1e-4)


def test_fedex_truncated_residual_is_its_best_low_rank_approximation() -> None:
    method = make("fedex", {"residual": "truncated", "residual_rank": 3})
    s = method.context.modules[0].scale
    replies = random_replies(5)
    method.aggregate(0, replies, WEIGHTS)
    residual = exact_average(replies, s) - s * factor_average(replies, B_KEY) @ factor_average(
        replies, A_KEY
    )
    np.testing.assert_allclose(
        np64(method.base_offset()["m"]), rank_truncation(residual, 3), atol=1e-4
    )
    message = method.server_message(0, 1)
    assert message["m.residual_B"].shape == (D, 3) and message["m.residual_A"].shape == (3, K)


# -- RoLoRA ------------------------------------------------------------------------------------


def test_rolora_alternates_factors_and_each_aggregation_is_exact() -> None:
    method = make("rolora")
    s = method.context.modules[0].scale
    targets = least_squares_targets()
    for round_index, trained_factor in enumerate([B_KEY, A_KEY, B_KEY]):
        before = dict(method.global_state())
        replies = local_round(method, round_index, targets)
        frozen = A_KEY if trained_factor == B_KEY else B_KEY
        assert all(set(reply) == {trained_factor} for reply in replies.values())
        method.aggregate(round_index, replies, WEIGHTS)
        state = method.global_state()
        assert torch.equal(state[frozen], before[frozen])  # the other factor never moved
        full = {c: {**before, **replies[c]} for c in replies}  # each client's trained adapter
        product = s * np64(state[B_KEY]) @ np64(state[A_KEY])
        np.testing.assert_allclose(product, exact_average(full, s), atol=1e-5)
        assert float(np.abs(product - s * np64(before[B_KEY]) @ np64(before[A_KEY])).max()) > 0


# -- LoRA-FAIR ---------------------------------------------------------------------------------


def test_lora_fair_correction_is_the_ridge_solution_and_closer_to_the_exact_average() -> None:
    lam = 0.05
    method = make("lora_fair", {"lam": lam})
    replies = random_replies(6)
    method.aggregate(0, replies, WEIGHTS)
    state = method.global_state()
    b_bar, a_bar = factor_average(replies, B_KEY), factor_average(replies, A_KEY)
    ideal = exact_average(replies, 1.0)
    # min ‖ideal − (B̄ + ΔB)Ā‖² + λ‖ΔB‖² as one stacked least-squares problem in ΔBᵀ.
    design = np.vstack([a_bar.T, math.sqrt(lam) * np.eye(R)])
    rhs = np.vstack([(ideal - b_bar @ a_bar).T, np.zeros((R, D))])
    delta = np.linalg.lstsq(design, rhs, rcond=None)[0].T
    np.testing.assert_allclose(np64(state[B_KEY]), b_bar + delta, atol=1e-5)
    np.testing.assert_allclose(np64(state[A_KEY]), a_bar, atol=1e-6)
    corrected = np.linalg.norm(ideal - np64(state[B_KEY]) @ a_bar)
    assert corrected < 0.9 * np.linalg.norm(ideal - b_bar @ a_bar)


# -- Fed-SB ------------------------------------------------------------------------------------


def test_fedsb_init_is_the_truncated_svd_and_averaging_r_is_exact() -> None:
    method = make("fedsb")
    s = method.context.modules[0].scale
    replies = random_replies(7)
    method.aggregate(0, replies, WEIGHTS)
    state = method.global_state()
    np.testing.assert_allclose(
        s * np64(state[B_KEY]) @ np64(state[A_KEY]),
        rank_truncation(exact_average(replies, s), R),
        atol=1e-4,
    )
    targets = least_squares_targets()
    replies = {}
    for client in range(CLIENTS):  # each client trains only R, through CoreOptimizer
        message = method.server_message(client, 1)
        store: dict[str, torch.Tensor] = {}
        start = method.client_start(client, message, store)
        slots = {k: torch.nn.Parameter(v.clone()) for k, v in start.items()}
        optimizer = method.local_optimizer(
            [(k, p) for k, p in slots.items() if method.trainable(k)],
            method.context.config.train,
        )
        for _ in range(3):
            optimizer.zero_grad()
            loss = ((s * slots[B_KEY] @ slots[A_KEY] - targets[client]) ** 2).sum()
            loss.backward()
            optimizer.step()
        trained = {k: p.detach() for k, p in slots.items()}
        assert torch.equal(trained[A_KEY], start[A_KEY])
        replies[client] = method.client_reply(client, trained, message, store)
        assert set(replies[client]) == {"m" + CORE} and replies[client]["m" + CORE].shape == (R, R)
    # The fixed factors travel until a reply shows they arrived, then never again.
    assert "m.fedsb_B" in method.server_message(0, 2)
    u, a = np64(method.basis["m.fedsb_B"]), np64(method.basis["m.fedsb_A"])
    np.testing.assert_allclose(u.T @ u, np.eye(R), atol=1e-5)
    method.aggregate(1, replies, WEIGHTS)
    assert "m.fedsb_B" not in method.server_message(0, 2)
    state = method.global_state()
    mean_of_products = sum(
        WEIGHTS[c] * s * u @ np64(replies[c]["m" + CORE]) @ a for c in range(CLIENTS)
    )
    np.testing.assert_allclose(
        s * np64(state[B_KEY]) @ np64(state[A_KEY]), mean_of_products, atol=1e-5
    )


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_core_optimizer_trains_r_as_its_own_parametrisation_does(optimizer: str) -> None:
    """Steps on slot B = U·R through CoreOptimizer equal the same optimizer run directly on R
    with autograd through s·U·R·A (weight decay and momentum included)."""
    train = config_from_dict(
        {"train": {"optimizer": optimizer, "lr": 0.02, "weight_decay": 0.1, "momentum": 0.5}}
    ).train
    generator = torch.Generator().manual_seed(8)
    u = torch.linalg.qr(torch.randn(D, R, generator=generator, dtype=torch.float64))[0]
    a = torch.randn(R, K, generator=generator, dtype=torch.float64)
    r0 = torch.randn(R, R, generator=generator, dtype=torch.float64)
    target = torch.randn(D, K, generator=generator, dtype=torch.float64)

    def loss(b: torch.Tensor) -> torch.Tensor:
        return ((2.0 * b @ a - target) ** 2).sum()

    slot = torch.nn.Parameter(u @ r0)
    core = CoreOptimizer([("b", slot)], {"b": u}, train)
    direct = torch.nn.Parameter(r0.clone())
    reference = (
        torch.optim.AdamW([direct], lr=0.02, weight_decay=0.1)
        if optimizer == "adamw"
        else torch.optim.SGD([direct], lr=0.02, momentum=0.5, weight_decay=0.1)
    )
    for _ in range(5):
        core.zero_grad()
        loss(slot).backward()
        core.step()
        reference.zero_grad()
        loss(u @ direct).backward()
        reference.step()
    torch.testing.assert_close(u.T @ slot.detach(), direct.detach(), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(slot.detach(), u @ direct.detach(), rtol=1e-9, atol=1e-10)


# -- FRLoRA ------------------------------------------------------------------------------------


@pytest.mark.parametrize("restart", ["pretrained", "updated"])
def test_frlora_merges_every_round_and_restarts_from_principal_factors(restart: str) -> None:
    method = make("frlora", {"restart": restart})
    s = method.context.modules[0].scale
    w0 = torch.randn(D, K, generator=torch.Generator().manual_seed(9))
    method.attach_base({"m": w0})
    targets = least_squares_targets()
    updates = np.zeros((D, K))
    for round_index in range(3):
        start = method.global_state()
        weights = np64(w0) + updates  # the model the round starts from
        b_s, a_s = np64(start[B_KEY]), np64(start[A_KEY])
        reference = weights if restart == "updated" else np64(w0)
        # Restart factors: the top-r singular directions, √σ on each side (numpy SVD).
        u, sigma, vh = np.linalg.svd(reference, full_matrices=False)
        np.testing.assert_allclose(s * b_s @ a_s, rank_truncation(reference, R), atol=1e-4)
        np.testing.assert_allclose(
            np.abs(b_s / np.sqrt(sigma[:R] / s)), np.abs(u[:, :R]), atol=1e-4
        )
        np.testing.assert_allclose(
            np.abs(a_s / np.sqrt(sigma[:R] / s)[:, None]), np.abs(vh[:R]), atol=1e-4
        )
        # The moved base plus the restart adapter is the current model.
        base = np64(w0) + np64(method.base_offset()["m"])
        np.testing.assert_allclose(base + s * b_s @ a_s, weights, atol=1e-4)
        replies = local_round(method, round_index, targets)
        method.aggregate(round_index, replies, WEIGHTS)
        updates += s * (factor_average(replies, B_KEY) @ factor_average(replies, A_KEY) - b_s @ a_s)
    # After 3 rounds: W0 + Σ_t ΔW_t, ΔW_t = s(B̄_t Ā_t − B_s A_s), whatever the restart.
    final = method.global_state()
    model = np64(w0) + np64(method.base_offset()["m"]) + s * np64(final[B_KEY]) @ np64(final[A_KEY])
    np.testing.assert_allclose(model, np64(w0) + updates, atol=1e-4)
    assert np.linalg.matrix_rank(updates, tol=1e-6) > R  # the merged update left rank r


# -- end to end: 2 tiny rounds, bytes from the message shapes ------------------------------------


def expected_shapes(name: str, experiment: Experiment, round_index: int, up: bool) -> dict:
    """{tensor: shape} of one message, per the method's docstring."""
    modules = experiment.slots.modules
    initial = experiment.method.context.initial
    head = {k: tuple(v.shape) for k, v in initial.items() if ".lora_" not in k}
    shapes = dict(head)
    for m in modules:
        b, a = (m.d_out, m.rank), (m.rank, m.d_in)
        if name == "rolora" and up:  # round 1 trains B, round 2 trains A
            shapes[m.b if round_index % 2 == 0 else m.a] = b if round_index % 2 == 0 else a
        elif name == "fedsb" and round_index >= 1:  # R each way; B and A down, once
            shapes[m.key + CORE] = (m.rank, m.rank)
            if not up and round_index == 1:
                shapes[m.key + ".fedsb_B"], shapes[m.key + ".fedsb_A"] = b, a
        elif name == "frlora" and not up:  # last round's averaged factors, for the merge
            if round_index >= 1:
                shapes[m.key + ".update_B"], shapes[m.key + ".update_A"] = b, a
        else:
            shapes[m.b], shapes[m.a] = b, a
            if name == "fedex" and not up and round_index >= 1:
                shapes[m.key + ".residual"] = (m.d_out, m.d_in)
    if name == "rolora" and not up:
        shapes["rolora.trains_a"] = (1,)
    return shapes


@pytest.mark.parametrize("name", NEW)
def test_two_tiny_rounds_and_every_message_has_the_expected_bytes(name: str, finished) -> None:
    experiment, _, result = finished(name)
    assert [m["round"] for m in result.metrics] == [0, 1, 2]  # 0: the initial model
    assert all(math.isfinite(m["train_loss"]) for m in trained(result.metrics))
    assert 0.0 <= result.metrics[-1]["accuracy"] <= 1.0
    for record in result.ledger.records:
        up = record.receiver == "server"
        assert record.bytes == framed(expected_shapes(name, experiment, record.round, up)), record


def test_measured_uploads_rolora_half_of_fedit_fedsb_r_squared(finished) -> None:
    """Per round on the same tiny config (q, k, v of 32 × 32: d = k), from the ledgers: RoLoRA
    saves FedIT's other factor, r·k of r(d+k) floats per module, i.e. half; Fed-SB after its
    init round sends r² instead of r(d+k). The bytes saved are those floats plus at most the
    dropped tensors' header entries (name + ~80 bytes of JSON each)."""
    experiment, _, rolora = finished("rolora")
    modules, clients = experiment.slots.modules, len(experiment.clients)
    fedit = trained(finished("fedit")[2].metrics)
    fedsb = trained(finished("fedsb")[2].metrics)
    header = clients * sum(len(m.a) + 80 for m in modules)
    for mine, theirs in zip(trained(rolora.metrics), fedit, strict=True):
        saved = theirs["bytes_up"] - mine["bytes_up"]
        half = 4 * clients * sum(m.rank * m.d_in for m in modules)
        assert half == 2 * clients * sum(m.rank * (m.d_out + m.d_in) for m in modules)
        assert half <= saved <= half + header
    assert fedsb[0]["bytes_up"] == fedit[0]["bytes_up"]  # the init round is FedIT's
    saved = fedit[1]["bytes_up"] - fedsb[1]["bytes_up"]
    floats = 4 * clients * sum(m.rank * (m.d_out + m.d_in) - m.rank**2 for m in modules)
    assert floats <= saved <= floats + header


def test_the_five_are_registered_with_options() -> None:
    methods = registry()
    for name in NEW:
        assert name in methods and methods[name].Options.model_fields, name
