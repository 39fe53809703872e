"""Full-weight methods (``dwa``, ``fedftg``, ``fedftg_code_compat``): algorithms.md §7 T7 (GaLore's
subspace, and GaLore doing nothing when its param groups lack the keys, the bug of §4.6) and
T12 (DWA linearity, FedAvg of one full-batch GD step = one centralized GD step), on the real
optimizers, methods, trainer and tiny model."""

from __future__ import annotations

import torch
from galore_torch import GaLoreAdamW
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from fedlora.config import TrainConfig, load_config
from fedlora.engines.placements import local_loop
from fedlora.experiment import build
from fedlora.galore import galore_adamw
from fedlora.training import optimizer_tensors, restore_optimizer
from tests.conftest import TINY, assert_adapter_reloads, run_cli

RHO = 3


def fit(optimizer_for, shape: tuple[int, int], steps: int, seed: int = 0) -> tuple:
    """``steps`` optimizer steps on ‖W X − Y‖² with a full-rank optimum; returns (W0, W, opt)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(*shape, generator=generator))
    inputs = torch.randn(shape[1], 64, generator=generator)
    targets = torch.randn(shape[0], 64, generator=generator)
    start = weight.detach().clone()
    optimizer = optimizer_for(weight)
    for _ in range(steps):
        optimizer.zero_grad()
        ((weight @ inputs - targets) ** 2).sum().backward()
        optimizer.step()
    return start, weight.detach().clone(), optimizer


def galore(gap: int):
    return lambda w: galore_adamw([("w", w)], {"w"}, TrainConfig(lr=1e-2), RHO, gap, 1.0, "std")


def rank(matrix: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(matrix, rtol=1e-5))


def test_t7_update_within_a_window_stays_in_the_projector_subspace() -> None:
    for shape in ((12, 20), (20, 12)):  # left projection P (m < n), right projection Q (m >= n)
        start, end, optimizer = fit(galore(gap=100), shape, steps=10)
        update = end - start
        assert rank(update) == RHO
        (state,) = optimizer.state.values()
        basis = state["projector"].ortho_matrix
        if shape[0] < shape[1]:  # column space inside span(P)
            assert basis.shape == (shape[0], RHO)
            assert torch.allclose(basis @ basis.T @ update, update, atol=1e-5)
        else:  # row space inside span(Qᵀ)
            assert basis.shape == (RHO, shape[1])
            assert torch.allclose(update @ basis.T @ basis, update, atol=1e-5)


def test_t7_projector_refresh_lets_the_rank_grow() -> None:
    start, end, _ = fit(galore(gap=2), (12, 20), steps=10)
    assert rank(end - start) > RHO


def test_t7_galore_without_group_keys_does_nothing() -> None:
    """§4.6: ``GaLoreAdamW(params, lr)`` never projects: the update is full rank and the state
    has no projector. Our fedftg must not build it that way; fedftg_code_compat does on purpose."""
    start, end, optimizer = fit(lambda w: GaLoreAdamW([w], lr=1e-2), (12, 20), steps=10)
    assert rank(end - start) == 12
    (state,) = optimizer.state.values()
    assert "projector" not in state


def test_galore_state_survives_a_safetensors_round_trip() -> None:
    """fedftg keeps its optimizer between rounds and checkpoints it: 5 + 5 steps with the state
    serialized in between equal 10 steps straight."""
    _, straight, _ = fit(galore(gap=4), (12, 20), steps=10)
    _, middle, optimizer = fit(galore(gap=4), (12, 20), steps=5)
    saved = safetensors_load(safetensors_save(optimizer_tensors(optimizer)))
    weight = torch.nn.Parameter(middle.clone())
    resumed = galore(gap=4)(weight)
    restore_optimizer(resumed, saved)
    generator = torch.Generator().manual_seed(0)
    torch.randn(12, 20, generator=generator)
    inputs, targets = (
        torch.randn(20, 64, generator=generator),
        torch.randn(12, 64, generator=generator),
    )
    for _ in range(5):
        resumed.zero_grad()
        ((weight @ inputs - targets) ** 2).sum().backward()
        resumed.step()
    assert torch.equal(weight.detach(), straight)


def test_fedftg_projects_exactly_the_target_matrices(tmp_path) -> None:
    """Through the real trainer: every client's kept optimizer state holds one projector per
    target matrix (shape d×ρ or ρ×k, the smaller side kept) and none for the head."""
    experiment = build(load_config(TINY / "fedftg.toml", ["experiment.rounds=1"]))
    engine = local_loop(experiment, tmp_path, pooled=False)
    engine.run(show_progress=False)
    matrices = experiment.slots.matrices
    assert matrices and set(experiment.method.projected) == set(matrices)
    rho = experiment.method.options.galore_rank
    for client in range(len(experiment.clients)):
        projectors = [
            v
            for k, v in engine.round.runtime.optimizers[client].items()
            if k.endswith(".projector")
        ]
        assert len(projectors) == len(matrices)
        assert all(rho in p.shape and p.dim() == 2 for p in projectors)


def test_full_weight_adapter_reloads_in_peft(tmp_path) -> None:
    out = tmp_path / "run"
    code, output = run_cli(
        "run", str(TINY / "fedftg_code_compat.toml"), "--out", str(out), "--quiet"
    )
    assert code == 0, output
    assert '"peft_type": "LN_TUNING"' in (out / "adapter" / "adapter_config.json").read_text()
    assert_adapter_reloads(out)


def test_t12_dwa_average_of_weights_is_weights_of_the_average_update() -> None:
    experiment = build(load_config(TINY / "dwa.toml"))
    method, initial = experiment.method, experiment.method.context.initial
    generator = torch.Generator().manual_seed(3)
    deltas = [{k: torch.randn(v.shape, generator=generator) for k, v in initial.items()}]
    deltas += [{k: torch.randn(v.shape, generator=generator) for k, v in initial.items()}]
    replies = {c: {k: initial[k] + d[k] for k in initial} for c, d in enumerate(deltas)}
    method.aggregate(0, replies, {0: 0.25, 1: 0.75})
    for k, w0 in initial.items():
        expected = w0 + 0.25 * deltas[0][k] + 0.75 * deltas[1][k]
        assert torch.allclose(method.global_state()[k], expected, atol=1e-6)


def one_full_batch_gd_round(num_clients: int, tmp_path) -> dict[str, torch.Tensor]:
    overrides = [
        "experiment.rounds=1",
        f"partition.num_clients={num_clients}",
        "partition.min_client_size=1",
        "data.max_train_examples=48",
        "train.optimizer=sgd",
        "train.momentum=0",
        "train.lr=0.5",
        "train.local_steps=1",
        "train.batch_size=1000",  # every client's whole data in one batch
        "eval.every=5",
    ]
    experiment = build(load_config(TINY / "dwa.toml", overrides))
    for module in experiment.slots.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # full-batch GD is deterministic only without dropout
    out = tmp_path / str(num_clients)
    out.mkdir()
    local_loop(experiment, out, pooled=False).run(show_progress=False)
    return experiment.method.global_state()


def test_t12_fedavg_of_one_full_batch_gd_step_is_one_centralized_gd_step(tmp_path) -> None:
    """p_i = n_i/n: Σ p_i (W − η∇f_i(W)) = W − η∇F(W), F the mean loss over the pooled data."""
    federated = one_full_batch_gd_round(3, tmp_path)
    pooled = one_full_batch_gd_round(1, tmp_path)
    start = build(load_config(TINY / "dwa.toml")).method.context.initial
    for name, weight in pooled.items():
        assert not torch.equal(weight, start[name]), name  # the step moved every tensor
        assert torch.allclose(federated[name], weight, rtol=1e-5, atol=1e-6), name
