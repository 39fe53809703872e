"""The identities of algorithms.md §7 (T1, T3, T4, T5, T8) on the functions of ``fedlora.lora``.

Random small matrices in float64, tolerance 1e-10 unless the statement is statistical.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.lora import (
    lora_scale,
    pad_factors,
    product_norm,
    product_svd,
    sketch_factors,
    sketch_indices,
    sparsity_weights,
    stack_factors,
    truncate_factors,
    weighted_average,
    weighted_product_svd,
)

TOL = 1e-10


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def clients(ranks: list[int], d: int = 12, k: int = 9, seed: int = 0):
    bs = [rand(d, r, seed=seed + 2 * i) for i, r in enumerate(ranks)]
    as_ = [rand(r, k, seed=seed + 2 * i + 1) for i, r in enumerate(ranks)]
    return bs, as_


def test_t1_fedit_noise_is_the_weighted_factor_covariance() -> None:
    bs, as_ = clients([3, 3, 3])
    p = [0.2, 0.5, 0.3]
    averaged = weighted_average([{"b": b, "a": a} for b, a in zip(bs, as_, strict=True)], p)
    ideal = sum(w * b @ a for w, b, a in zip(p, bs, as_, strict=True))
    noise = ideal - averaged["b"] @ averaged["a"]
    covariance = sum(
        w * (b - averaged["b"]) @ (a - averaged["a"]) for w, b, a in zip(p, bs, as_, strict=True)
    )
    assert torch.allclose(noise, covariance, atol=TOL, rtol=0)
    assert noise.norm() > 1e-3  # generic factors: FedIT is not product-exact
    shared = weighted_average([{"b": b, "a": as_[0]} for b in bs], p)  # FFA: one A for all
    exact = sum(w * b @ as_[0] for w, b in zip(p, bs, strict=True))
    assert torch.allclose(shared["b"] @ shared["a"], exact, atol=TOL, rtol=0)


def test_factored_svd_equals_dense_svd() -> None:
    bs, as_ = clients([4, 2, 5], d=40, k=30)
    coefficients = [0.3 * 2.0, 0.3 * 4.0, 0.4 * 1.6]  # p_i·s_i
    dense = sum(c * b @ a for c, b, a in zip(coefficients, bs, as_, strict=True))
    u_ref, s_ref, vh_ref = torch.linalg.svd(dense)
    u, s, vh = weighted_product_svd(bs, as_, coefficients, rank=6)
    assert torch.allclose(s, s_ref[:6], atol=TOL, rtol=0)
    assert torch.allclose((u * s) @ vh, (u_ref[:, :6] * s_ref[:6]) @ vh_ref[:6], atol=1e-9, rtol=0)
    assert torch.allclose(u.T @ u, torch.eye(6, dtype=torch.float64), atol=TOL)
    assert torch.allclose(vh @ vh.T, torch.eye(6, dtype=torch.float64), atol=TOL)
    # Full requested rank beyond the stacked rank: only the 11 nonzero components come back.
    assert product_svd(torch.cat(bs, 1), torch.cat(as_, 0), rank=20)[1].numel() == 11


@pytest.mark.parametrize("rank_j", [1, 3, 6, 11])
def test_t3_flexlora_truncation_error_is_the_dropped_singular_values(rank_j: int) -> None:
    bs, as_ = clients([4, 2, 5], d=40, k=30, seed=5)
    coefficients = [0.5, 0.25, 0.25]
    delta = sum(c * b @ a for c, b, a in zip(coefficients, bs, as_, strict=True))
    sigma = torch.linalg.svdvals(delta)
    assert int((sigma > 1e-9 * sigma[0]).sum()) == 11  # rank ≤ Σ r_i
    u, s, vh = weighted_product_svd(bs, as_, coefficients, rank_j)
    error = torch.linalg.norm(delta - (u * s) @ vh) ** 2
    assert math.isclose(float(error), float((sigma[rank_j:] ** 2).sum()), abs_tol=1e-9)
    assert (rank_j >= 11) == (float(error) < 1e-18)
    # Gauge: (BM)(M⁻¹A) = BA, so factors are not identifiable, products are.
    m = rand(rank_j, rank_j, seed=9) + 3 * torch.eye(rank_j, dtype=torch.float64)
    b, a = u * s, vh
    assert torch.allclose((b @ m) @ (torch.linalg.inv(m) @ a), b @ a, atol=1e-9)


def test_t4_stacking_is_exact_for_heterogeneous_ranks() -> None:
    ranks = [4, 1, 3, 2]
    bs, as_ = clients(ranks, seed=11)
    p = [0.1, 0.2, 0.3, 0.4]
    b, a = stack_factors(bs, as_, p)
    expected = sum(w * bi @ ai for w, bi, ai in zip(p, bs, as_, strict=True))
    assert torch.allclose(b @ a, expected, atol=TOL, rtol=0)
    assert b.shape[1] == a.shape[0] == sum(ranks)
    assert int(torch.linalg.matrix_rank(b @ a)) == min(sum(ranks), 9)


def test_t5_padding_truncation_dilution_and_sparsity_weights() -> None:
    bs, as_ = clients([2, 4, 6], seed=21)
    for b, a in zip(bs, as_, strict=True):
        pb, pa = pad_factors(b, a, 6)
        assert pb.shape == (12, 6) and pa.shape == (6, 9)
        assert torch.equal(pb @ pa, b @ a)
        assert math.isclose(
            float(product_norm(b, a)), float(torch.linalg.norm(b @ a)), rel_tol=1e-12
        )
    padded = [pad_factors(b, a, 6) for b, a in zip(bs, as_, strict=True)]
    p = [1 / 3] * 3
    b_avg = sum(w * b for w, (b, _) in zip(p, padded, strict=True))
    a_avg = sum(w * a for w, (_, a) in zip(p, padded, strict=True))
    exact = sum(w * b @ a for w, b, a in zip(p, bs, as_, strict=True))
    assert torch.linalg.norm(b_avg @ a_avg - exact) > 1e-3  # T1 applies to padded factors too
    # Index l (0-based) is diluted by the fraction of clients with r_i > l.
    for index, holders in ((0, 3), (3, 2), (5, 1)):
        own = sum(b[:, index] for b in bs if b.shape[1] > index) / 3
        assert torch.allclose(b_avg[:, index], own, atol=TOL)
        assert sum(b.shape[1] > index for b in bs) == holders
    # Truncating rank 6 to 2 drops exactly components 2..5.
    b, a = truncate_factors(bs[2], as_[2], 2)
    dropped = bs[2][:, 2:] @ as_[2][2:]
    assert torch.allclose(bs[2] @ as_[2] - b @ a, dropped, atol=TOL)
    weights = sparsity_weights(list(zip(bs, as_, strict=True)))
    assert math.isclose(sum(weights), 1.0, rel_tol=1e-12) and all(w > 0 for w in weights)
    assert sparsity_weights([(torch.zeros(3, 2), torch.zeros(2, 4))]) == []


def test_scale_rule() -> None:
    assert lora_scale(16, 8) == 2.0
    assert lora_scale(1, 64, rslora=True) == 0.125


def sketch_matrix(index: torch.Tensor, r: int) -> torch.Tensor:
    s = torch.zeros(r, r, dtype=torch.float64)
    s[index, index] = r / index.numel()
    return s


def test_t8abc_sketch_is_unbiased_with_the_closed_form_variance() -> None:
    r, k, draws = 6, 2, 40_000
    b, a = rand(5, r, seed=31), rand(r, 4, seed=32)
    generator = torch.Generator().manual_seed(0)
    target = b @ a
    mean_s = torch.zeros(r, r, dtype=torch.float64)
    mean_product = torch.zeros_like(target)
    squared = 0.0
    for _ in range(draws):
        index = sketch_indices(r, k, generator)
        bi, ai = sketch_factors(b, a, index)
        product = (r / k) * bi @ ai  # what the client's rank-k LoRA at scale s·r/k computes
        mean_s += sketch_matrix(index, r) / draws
        mean_product += product / draws
        squared += float(torch.linalg.norm(product - target) ** 2) / draws
    assert torch.allclose(mean_s, torch.eye(r, dtype=torch.float64), atol=0.02)
    assert torch.linalg.norm(mean_product - target) / torch.linalg.norm(target) < 0.02
    outer = [torch.outer(b[:, j], a[j]) for j in range(r)]
    diagonal = sum(float(b[:, j].norm() ** 2 * a[j].norm() ** 2) for j in range(r))
    cross = sum(float((outer[i] * outer[j]).sum()) for i in range(r) for j in range(r) if i != j)
    predicted = (r - k) / k * (diagonal - cross / (r - 1))
    assert abs(squared - predicted) / predicted < 0.03
    index = sketch_indices(r, r, generator)
    assert torch.equal(sketch_factors(b, a, index)[0] @ a, target)  # k = r: no variance


def test_t8d_gradients_vanish_outside_the_sketch() -> None:
    r, k = 6, 3
    b = rand(5, r, seed=41).requires_grad_()
    a = rand(r, 4, seed=42).requires_grad_()
    x, y = rand(4, 7, seed=43), rand(5, 7, seed=44)
    index = sketch_indices(r, k, torch.Generator().manual_seed(1))
    loss = ((b @ sketch_matrix(index, r) @ a @ x - y) ** 2).sum()
    loss.backward()
    outside = torch.ones(r, dtype=torch.bool)
    outside[index] = False
    assert torch.equal(b.grad[:, outside], torch.zeros_like(b.grad[:, outside]))
    assert torch.equal(a.grad[outside], torch.zeros_like(a.grad[outside]))
    assert b.grad[:, index].abs().sum() > 0


def sgd_run(b, a, index, scale, steps, lr, masked: bool, x, y):
    """``masked``: the global parameterisation s·B·S·A; else the small rank-k LoRA at s·r/k."""
    r, k = b.shape[1], index.numel()
    if masked:
        params = [b.clone().requires_grad_(), a.clone().requires_grad_()]
    else:
        params = [p.requires_grad_() for p in sketch_factors(b, a, index)]
    optimizer = torch.optim.SGD(params, lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        if masked:
            product = scale * params[0] @ sketch_matrix(index, r) @ params[1]
        else:
            product = scale * (r / k) * params[0] @ params[1]
        ((product @ x - y) ** 2).mean().backward()
        optimizer.step()
    if masked:
        return params[0].detach()[:, index], params[1].detach()[index]
    return params[0].detach(), params[1].detach()


def test_t8e_small_sketched_lora_equals_masked_global_training() -> None:
    b, a = rand(5, 8, seed=51), rand(8, 4, seed=52)
    x, y = rand(4, 16, seed=53), rand(5, 16, seed=54)
    index = sketch_indices(8, 3, torch.Generator().manual_seed(2))
    small = sgd_run(b, a, index, 0.5, 5, 0.05, False, x, y)
    masked = sgd_run(b, a, index, 0.5, 5, 0.05, True, x, y)
    for got, want in zip(small, masked, strict=True):
        assert torch.allclose(got, want, atol=TOL, rtol=0)


def test_t8f_gradient_scaling_emulates_a_scale_only_under_sgd() -> None:
    """The code emulates the sketch's (r/k) factors by rescaling gradients (by S²). An SGD step
    scales with the gradient, so that can match (e); an Adam step is invariant to a gradient
    rescaling (up to eps), so under Adam the trick changes nothing and cannot equal (e)."""
    b, a = rand(5, 2, seed=61), rand(2, 4, seed=62)
    x, y = rand(4, 16, seed=63), rand(5, 16, seed=64)

    def step(optimizer_class, gradient_factor: float) -> torch.Tensor:
        param = b.clone().requires_grad_()
        optimizer = optimizer_class([param], lr=0.1)
        ((param @ a @ x - y) ** 2).mean().backward()
        param.grad *= gradient_factor
        optimizer.step()
        return param.detach() - b

    factor = (8 / 2) ** 2
    assert torch.allclose(
        step(torch.optim.SGD, factor), factor * step(torch.optim.SGD, 1.0), atol=TOL
    )
    adam_gap = step(torch.optim.Adam, factor) - step(torch.optim.Adam, 1.0)
    assert adam_gap.abs().max() < 1e-5 * step(torch.optim.Adam, 1.0).abs().max()  # eps only


def test_sketch_index_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        sketch_indices(4, 5, torch.Generator())
