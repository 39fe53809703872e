"""Every method on the language-model path: a tiny multiple-choice run and a tiny instruction
(Alpaca) run on the random tiny LLaMA, each ending with its scores and a finite loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.conftest import TINY, read_metrics, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

METHODS = sorted(path.stem for path in TINY.glob("*.toml"))
SCORES = {
    "multiple_choice": ("mc_accuracy", "mc_accuracy_norm", "test_loss"),
    "alpaca": ("exact_match", "f1", "rouge_l", "test_loss"),
}


@pytest.fixture(scope="module")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llm-data")
    choices = [
        {
            "question": f"What is {a} plus {b}?",
            "choices": [str(a + b), str(a * b + 1), "neither"],
            "answer": (a + b) % 3 if a * b + 1 != a + b else 0,
            "label": "small" if a + b < 8 else "large",
        }
        for a in range(1, 7)
        for b in range(1, 5)
    ]
    alpaca = [
        {"instruction": f"Repeat the word {word}.", "input": "", "output": word, "label": word[0]}
        for word in ("apple", "berry", "cherry", "date", "elder", "fig", "grape", "hazel") * 3
    ]
    files = {"multiple_choice": root / "mc.jsonl", "alpaca": root / "alpaca.jsonl"}
    for kind, rows in (("multiple_choice", choices), ("alpaca", alpaca)):
        files[kind].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


@pytest.mark.parametrize("kind", sorted(SCORES))
@pytest.mark.parametrize("method", METHODS)
def test_every_method_runs_the_language_model_formats(
    method: str, kind: str, data_files: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    overrides = [
        "model.name='tiny-llama'",
        f"data.dataset='{data_files[kind]}'",
        "model.max_length=96",
        "data.max_test_examples=6",
        "eval.max_generate=2",
        "eval.max_new_tokens=4",
        "lora.train_head=false",
        "experiment.rounds=1",
        "train.local_steps=1",
    ]
    args = [arg for o in overrides for arg in ("--set", o)]
    code, output = run_cli("run", str(TINY / f"{method}.toml"), "--out", str(out), "--quiet", *args)
    assert code == 0, output
    final = read_metrics(out)[-1]
    for key in SCORES[kind]:
        assert key in final and math.isfinite(final[key]), (key, final)
    assert math.isfinite(final["train_loss"])
    assert f"format `{kind}`" in (out / "summary.md").read_text()
