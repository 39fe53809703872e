"""Shared fixtures: tiny runs made once per session through the real CLI path."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The tokenized-data cache of this test process, not the user's ~/.cache.
os.environ.setdefault("FEDLORA_TOKEN_CACHE", tempfile.mkdtemp(prefix="fedlora-cache-"))

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny"
# One torch thread, whatever the process's count is: the last bits of a run depend on it
# (two threads split a reduction differently), and tests compare runs bit for bit.
ONE = ("--set", "compute.threads=1")
# Adaptive central DP on a tiny run: a clip norm that binds and noise that shows.
ADAPTIVE_CENTRAL = [
    "federation.weighting=uniform",
    "privacy.mechanism=central",
    "privacy.noise_multiplier=0.5",
    "privacy.clip_norm=0.05",
    "privacy.adaptive_clipping=true",
    "privacy.clipped_count_stddev=1.0",
]


def run_cli(*args: str) -> tuple[int, str]:
    """``fedlora ARGS`` in-process; returns (exit code, combined output)."""
    from fedlora.cli import app

    result = CliRunner().invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def without_timing(metrics: list[dict]) -> list[dict]:
    """Metrics minus wall-clock fields: what must match between equivalent runs."""
    return [{k: v for k, v in m.items() if "seconds" not in k} for m in metrics]


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def timeless_metrics(run: Path) -> list[dict]:
    return without_timing(read_metrics(run))


def trained(metrics: list[dict]) -> list[dict]:
    """The trained rounds' records: without round 0, the initial model's evaluation."""
    return [m for m in metrics if m["round"] > 0]


@pytest.fixture(scope="session")
def fedit_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "fedit"
    code, output = run_cli("run", str(TINY / "fedit.toml"), "--out", str(out), "--quiet", *ONE)
    assert code == 0, output
    return out


def run(name: str, out: Path, rounds: int | None = None):
    """configs/tiny/<name>.toml built, with an in-process engine writing to ``out``."""
    from rich.console import Console

    from fedlora.config import load_config
    from fedlora.engines.placements import local_loop
    from fedlora.experiment import build

    config = load_config(TINY / f"{name}.toml", [f"experiment.rounds={rounds}"] if rounds else [])
    experiment = build(config)
    out.mkdir(parents=True, exist_ok=True)
    return experiment, local_loop(experiment, out, Console(quiet=True), pooled=False)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory):
    """2-round tiny runs, made once per method and test module and shared by its tests."""
    done: dict = {}

    def get(name: str):
        if name not in done:
            experiment, engine = run(name, tmp_path_factory.mktemp(name))
            done[name] = experiment, engine, engine.run(show_progress=False)
        return done[name]

    return get


def assert_adapter_reloads(run: Path) -> None:
    """The run's exported PEFT adapter, loaded by ``PeftModel.from_pretrained`` on a fresh base,
    gives exactly the logits of the run's final state in fedlora's own slots."""
    import torch
    from peft import PeftModel

    from fedlora.checkpoint import load_checkpoint
    from fedlora.config import load_config
    from fedlora.experiment import build
    from fedlora.models import load_base_model, load_tokenizer

    config = load_config(run / "config.toml")
    experiment = build(config)
    experiment.slots.load(load_checkpoint(run).method)
    experiment.slots.model.eval()
    batch = experiment.train_set.batch(list(range(6)))
    with torch.no_grad():
        expected = experiment.slots.model(**batch).logits

    tokenizer = load_tokenizer(config.model.name)
    labels = len(experiment.split.label_names)
    base = load_base_model(config.model.name, labels, tokenizer, seed=config.experiment.seed)
    reloaded = PeftModel.from_pretrained(base, run / "adapter").eval()
    with torch.no_grad():
        logits = reloaded(**batch).logits
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


@pytest.fixture
def one_thread():
    """One torch thread for a test, restored afterwards: tiny models on a shared 2-core
    machine only wait for each other with two threads per op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
