"""fedlora's multiple-choice scorer against lm-evaluation-harness on the same items, model and
adapter (issue 29): the choice each makes on every item, accuracy, and items per second.

Both score the first ``--items`` test items of ``bbc-news-mc`` (the default split), rendered
by SmolLM2-135M-Instruct's chat template, as the log-likelihood of each choice after the
prompt. lm-eval gets them as a local task written by ``fedlora.harness.write_choice_task``;
fedlora's side is ``fedlora.scoring.choice_loglikelihoods`` (one forward of each prompt, the
choices against its cache). Both run on the same model object (the base, or the base with a
run's adapter given by ``--run``), in float32 on the CPU, with the same batch size.

    python -P benchmarks/mc_vs_lm_eval.py [--items 200] [--batch 16] [--run runs/llm]

lm-eval moves a context's trailing whitespace into the continuation, so its score of a choice
here includes log P("\\n" | "...assistant"), the same for every choice of an item: its ``acc``
choices equal a scorer without it, its ``acc_norm`` can differ where that term, divided by
different choice lengths, reorders near-ties. The script counts both.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

from fedlora.offline import use_offline_defaults

use_offline_defaults()

import torch  # noqa: E402

from fedlora.config import DataConfig, load_config  # noqa: E402
from fedlora.data.chat import Rendering  # noqa: E402
from fedlora.data.sources import load_split  # noqa: E402
from fedlora.data.tokenized import tokenize  # noqa: E402
from fedlora.harness import write_choice_task  # noqa: E402
from fedlora.models import load_base_model, load_tokenizer  # noqa: E402
from fedlora.scoring import choice_loglikelihoods, choice_metrics  # noqa: E402

MODEL = "smollm2-135m"
TASK = "fedlora_bbc_news_mc"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def fedlora_scores(model: torch.nn.Module, data, batch: int) -> list[list[float]]:
    order = sorted(range(len(data)), key=lambda r: len(data.contexts[r]))
    scores: list[list[float]] = [[] for _ in order]
    with torch.no_grad():
        for start in range(0, len(order), batch):
            rows = order[start : start + batch]
            for row, values in zip(
                rows, choice_loglikelihoods(model, data, rows, torch.device("cpu")), strict=True
            ):
                scores[row] = values
    return scores


def lm_eval_scores(model: torch.nn.Module, tokenizer, include: Path, batch: int) -> list:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch)
    results = simple_evaluate(
        model=harness,
        tasks=[TASK],
        task_manager=TaskManager(include_path=str(include), include_defaults=False),
        log_samples=True,
    )
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    return [[float(resp[0]) for resp in s["filtered_resps"]] for s in samples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--run", type=Path, help="a SmolLM2 run directory: score its adapter")
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = load_tokenizer(MODEL)
    model = load_base_model(MODEL, 1, tokenizer, seed=0)
    if args.run is not None:
        from peft import PeftModel

        assert load_config(args.run / "config.toml").model.name == MODEL
        model = PeftModel.from_pretrained(model, args.run / "adapter")
    model.eval()
    split = load_split(DataConfig(dataset="bbc-news-mc"), needs_answers=True)
    items = split.test.select(range(min(args.items, len(split.test))))
    data = tokenize(items, tokenizer, 512, causal=True, rendering=Rendering())

    began = time.perf_counter()
    ours = fedlora_scores(model, data, args.batch)
    ours_seconds = time.perf_counter() - began
    with tempfile.TemporaryDirectory() as scratch:
        include = write_choice_task(items, tokenizer, Rendering(), Path(scratch), TASK)
        began = time.perf_counter()
        theirs = lm_eval_scores(model, tokenizer, include, args.batch)
        theirs_seconds = time.perf_counter() - began

    gold, chars = list(items["gold"]), data.choice_chars
    same = sum(argmax(a) == argmax(b) for a, b in zip(ours, theirs, strict=True))
    per_char = [
        [s / c for s, c in zip(row, n, strict=True)] for row, n in zip(theirs, chars, strict=True)
    ]
    ours_norm = [
        [s / c for s, c in zip(row, n, strict=True)] for row, n in zip(ours, chars, strict=True)
    ]
    same_norm = sum(argmax(a) == argmax(b) for a, b in zip(ours_norm, per_char, strict=True))
    shift = [max(abs((a - b) - (row_a[0] - row_b[0])) for a, b in zip(row_a, row_b, strict=True))
             for row_a, row_b in zip(ours, theirs, strict=True)]  # fmt: skip
    report = {
        "machine": cpu_name(),
        "date": str(date.today()),
        "model": MODEL + (f" + {args.run}/adapter" if args.run else ""),
        "items": len(items),
        "batch": args.batch,
        "fedlora": choice_metrics(ours, gold, chars) | {"items_per_s": len(items) / ours_seconds},
        "lm_eval": choice_metrics(theirs, gold, chars)
        | {"items_per_s": len(items) / theirs_seconds},
        "same_choice_acc": same,
        "same_choice_acc_norm": same_norm,
        "max_choice_offset_spread": max(shift),
    }
    report["speedup"] = report["fedlora"]["items_per_s"] / report["lm_eval"]["items_per_s"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
