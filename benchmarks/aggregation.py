"""Server aggregation time: factored truncated SVD vs the dense reference (issue 3).

The server step of FlexLoRA-style methods is the rank-r truncated SVD of Σ_i p_i s_i B_i A_i per
module. ``weighted_product_svd`` computes it from QR decompositions of the stacked factors; the
dense reference forms the d×k product and takes its full SVD. Shapes: LLaMA-7B adapters, 32
layers × {q,k,v,o} of 4096×4096, r = 16, 20 clients, float32.

The factored step is timed on every module. The dense reference costs ~a minute per module on
a small CPU, so it is timed on a sample of modules in the same run and its per-module mean is
extrapolated to all modules (stated in the output). The error compares the truncated products
s·B·A of both on the sampled modules, relative in Frobenius norm; the d×k products are formed
for that check only, outside the timed regions.

    python benchmarks/aggregation.py [--dense-sample 2] [--modules 128]
"""

from __future__ import annotations

import argparse
import time

import torch

from fedlora.lora import weighted_product_svd


def client_factors(generator: torch.Generator, clients: int, d: int, k: int, rank: int):
    bs = [torch.randn(d, rank, generator=generator) * 0.01 for _ in range(clients)]
    as_ = [torch.randn(rank, k, generator=generator) / k**0.5 for _ in range(clients)]
    return bs, as_


def dense_step(bs, as_, coefficients, rank):
    delta = sum(c * (b @ a) for c, b, a in zip(coefficients, bs, as_, strict=True))
    u, sigma, vh = torch.linalg.svd(delta, full_matrices=False)
    return u[:, :rank], sigma[:rank], vh[:rank]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", type=int, default=32 * 4)
    parser.add_argument("--dense-sample", type=int, default=2)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for both sides (1: robust on a shared, oversubscribed machine)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    weights = torch.rand(args.clients, generator=generator) + 0.5
    scale = 32 / args.rank  # alpha/r with alpha = 32
    coefficients = (weights / weights.sum() * scale).tolist()

    factored_seconds, dense_seconds, errors = 0.0, [], []
    for module in range(args.modules):
        bs, as_ = client_factors(generator, args.clients, args.dim, args.dim, args.rank)
        began = time.perf_counter()
        u, sigma, vh = weighted_product_svd(bs, as_, coefficients, args.rank)
        factored_seconds += time.perf_counter() - began
        if module < args.dense_sample:
            began = time.perf_counter()
            du, dsigma, dvh = dense_step(bs, as_, coefficients, args.rank)
            dense_seconds.append(time.perf_counter() - began)
            reference = (du * dsigma) @ dvh
            errors.append(
                float(
                    torch.linalg.norm((u * sigma) @ vh - reference) / torch.linalg.norm(reference)
                )
            )
            print(
                f"module {module}: dense {dense_seconds[-1]:.2f} s, rel err {errors[-1]:.2e}",
                flush=True,
            )

    per_module_dense = sum(dense_seconds) / len(dense_seconds)
    dense_total = per_module_dense * args.modules
    print(
        f"shapes: {args.modules} modules of {args.dim}x{args.dim}, r={args.rank}, "
        f"{args.clients} clients, float32, torch threads {torch.get_num_threads()}"
    )
    per_module = factored_seconds / args.modules * 1e3
    print(
        f"factored (QR of stacked factors + {args.clients * args.rank}^2 core SVD), all "
        f"{args.modules} modules: {factored_seconds:.2f} s ({per_module:.1f} ms/module)"
    )
    print(
        f"dense (form d x k product + full SVD), measured on {len(dense_seconds)} modules: "
        f"{per_module_dense:.2f} s/module; extrapolated to {args.modules} modules: "
        f"{dense_total:.0f} s"
    )
    print(f"speedup {dense_total / factored_seconds:.0f}x max_rel_err {max(errors):.1e}")


if __name__ == "__main__":
    main()
