"""Shared fixtures: tiny runs made once per session through the real CLI path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny"


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


@pytest.fixture(scope="session")
def fedit_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "fedit"
    code, output = run_cli("run", str(TINY / "fedit.toml"), "--out", str(out), "--quiet")
    assert code == 0, output
    return out
