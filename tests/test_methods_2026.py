"""Issue 31's FedSVD and FedRot-LoRA.

Each method's defining identities are checked with real numbers against independent numpy
computations (float64, dense products and numpy's own SVD); then each runs 2 tiny rounds through
``fedlora run`` with every ledger record checked against the bytes its message shapes imply, a
1-round run resumed to 2 rounds equals the straight run, FedSVD runs under DP-SGD with A frozen,
the declared privacy and robustness combinations run, and each refusal answers with its reason.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedlora.config import load_config
from fedlora.experiment import Experiment, build
from fedlora.methods import registry
from fedlora.methods.fedrot import ALIGN, BY_A, BY_B, UNALIGNED, procrustes_rotation
from fedlora.preflight import check_config
from tests.conftest import ADAPTIVE_CENTRAL, ONE, TINY, read_metrics, run_cli, timeless_metrics
from tests.test_baselines_2025 import (
    A_KEY,
    B_KEY,
    WEIGHTS,
    D,
    K,
    R,
    factor_average,
    make,
    np64,
    random_replies,
)
from tests.test_methods_server import framed

NEW = ["fedsvd", "fedrot"]
# client_stats: the private runs' records keep train_loss, which these tests read
DP_SGD = [
    "privacy.mechanism=dp_sgd",
    "privacy.noise_multiplier=1.0",
    "privacy.delta=1e-5",
    "privacy.client_stats=true",
]


def b_only(replies: dict) -> dict:
    """FedSVD's replies: B alone (A is frozen on the clients)."""
    return {c: {B_KEY: reply[B_KEY]} for c, reply in replies.items()}


def orthogonal(seed: int, size: int, det: float) -> np.ndarray:
    """A random orthogonal matrix (numpy QR of a Gaussian) with determinant ``det`` (±1)."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((size, size)))
    if np.sign(np.linalg.det(q)) != det:
        q[:, -1] = -q[:, -1]
    return q


def polar(matrix: np.ndarray) -> np.ndarray:
    """The orthogonal polar factor U Vᵀ of ``matrix`` (numpy SVD)."""
    u, _, vh = np.linalg.svd(matrix)
    return u @ vh


# -- FedSVD ------------------------------------------------------------------------------------


def test_fedsvd_clients_train_and_send_b_only_and_get_both_factors() -> None:
    method = make("fedsvd")
    message = method.server_message(0, 0)
    assert set(message) == {A_KEY, B_KEY}  # both factors downloaded
    assert not method.trainable(A_KEY) and method.trainable(B_KEY)
    assert method.expected_reply(0, message) == {B_KEY: (D, R)}
    trained = random_replies(1)[0]
    reply = method.client_reply(0, trained, message, {})
    assert set(reply) == {B_KEY} and torch.equal(reply[B_KEY], trained[B_KEY])


def test_fedsvd_refactorisation_is_the_svd_of_the_averaged_product_every_round() -> None:
    """B′A′ = B̄A (B̄ = Σ p_i B_i), A′A′ᵀ = I, B′ᵀB′ = diag(σ²) descending with σ the numpy
    singular values of B̄A, and A′'s row space the top-r right singular space; twice, the
    second time from the orthonormal A of the first."""
    method = make("fedsvd")
    for round_index, seed in enumerate((2, 3)):
        a_before = np64(method.global_state()[A_KEY])
        replies = b_only(random_replies(seed))
        method.aggregate(round_index, replies, WEIGHTS)
        state = method.global_state()
        b_new, a_new = np64(state[B_KEY]), np64(state[A_KEY])
        target = factor_average(replies, B_KEY) @ a_before  # B̄A, dense
        np.testing.assert_allclose(b_new @ a_new, target, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a_new @ a_new.T, np.eye(R), atol=1e-6)
        _, sigma, vh = np.linalg.svd(target)
        gram = b_new.T @ b_new
        np.testing.assert_allclose(gram, np.diag(sigma[:R] ** 2), rtol=1e-5, atol=1e-5)
        assert np.all(np.diff(np.diag(gram)) < 0)  # descending
        np.testing.assert_allclose(a_new.T @ a_new, vh[:R].T @ vh[:R], atol=1e-5)


def test_fedsvd_period_and_warmup_choose_the_refactoring_rounds() -> None:
    """recalc_period 2, warmup 2: the SVD after rounds 4 and 6 (from 1) only; in the other
    rounds A stays as it was and B is the plain average."""
    method = make("fedsvd", {"recalc_period": 2, "warmup_rounds": 2})
    assert [method.refactors(t) for t in range(6)] == [False, False, False, True, False, True]
    a0 = method.global_state()[A_KEY].clone()
    replies = b_only(random_replies(4))
    method.aggregate(0, replies, WEIGHTS)
    state = method.global_state()
    assert torch.equal(state[A_KEY], a0)
    np.testing.assert_allclose(np64(state[B_KEY]), factor_average(replies, B_KEY), atol=1e-6)


def test_fedsvd_secure_mean_step_equals_the_step_on_each_reply() -> None:
    """Declared secure aggregation: the server step from Σ p_i B_i alone is the same step."""
    each, mean_only = make("fedsvd"), make("fedsvd")
    replies = b_only(random_replies(5))
    each.aggregate(0, replies, WEIGHTS)
    mean_only.aggregate_mean(0, {B_KEY: sum(WEIGHTS[c] * replies[c][B_KEY] for c in replies)})
    for key in (A_KEY, B_KEY):
        torch.testing.assert_close(each.global_state()[key], mean_only.global_state()[key])


# -- FedRot-LoRA -------------------------------------------------------------------------------


def test_procrustes_rotation_is_orthogonal_and_maximises_the_trace() -> None:
    """λ > 1: RᵀR = I, tr(RᵀM) = ‖M‖_* (numpy's singular values), R = numpy's U Vᵀ."""
    m = np.random.default_rng(6).standard_normal((4, 4))
    rotation = procrustes_rotation(torch.from_numpy(m), 1.5).numpy()
    np.testing.assert_allclose(rotation.T @ rotation, np.eye(4), atol=1e-12)
    nuclear = np.linalg.svd(m, compute_uv=False).sum()
    np.testing.assert_allclose(np.trace(rotation.T @ m), nuclear, rtol=1e-12)
    np.testing.assert_allclose(rotation, polar(m), atol=1e-12)
    for seed in range(5):  # no other orthogonal matrix does better
        q = orthogonal(seed, 4, 1.0 if seed % 2 else -1.0)
        assert np.trace(q.T @ m) < nuclear


def test_soft_rotation_stays_in_so_r_and_moves_toward_the_identity() -> None:
    """A cross-Gram whose Procrustes solution is a reflection: λ = 1 flips the last singular
    pair (Kabsch, det +1, tr(RᵀM) = Σσ − 2σ_min); λ = 0.5 is the polar factor of ½I + ½R₁,
    nearer to I than R₁; λ = 0 is I; a non-finite M leaves the factors unrotated."""
    rng = np.random.default_rng(7)
    u, v = orthogonal(8, 4, 1.0), orthogonal(9, 4, -1.0)
    sigma = np.array([4.0, 3.0, 2.0, 0.5])
    m = u @ np.diag(sigma) @ v.T  # det(U Vᵀ) = −1
    hard = procrustes_rotation(torch.from_numpy(m), 1.5).numpy()
    assert np.linalg.det(hard) == pytest.approx(-1.0)
    kabsch = procrustes_rotation(torch.from_numpy(m), 1.0).numpy()
    expected = u @ np.diag([1.0, 1.0, 1.0, -1.0]) @ v.T
    np.testing.assert_allclose(kabsch, expected, atol=1e-12)
    assert np.linalg.det(kabsch) == pytest.approx(1.0)
    np.testing.assert_allclose(np.trace(kabsch.T @ m), sigma.sum() - 2 * sigma[-1], rtol=1e-12)
    half = procrustes_rotation(torch.from_numpy(m), 0.5).numpy()
    np.testing.assert_allclose(half, polar(0.5 * np.eye(4) + 0.5 * expected), atol=1e-12)
    np.testing.assert_allclose(half.T @ half, np.eye(4), atol=1e-12)
    assert np.linalg.det(half) == pytest.approx(1.0)
    assert 0 < np.linalg.norm(half - np.eye(4)) < np.linalg.norm(kabsch - np.eye(4))
    none = procrustes_rotation(torch.from_numpy(rng.standard_normal((4, 4))), 0.0).numpy()
    np.testing.assert_allclose(none, np.eye(4), atol=1e-12)
    broken = torch.full((4, 4), float("nan"), dtype=torch.float64)
    assert torch.equal(procrustes_rotation(broken, 1.5), torch.eye(4, dtype=torch.float64))


def test_fedrot_alignment_schedule() -> None:
    """Round 1 unaligned, then A, B, A, … (the code's initialshare 'A'); the options move it."""

    def schedule(options: dict | None = None) -> list[int]:
        method = make("fedrot", options)
        flags = [int(method.server_message(0, t)[ALIGN].item()) for t in range(5)]
        assert flags == [method.alignment(t) for t in range(5)]
        return flags

    assert schedule() == [UNALIGNED, BY_A, BY_B, BY_A, BY_B]
    assert schedule({"first": "b"}) == [UNALIGNED, BY_B, BY_A, BY_B, BY_A]
    assert schedule({"align": "b"}) == [UNALIGNED, BY_B, BY_B, BY_B, BY_B]
    assert schedule({"align_from_round": 1}) == [BY_A, BY_B, BY_A, BY_B, BY_A]
    assert schedule({"align_from_round": 4}) == [UNALIGNED] * 3 + [BY_A, BY_B]


@pytest.mark.parametrize(("round_index", "by"), [(1, "a"), (2, "b")])
def test_fedrot_reply_is_the_procrustes_rotation_and_keeps_the_product(
    round_index: int, by: str
) -> None:
    """The client's upload against numpy: M = A_i A_refᵀ (or B_iᵀ B_ref), R = U Vᵀ of numpy's
    SVD, A_i′ = Rᵀ A_i, B_i′ = B_i R, B_i′A_i′ = B_i A_i, and the aligned factor is nearer the
    reference; the server then averages the aligned factors as FedIT does."""
    method = make("fedrot")
    method.aggregate(0, random_replies(10), WEIGHTS)  # a global model with B ≠ 0
    reference = {k: np64(v) for k, v in method.global_state().items()}
    replies = {}
    for client, trained in random_replies(11).items():
        message = method.server_message(client, round_index)
        assert set(method.client_start(client, message, {})) == {A_KEY, B_KEY}
        assert method.expected_reply(client, message) == {B_KEY: (D, R), A_KEY: (R, K)}
        reply = method.client_reply(client, trained, message, {})
        b, a = np64(trained[B_KEY]), np64(trained[A_KEY])
        cross = a @ reference[A_KEY].T if by == "a" else b.T @ reference[B_KEY]
        rotation = polar(cross)
        np.testing.assert_allclose(np64(reply[A_KEY]), rotation.T @ a, atol=1e-5)
        np.testing.assert_allclose(np64(reply[B_KEY]), b @ rotation, atol=1e-5)
        np.testing.assert_allclose(np64(reply[B_KEY]) @ np64(reply[A_KEY]), b @ a, atol=1e-5)
        if by == "a":
            after, before = np64(reply[A_KEY]) - reference[A_KEY], a - reference[A_KEY]
        else:
            after, before = np64(reply[B_KEY]) - reference[B_KEY], b - reference[B_KEY]
        assert np.linalg.norm(after) <= np.linalg.norm(before) + 1e-6
        replies[client] = reply
    method.aggregate(round_index, replies, WEIGHTS)
    for key in (A_KEY, B_KEY):
        np.testing.assert_allclose(
            np64(method.global_state()[key]), factor_average(replies, key), atol=1e-6
        )


def test_fedrot_round_one_uploads_the_trained_factors_unrotated() -> None:
    method = make("fedrot")
    trained = random_replies(12)[0]
    reply = method.client_reply(0, trained, method.server_message(0, 0), {})
    assert all(torch.equal(reply[k], trained[k]) for k in trained)


@pytest.mark.parametrize(
    ("rotate_lambda", "det", "exact"),
    [(1.5, -1.0, True), (1.5, 1.0, True), (1.0, 1.0, True), (1.0, -1.0, False)],
)
@pytest.mark.parametrize("round_index", [1, 2])  # aligned by A, then by B
def test_fedrot_aligns_a_client_rotated_by_a_known_q_back_exactly(
    rotate_lambda: float, det: float, exact: bool, round_index: int
) -> None:
    """A client holding (B_ref Q, Qᵀ A_ref), the global model in other coordinates, uploads
    (B_ref, A_ref): exactly for any orthogonal Q with the hard rotation, for Q in SO(r) with
    λ = 1; a reflection Q is out of SO(r)'s reach."""
    method = make("fedrot", {"rotate_lambda": rotate_lambda})
    method.aggregate(0, random_replies(13), WEIGHTS)
    reference = method.global_state()
    q = torch.from_numpy(orthogonal(14, R, det)).float()
    rotated = {B_KEY: reference[B_KEY] @ q, A_KEY: q.T @ reference[A_KEY]}
    reply = method.client_reply(0, rotated, method.server_message(0, round_index), {})
    gap = max(float((reply[k] - reference[k]).abs().max()) for k in (A_KEY, B_KEY))
    if exact:
        assert gap < 1e-5
    else:
        assert gap > 1e-2


# -- end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory):
    """``fedlora run configs/tiny/<name>.toml`` (2 rounds, 4 clients), once per method."""
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            out = tmp_path_factory.mktemp(name) / "run"
            code, output = run_cli(
                "run", str(TINY / f"{name}.toml"), "--out", str(out), "--quiet", *ONE
            )
            assert code == 0, output
            done[name] = out
        return done[name]

    return get


def sets(values: list[str]) -> list[str]:
    return [arg for value in values for arg in ("--set", value)]


def ledger(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()]


def message_shapes(name: str, experiment: Experiment, up: bool) -> dict[str, tuple[int, ...]]:
    """{tensor: shape} of one message, from the model's LoRA modules (d_out, d_in, rank) and
    head: FedSVD downloads B (d×r), A (r×k) and the head and uploads B and the head; FedRot
    sends the whole adapter each way, plus its 1-float alignment flag down."""
    initial = experiment.method.context.initial
    shapes = {k: tuple(v.shape) for k, v in initial.items() if ".lora_" not in k}
    assert shapes  # the tiny configs train the head
    for m in experiment.slots.modules:
        shapes[m.b] = (m.d_out, m.rank)
        if name == "fedrot" or not up:
            shapes[m.a] = (m.rank, m.d_in)
    if name == "fedrot" and not up:
        shapes[ALIGN] = (1,)
    return shapes


@pytest.mark.parametrize("name", NEW)
def test_tiny_run_finishes_and_every_message_has_the_expected_bytes(name: str, straight) -> None:
    run = straight(name)
    metrics = read_metrics(run)
    assert [m["round"] for m in metrics] == [0, 1, 2]
    for m in metrics[1:]:
        assert math.isfinite(m["train_loss"]) and math.isfinite(m["test_loss"])
        assert 0.0 <= m["accuracy"] <= 1.0
    records = ledger(run)
    assert len(records) == 2 * 2 * 4  # rounds x directions x clients
    experiment = build(load_config(run / "config.toml"))
    shapes = {up: message_shapes(name, experiment, up) for up in (False, True)}
    for record in records:
        up = record["receiver"] == "server"
        assert record["bytes"] == framed(shapes[up]), record
    for direction in shapes.values():  # 4 bytes a float plus a header of names and shapes
        payload = 4 * sum(math.prod(s) for s in direction.values())
        assert 0 < framed(direction) - payload <= 8 + sum(len(k) + 80 for k in direction)


@pytest.mark.parametrize("name", NEW)
def test_a_resumed_run_ends_where_the_straight_run_does(
    name: str, straight, tmp_path: Path
) -> None:
    """1 round, then --resume to 2: the same metrics, ledger and checkpoint tensors (server
    state, FedSVD's re-factorised A included) as the straight 2-round run."""
    assert_resumes_exactly(name, straight(name), tmp_path / "part")


def assert_resumes_exactly(name: str, whole: Path, part: Path, first_rounds: int = 1) -> None:
    """Run ``name``'s tiny config for ``first_rounds`` rounds into ``part``, resume it to the
    rounds of the straight run ``whole``: the same metrics, ledger and checkpoint tensors."""
    config = str(TINY / f"{name}.toml")
    args = ("--out", str(part), "--quiet", *ONE)
    assert run_cli("run", config, *args, "--set", f"experiment.rounds={first_rounds}")[0] == 0
    (part / "config.toml").write_text((whole / "config.toml").read_text())
    code, output = run_cli("run", config, *args, "--resume")
    assert code == 0, output
    assert timeless_metrics(part) == timeless_metrics(whole)
    assert ledger(part) == ledger(whole)
    finals = [load_file(run / "checkpoint.safetensors") for run in (whole, part)]
    assert finals[0].keys() == finals[1].keys()
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


def test_fedsvd_under_dp_sgd_trains_b_only_and_runs(tmp_path: Path) -> None:
    """DP-SGD's noised steps move B and never A (the per-example gradients are of B and the
    head only), and a private run finishes with ε reported and A re-factorised orthonormal."""
    experiment = build(load_config(TINY / "fedsvd.toml", DP_SGD))
    method = experiment.method
    message = method.server_message(0, 0)
    start = method.client_start(0, message, {})
    result = experiment.trainer.train(start, experiment.clients[0], 0, 0, method.trainable)
    modules = experiment.slots.modules
    assert all(torch.equal(result.state[m.a], start[m.a]) for m in modules)
    assert all(not torch.equal(result.state[m.b], start[m.b]) for m in modules)

    out = tmp_path / "dp"
    code, output = run_cli(
        "run", str(TINY / "fedsvd.toml"), "--out", str(out), "--quiet", *sets(DP_SGD)
    )
    assert code == 0, output
    metrics = read_metrics(out)[1:]
    assert all(math.isfinite(m["train_loss"]) for m in metrics)
    assert 0 < metrics[0]["epsilon"] < metrics[1]["epsilon"]
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    factors_a = [v.double() for k, v in adapter.items() if "lora_A" in k]
    assert factors_a
    for a in factors_a:
        torch.testing.assert_close(
            a @ a.T, torch.eye(a.shape[0], dtype=torch.float64), rtol=0, atol=1e-6
        )


COMBINATIONS = {
    "central DP": ADAPTIVE_CENTRAL,
    "secure aggregation": ["privacy.secure_aggregation=true"],
    "median": ["federation.aggregator=median"],
}


@pytest.mark.parametrize("combination", sorted(COMBINATIONS))
@pytest.mark.parametrize("name", NEW)
def test_declared_combinations_run(name: str, combination: str, tmp_path: Path) -> None:
    """Both declare central DP, secure aggregation and robust aggregation: each runs."""
    config = str(TINY / f"{name}.toml")
    code, output = run_cli(
        "run", config, "--out", str(tmp_path), "--quiet", *ONE, *sets(COMBINATIONS[combination])
    )
    assert code == 0, output
    metrics = read_metrics(tmp_path)[1:]
    assert len(metrics) == 2 and all(math.isfinite(m["test_loss"]) for m in metrics)
    assert not any(m.get("skipped") for m in metrics)


@pytest.mark.parametrize(
    ("name", "overrides", "reason"),
    [
        ("fedsvd", ["ranks.profile=uniform"], "method 'fedsvd' trains every client at lora.rank"),
        ("fedrot", ["ranks.profile=uniform"], "method 'fedrot' trains every client at lora.rank"),
        ("fedsvd", ["train.keep_optimizer_state=true"], "re-factorises B by an SVD"),
        ("fedsvd", ["method.recalc_period=0"], "method.recalc_period"),
        ("fedsvd", ["method.warmup_rounds=-1"], "method.warmup_rounds"),
        ("fedrot", ["method.rotate_lambda=-0.5"], "method.rotate_lambda"),
        ("fedrot", ["method.align='c'"], "method.align"),
        ("fedrot", ["method.align_from_round=0"], "method.align_from_round"),
    ],
)
def test_refusals_give_their_reason(
    name: str, overrides: list[str], reason: str, tmp_path: Path
) -> None:
    assert_refused(name, overrides, reason, tmp_path)


def assert_refused(name: str, overrides: list[str], reason: str, out: Path) -> None:
    """``name``'s tiny config with ``overrides`` stops with exit 2 and one error line that
    gives ``reason``."""
    config = str(TINY / f"{name}.toml")
    code, output = run_cli("run", config, "--out", str(out), "--quiet", *sets(overrides))
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and reason in errors[0], output


@pytest.mark.parametrize("name", NEW)
def test_the_declared_compatibility_passes_the_config_checks(name: str) -> None:
    cls = registry()[name]
    assert cls.mean_of_replies and not cls.needs_each_reply and not cls.heterogeneous_ranks
    for combination in COMBINATIONS.values():
        check_config(load_config(TINY / f"{name}.toml", combination))
    check_config(load_config(TINY / f"{name}.toml", DP_SGD))
