"""Do two runs of one config agree (e.g. float32 on CUDA vs on the CPU)? Exit 1 if not.

Compared per round: the train loss (relative tolerance ``--loss-rtol``) and every test metric
both runs report (absolute tolerance ``--metric-atol``: accuracy, macro-F1, ROUGE-L; loss and
perplexity relative, by ``--loss-rtol``); the ledgers must carry exactly the same bytes (the wire
is float32 CPU tensors whatever the device).

    python -P benchmarks/compare_runs.py RUN_A RUN_B [--loss-rtol 1e-3] [--metric-atol 0.02]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SCORES = ("accuracy", "macro_f1", "rouge_l")
LOSSES = ("train_loss", "test_loss", "perplexity")


def rows(run: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


def differences(a: Path, b: Path, loss_rtol: float, metric_atol: float) -> list[str]:
    """Human-readable disagreements between runs ``a`` and ``b`` (empty: they agree)."""
    found = []
    bytes_a = [r["bytes"] for r in rows(a, "ledger.jsonl")]
    bytes_b = [r["bytes"] for r in rows(b, "ledger.jsonl")]
    if bytes_a != bytes_b:
        found.append(f"ledgers differ: {sum(bytes_a)} vs {sum(bytes_b)} bytes")
    metrics_a, metrics_b = rows(a, "metrics.jsonl"), rows(b, "metrics.jsonl")
    if len(metrics_a) != len(metrics_b):
        return [*found, f"{len(metrics_a)} vs {len(metrics_b)} rounds"]
    for ma, mb in zip(metrics_a, metrics_b, strict=True):
        for key in LOSSES:
            if key in ma and key in mb:
                gap = abs(ma[key] - mb[key]) / max(abs(mb[key]), 1e-12)
                if gap > loss_rtol:
                    found.append(f"round {ma['round']} {key}: {ma[key]:.6g} vs {mb[key]:.6g}")
        for key in SCORES:
            if key in ma and key in mb and abs(ma[key] - mb[key]) > metric_atol:
                found.append(f"round {ma['round']} {key}: {ma[key]:.4f} vs {mb[key]:.4f}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--loss-rtol", type=float, default=1e-3)
    parser.add_argument("--metric-atol", type=float, default=0.02)
    args = parser.parse_args()
    found = differences(args.a, args.b, args.loss_rtol, args.metric_atol)
    verdict = "DIFFER" if found else "agree"
    print(
        f"{args.a} vs {args.b}: {verdict} (loss rtol {args.loss_rtol}, metric atol "
        f"{args.metric_atol})"
    )
    for line in found:
        print(f"  {line}")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
