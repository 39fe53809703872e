"""Differential privacy (issue 13): DP-SGD's per-example gradients, clipping and noise against
independent computations, the accountant against dp-accounting's own documented numbers,
central DP (clipping, noise, adaptive clip norm) against numpy, and tiny end-to-end runs (ε per
round, the max_epsilon stop, resume, the same numbers twice)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from fedlora.adapters import AdapterSlots
from fedlora.checkpoint import load_checkpoint
from fedlora.config import ConfigError, LoraConfig, config_from_dict, load_config
from fedlora.data.tokenized import IGNORE, TokenizedSet
from fedlora.engines.placements import local_loop
from fedlora.experiment import build
from fedlora.models import load_base_model, load_tokenizer, model_spec
from fedlora.privacy.accounting import Sampling, StepAccountant, solve_noise_multiplier
from fedlora.privacy.central import CentralDP, clip_update, noised_mean, update_noise_multiplier
from fedlora.privacy.dp_sgd import (
    DpSgd,
    PerExampleGradients,
    clip_per_example,
    private_batches,
)
from fedlora.privacy.noise import NoiseSeeds, generator, noisy_mean
from fedlora.training import LocalTrainer
from tests.conftest import ADAPTIVE_CENTRAL, TINY, read_metrics, run_cli, timeless_metrics, trained

pytestmark = pytest.mark.usefixtures("one_thread")


# -- DP-SGD: per-example gradients, clipping, noise ------------------------------------------------


def tiny_model(name: str, causal: bool) -> tuple[AdapterSlots, TokenizedSet]:
    """A tiny random model with random LoRA factors (B = 0 would make A's gradients zero) and
    four examples of different lengths, so the batch is padded."""
    tokenizer = load_tokenizer(name)
    slots = AdapterSlots(
        load_base_model(name, 5, tokenizer, seed=0), model_spec(name), LoraConfig(rank=4), 1
    )
    source = torch.Generator().manual_seed(0)
    slots.load({k: torch.randn(v.shape, generator=source) * 0.3 for k, v in slots.read().items()})
    ids = [torch.randint(5, 1000, (n,), generator=source).tolist() for n in (5, 17, 9, 12)]
    if causal:
        labels = [[IGNORE] * 3 + row[3:] for row in ids]  # loss on the "answer" tokens only
        return slots, TokenizedSet(ids, labels, int(tokenizer.pad_token_id), causal=True)
    return slots, TokenizedSet(ids, [0, 3, 1, 4], int(tokenizer.pad_token_id), causal=False)


@pytest.mark.parametrize(("name", "causal"), [("tiny-bert", False), ("tiny-llama", True)])
def test_per_example_gradients_equal_one_backward_pass_per_example(name: str, causal: bool) -> None:
    """vmap(grad) over a padded batch (BERT's bidirectional mask, Llama's causal one) gives each
    example's own gradient of LoRA factors and head, as a backward pass of that example alone
    (unpadded, through the model's own mask) does. In float64: in float32 the two sides'
    rounding differs by up to 1.5e-3 of the largest gradient (cancellation in small entries,
    and by CPU: AVX-512 Xeon and AVX2 EPYC kernels differ), which no tolerance separates from a
    real error; in float64 they agree to 1e-11 of it (tolerance 1e-9)."""
    slots, data = tiny_model(name, causal)
    model = slots.model.eval().double()  # dropout off: both sides see the same function
    params = slots.parameters(lambda name: True)
    rows = list(range(len(data)))
    grads, losses = PerExampleGradients(model, params, causal)(data.batch(rows))
    assert [tuple(g.shape) for g in grads] == [(len(rows), *p.shape) for _, p in params]
    for i in rows:
        model.zero_grad(set_to_none=True)
        loss = model(**data.batch([i])).loss
        loss.backward()
        assert losses[i].item() == pytest.approx(loss.item(), rel=1e-5)
        for (wire, p), g in zip(params, grads, strict=True):
            assert p.grad.abs().max() > 0, wire  # a real comparison, not of zeros
            scale = p.grad.abs().max().item()
            torch.testing.assert_close(g[i], p.grad, rtol=1e-7, atol=1e-9 * scale, msg=wire)


def test_private_samples_have_the_accounted_distribution() -> None:
    """Poisson: every row in with probability q = L/n independently (4000 steps: frequencies
    within 5 sigma of q, batch sizes averaging L); fixed: L distinct rows every step; seeded."""
    rows, batch, steps = list(range(100, 150)), 8, 4000
    q = batch / len(rows)
    poisson = private_batches("poisson", rows, batch, seed=3)
    samples = [next(poisson) for _ in range(steps)]
    counts = np.bincount([r - 100 for sample in samples for r in sample], minlength=len(rows))
    assert np.all(np.abs(counts / steps - q) < 5 * math.sqrt(q * (1 - q) / steps))
    sizes = np.array([len(sample) for sample in samples])
    assert abs(sizes.mean() - batch) < 5 * math.sqrt(len(rows) * q * (1 - q) / steps)
    assert sizes.min() < batch < sizes.max()  # the batch size varies
    fixed = private_batches("fixed", rows, batch, seed=3)
    for _ in range(50):
        sample = next(fixed)
        assert len(set(sample)) == batch and set(sample) <= set(rows)
    again = private_batches("poisson", rows, batch, seed=3)
    assert [next(again) for _ in range(5)] == samples[:5]


def test_clipping_bounds_every_example_and_keeps_the_small_ones() -> None:
    torch.manual_seed(0)
    grads = [torch.randn(6, 3, 4), torch.randn(6, 5)]
    grads[0][2] *= 1e-3  # example 2 well inside the bound
    grads[1][2] *= 1e-3
    grads[0][4] = 0  # example 4 has no gradient at all
    grads[1][4] = 0
    clip_norm = 1.5
    clipped = clip_per_example(grads, clip_norm)
    for i in range(6):
        before = np.concatenate([g[i].numpy().ravel() for g in grads]).astype(np.float64)
        after = np.concatenate([g[i].numpy().ravel() for g in clipped]).astype(np.float64)
        norm = np.linalg.norm(before)
        assert np.linalg.norm(after) <= clip_norm * (1 + 1e-6)
        expected = before * min(1.0, clip_norm / norm) if norm > 0 else before
        np.testing.assert_allclose(after, expected, rtol=1e-6, atol=1e-12)
    assert np.linalg.norm(np.concatenate([g[0].numpy().ravel() for g in clipped])) == (
        pytest.approx(clip_norm, rel=1e-6)
    )


def test_dp_sgd_without_noise_and_with_a_huge_clip_is_the_ordinary_step() -> None:
    """z = 0, C = 1e9, fixed-size sampling of the whole client (the same batch as the plain
    trainer's), SGD without momentum: the trained state after two steps is the plain one."""
    overrides = [
        "train.optimizer=sgd",
        "train.momentum=0",
        "train.lr=0.5",
        "train.batch_size=256",  # more than any client holds: every row in every step
        "train.local_steps=2",
    ]
    experiment = build(load_config(TINY / "fedit.toml", overrides))
    for module in experiment.slots.model.modules():  # the same function on both sides
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    plain = experiment.trainer
    private = LocalTrainer(
        experiment.slots,
        experiment.train_set,
        plain.config,
        plain.seed,
        plain.rounds,
        dp=DpSgd(
            clip_norm=1e9,
            noise_multiplier=0.0,
            sampling="fixed",
            causal_attention=False,
            seeds=NoiseSeeds("seeded", 0),
        ),
    )
    method, rows = experiment.method, experiment.clients[1]
    start = method.client_start(1, method.server_message(1, 0), {})
    results = [t.train(start, rows, 0, 1, method.trainable) for t in (plain, private)]
    assert [r.examples for r in results] == [2 * len(rows)] * 2
    moved, dp = results[0].state, results[1].state
    assert any(not torch.equal(moved[k], start[k]) for k in moved)  # the step moved something
    for name in moved:
        torch.testing.assert_close(dp[name], moved[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_noise_has_the_stated_standard_deviation() -> None:
    """DP-SGD's mean gradient noise: std z·C / L per coordinate, mean 0 (400k draws: the
    std estimate is within 0.5% at ~4 sigma)."""
    z, clip_norm, batch = 1.3, 0.7, 16
    zeros = [torch.zeros(200_000), torch.zeros(400, 500)]
    noised = noisy_mean(zeros, clip_norm, z, batch, generator(5))
    draws = torch.cat([t.ravel() for t in noised]).double().numpy()
    assert draws.std() == pytest.approx(z * clip_norm / batch, rel=5e-3)
    assert abs(draws.mean()) < 4 * z * clip_norm / batch / math.sqrt(draws.size)
    again = noisy_mean(zeros, clip_norm, z, batch, generator(5))
    assert all(torch.equal(a, b) for a, b in zip(noised, again, strict=True))  # seeded


# -- accounting ------------------------------------------------------------------------------------


def test_accountant_reproduces_dp_accounting_documented_example() -> None:
    """dp_accounting/rdp/rdp_privacy_accountant_test.py, test_compute_rdp_poisson_sampled_gaussian
    (dp-accounting 0.6.0): q = 0.01, σ = 2.5, 50 steps, RDP at these orders."""
    orders = (1.5, 2.5, 5, 50, 100, np.inf)
    documented = [6.70579741e-04, 1.08548710e-03, 2.18075656e-03, 2.38460375e-02, 1.67416308e02]
    accountant = StepAccountant(Sampling("poisson", 100, 1), 2.5, orders)
    rdp = accountant.rdp(50)
    np.testing.assert_allclose(rdp[:-1], documented, rtol=1e-4)
    assert np.isinf(rdp[-1])


def gaussian_epsilon(sigma: float, steps: int, delta: float, orders) -> float:
    """ε of `steps` Gaussian mechanisms (RDP α/(2σ²) each, Mironov 2017), converted with the
    bound of Canonne, Kamath and Steinke (2020, Prop. 12): an independent closed form."""
    return min(
        steps * a / (2 * sigma**2)
        + math.log((a - 1) / a)
        - (math.log(delta) + math.log(a)) / (a - 1)
        for a in orders
    )


def test_epsilon_of_full_batches_is_the_gaussian_closed_form() -> None:
    orders = tuple(1 + x / 10 for x in range(1, 100)) + tuple(range(11, 64))
    whole = StepAccountant(Sampling("poisson", 40, 40), 1.7, orders)
    assert whole.epsilon(30, 1e-5) == pytest.approx(gaussian_epsilon(1.7, 30, 1e-5, orders))
    # replace-one adjacency doubles the sensitivity: noise z/2 times it
    fixed = StepAccountant(Sampling("fixed", 40, 40), 1.7, orders)
    assert fixed.epsilon(30, 1e-5) == pytest.approx(gaussian_epsilon(0.85, 30, 1e-5, orders))
    assert whole.epsilon(0, 1e-5) == 0.0
    assert math.isinf(StepAccountant(Sampling("poisson", 40, 4), 0.0).epsilon(1, 1e-5))


@pytest.mark.parametrize("sampling", [Sampling("poisson", 500, 16), Sampling("fixed", 16, 16)])
def test_target_epsilon_solve_round_trips(sampling: Sampling) -> None:
    """(Fixed-size sampling below q = 1 solves the same way, ~10 s: not repeated here.)"""
    steps, target, delta = 40, 2.0, 1e-5
    z = solve_noise_multiplier(sampling, steps, target, delta)
    reached = StepAccountant(sampling, z).epsilon(steps, delta)
    assert target - 1e-3 < reached <= target
    assert StepAccountant(sampling, z * 0.99).epsilon(steps, delta) > target  # the smallest z


# -- central DP ------------------------------------------------------------------------------------


def random_updates(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    source = torch.Generator().manual_seed(seed)
    return [
        {
            "a": torch.randn(3, 4, generator=source) * (i + 1),
            "b": torch.randn(7, generator=source) * (i + 1),
        }
        for i in range(count)
    ]


def flat(update: dict[str, torch.Tensor]) -> np.ndarray:
    return np.concatenate([update[k].double().numpy().ravel() for k in sorted(update)])


def test_central_clipping_bound_and_bits() -> None:
    for update in random_updates(5, 0):
        clipped, bit = clip_update(update, 6.0)
        norm = np.linalg.norm(flat(update))
        assert np.linalg.norm(flat(clipped)) <= 6.0 * (1 + 1e-6)
        assert bit == (norm <= 6.0)
        np.testing.assert_allclose(flat(clipped), flat(update) * min(1, 6.0 / norm), rtol=1e-6)


def test_central_noise_std_is_z_c_over_m() -> None:
    total = {"w": torch.zeros(300_000)}
    mean = noised_mean(total, clip_norm=2.0, noise_multiplier=0.8, clients=5, source=generator(1))
    assert mean["w"].double().std().item() == pytest.approx(0.8 * 2.0 / 5, rel=5e-3)


def test_adaptive_clipping_follows_the_formula() -> None:
    """Without noise (z = 0, σ_b = 0) the mean is Σ clip(Δ_i) / m with the fixed m (one of the m
    sampled replies missing), and C moves by C·exp(−η(b̄ − γ)), b̄ = unclipped / m: numpy."""
    updates = random_updates(4, 2)
    norms = [np.linalg.norm(flat(u)) for u in updates]
    clip_norm, quantile, rate, m = float(np.median(norms)), 0.3, 0.4, 5
    from fedlora.privacy.central import AdaptiveClipping

    adaptive = AdaptiveClipping(quantile, rate, 0.0)
    central = CentralDP(clip_norm, 0.0, m, NoiseSeeds("seeded", 0), adaptive=adaptive)
    mean = central.mean_update(0, updates)
    expected = sum(flat(u) * min(1, clip_norm / n) for u, n in zip(updates, norms, strict=True)) / m
    np.testing.assert_allclose(flat(mean), expected, rtol=1e-6)
    unclipped = sum(n <= clip_norm for n in norms)
    assert central.clip_norm == pytest.approx(
        clip_norm * math.exp(-rate * (unclipped / m - quantile))
    )
    assert central.released[0] == {"clip_norm": clip_norm, "unclipped_fraction": unclipped / m}


def test_update_noise_multiplier_keeps_the_total_at_z() -> None:
    z, sigma_b = 1.1, 2.5
    z_update = update_noise_multiplier(z, sigma_b)
    assert z_update == pytest.approx((z**-2 - (2 * sigma_b) ** -2) ** -0.5)
    assert (z_update**-2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(z)
    with pytest.raises(ValueError, match="must exceed noise_multiplier / 2"):
        update_noise_multiplier(1.0, 0.5)


def test_fslora_central_dp_clips_each_scattered_update_whole(tmp_path: Path) -> None:
    """FSLoRA under central DP (no noise, a clip that binds): the server adds Σ_i clip(Δ_i) / m,
    each client's sketched components placed at the indices its download named (numpy)."""
    sets = [
        "federation.weighting=uniform",
        "privacy.mechanism=central",
        "privacy.noise_multiplier=0",
        "privacy.clip_norm=0.01",
    ]
    experiment = build(load_config(TINY / "fslora.toml", sets))
    engine = local_loop(experiment, tmp_path, Console(quiet=True), pooled=False)
    method, modules = experiment.method, experiment.slots.modules
    before = {k: v.double().numpy() for k, v in method.global_state().items()}
    total = {k: np.zeros_like(v) for k, v in before.items()}
    replies = {}
    for client in range(len(experiment.clients)):
        message = method.server_message(client, 0)
        replies[client], _ = engine.round.runtime.train(client, message, 0)
        update = {k: np.zeros_like(v) for k, v in before.items()}
        for k, v in replies[client].items():
            if k in total and v.shape == before[k].shape and ".lora_" not in k:
                update[k] = v.double().numpy()  # the head's update
        for m in modules:
            index = message.get(m.key + ".sketch_index", torch.arange(m.rank)).long().numpy()
            update[m.b][:, index] = replies[client][m.b].double().numpy()
            update[m.a][index, :] = replies[client][m.a].double().numpy()
        norm = math.sqrt(sum((u**2).sum() for u in update.values()))
        assert norm > 0.01  # the clip binds
        for k in total:
            total[k] += update[k] * min(1.0, 0.01 / norm)
    method.aggregate(0, replies, engine.round.weights(sorted(replies)))
    after = method.global_state()
    for k in before:
        expected = before[k] + total[k] / len(experiment.clients)
        np.testing.assert_allclose(after[k].double().numpy(), expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    ("method", "extra", "reason"),
    [
        ("flexlora", [], "does not aggregate by a mean of client updates"),
        ("fedit", [], "federation.weighting 'size'"),
        (
            "fedit",
            ["federation.weighting=uniform", "privacy.adaptive_clipping=true"],
            "must exceed noise_multiplier / 2",
        ),
        ("centralized", ["federation.weighting=uniform"], "pools all data in one party"),
    ],
)
def test_central_dp_refusals_exit_2_with_the_reason(
    tmp_path: Path, method: str, extra: list[str], reason: str
) -> None:
    sets = [f"method.name={method}", "privacy.mechanism=central", "privacy.noise_multiplier=1.0"]
    args = [arg for value in sets + extra for arg in ("--set", value)]
    code, output = run_cli("run", str(TINY / "fedit.toml"), "--out", str(tmp_path / "r"), *args)
    assert code == 2, output
    assert reason in " ".join(output.split()), output
    assert "Traceback" not in output


def test_privacy_settings_without_a_mechanism_are_refused() -> None:
    for table in ({"max_epsilon": 3.0}, {"delta": 1e-5, "noise_multiplier": 1.0}):
        with pytest.raises(ConfigError, match="need mechanism dp_sgd or central"):
            config_from_dict({"privacy": table})
    with pytest.raises(ConfigError, match="exactly one of noise_multiplier and target_epsilon"):
        config_from_dict({"privacy": {"mechanism": "dp_sgd"}})


def test_dp_sgd_refuses_the_split_engine_and_max_grad_norm(tmp_path: Path) -> None:
    for config, extra, reason in (
        ("dlora.toml", [], "per-example clipping cannot cross the split"),
        ("fedit.toml", ["train.max_grad_norm=1.0"], "redundant"),
    ):
        sets = ["privacy.mechanism=dp_sgd", "privacy.noise_multiplier=1.0", *extra]
        args = [arg for value in sets for arg in ("--set", value)]
        code, output = run_cli("run", str(TINY / config), "--out", str(tmp_path / "r"), *args)
        assert code == 2 and reason in " ".join(output.split()), output


# -- end to end ------------------------------------------------------------------------------------

DP_SGD = ["privacy.mechanism=dp_sgd", "privacy.noise_multiplier=1.0", "privacy.delta=1e-5"]
BUDGET_STOP = [  # noise solved for ε = 3 after 3 rounds; the budget 2.99 stops it after round 2
    "experiment.rounds=3",
    "privacy.mechanism=dp_sgd",
    "privacy.target_epsilon=3",
    "privacy.delta=1e-5",
    "privacy.max_epsilon=2.99",
]


def cli_run(out: Path, sets: list[str], config: str = "ffa.toml") -> str:
    args = [arg for value in sets for arg in ("--set", value)]
    code, output = run_cli("run", str(TINY / config), "--out", str(out), "--quiet", *args)
    assert code == 0, output
    return " ".join(output.split())


def test_dp_sgd_run_reports_growing_epsilon_stops_at_the_budget_and_repeats(tmp_path: Path) -> None:
    """Noise solved for ε = 3 after 3 rounds, budget 2.99: rounds 1 and 2 run (ε grows), round 3
    would reach 3, so the run stops cleanly before it; twice, with the same numbers (Dec-LoRA on
    two processes too: tests/test_distributed.py)."""
    sets = BUDGET_STOP
    first = tmp_path / "first"
    output = cli_run(first, sets)
    metrics = trained(read_metrics(first))
    assert [m["round"] for m in metrics] == [1, 2]
    assert 0 < metrics[0]["epsilon"] < metrics[1]["epsilon"] < 2.99
    for m in metrics:  # ε is the largest client's; every client trained every round
        assert m["epsilon"] == max(m["epsilon_clients"].values())
        assert m["delta"] == 1e-5
    assert "stopped: privacy.max_epsilon 2.99: round 3 would bring client" in output
    assert "ε = 3.000" in output and f"{metrics[1]['epsilon']:.3f}" in output  # final table
    assert load_checkpoint(first).completed_rounds == 2
    assert "accuracy" in metrics[1]  # the last round the budget allows is evaluated
    summary = " ".join((first / "summary.md").read_text().split())
    assert "## Privacy" in summary and "Stopped early" in summary and "solved for target" in summary

    again = tmp_path / "again"
    cli_run(again, sets)
    assert timeless_metrics(again) == timeless_metrics(first)  # same config and seed


def test_central_dp_clip_norm_follows_andrew_et_al_and_survives_resume(tmp_path: Path) -> None:
    """Adaptive central DP on 4 clients (all per round: one Gaussian step at z per round, δ =
    min(1e-5, 1/(10·4)) = 1e-5 by default), stopped by max_epsilon after round 1 and resumed
    without it: every round's clip norm follows C·exp(−η(b̄ − γ)) from the previous round's,
    across the resume too."""
    sets = ["experiment.rounds=3", *ADAPTIVE_CENTRAL]
    gaussian = StepAccountant(Sampling("poisson", 4, 4), 0.5)
    budget = (gaussian.epsilon(1, 1e-5) + gaussian.epsilon(2, 1e-5)) / 2
    run = tmp_path / "run"
    cli_run(run, [*sets, f"privacy.max_epsilon={budget}"], "fedit.toml")
    assert load_checkpoint(run).completed_rounds == 1
    experiment = build(load_config(TINY / "fedit.toml", sets))
    engine = local_loop(experiment, run, Console(quiet=True), pooled=False)
    metrics = trained(engine.run(engine.resume(), show_progress=False).metrics)
    norms = [m["clip_norm"] for m in metrics]
    assert norms[0] == 0.05 and len(set(norms)) == 3
    for before, after, m in zip(norms, norms[1:], metrics, strict=False):
        assert after == pytest.approx(before * math.exp(-0.2 * (m["unclipped_fraction"] - 0.5)))
    epsilons = [m["epsilon"] for m in metrics]
    assert epsilons == pytest.approx([gaussian.epsilon(k, 1e-5) for k in (1, 2, 3)])
