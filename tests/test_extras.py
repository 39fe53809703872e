"""A part of fedlora that is not installed (a pip extra) stops before any work, naming the
extra; simulated by hiding the module from the import system (``sys.modules[name] = None``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import TINY, run_cli

FEDIT = str(TINY / "fedit.toml")


@pytest.mark.parametrize(
    ("module", "extra", "args", "what"),
    [
        ("wandb", "trackers", ["run", FEDIT, "--set", "log.wandb=true"], "log.wandb = true"),
        ("mlflow", "trackers", ["run", FEDIT, "--set", "log.mlflow=true"], "log.mlflow = true"),
        (
            "dp_accounting",
            "privacy",
            [
                "run",
                FEDIT,
                "--set",
                "privacy.mechanism=dp_sgd",
                "--set",
                "privacy.noise_multiplier=1.0",
            ],
            "privacy.mechanism 'dp_sgd'",
        ),
        (
            "lm_eval",
            "eval",
            ["run", str(TINY / "causal" / "fedit.toml"), "--set", "eval.lm_eval_tasks=['x']"],
            "eval.lm_eval_tasks",
        ),
        ("lm_eval", "eval", ["evaluate", "RUN", "--tasks", "x"], "fedlora evaluate"),
        ("flwr", "flower", ["flower-app", FEDIT, "--out", "APP"], "fedlora flower-app"),
        ("flwr", "flower", ["flower-run", "APP"], "fedlora flower-run"),
    ],
)
def test_a_missing_extra_is_named(
    module: str,
    extra: str,
    args: list[str],
    what: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, module, None)
    places = {"RUN": str(tmp_path / "run"), "APP": str(tmp_path / "app")}
    args = [places.get(arg, arg) for arg in args]
    if args[0] == "run":
        args += ["--out", str(tmp_path / "run")]
    code, output = run_cli(*args)
    assert code == 2, output
    said = " ".join(output.split())
    assert f"{what} needs {module}, which is not installed: pip install 'fedlora[{extra}]'" in said
    assert not any(tmp_path.iterdir())  # refused before writing anything
