"""The Python API: ``fedlora.run`` and ``fedlora.load_run`` against the CLI's own runs."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import fedlora
from tests.conftest import REPO, TINY, read_metrics, run_cli, without_timing


def test_a_dict_config_runs_as_the_cli_runs_its_file(fedit_run: Path, tmp_path: Path) -> None:
    """Same config (given as a dict), same seed: the same metrics as ``fedlora run``, and the
    result object holds what the run directory holds."""
    config = tomllib.loads((TINY / "fedit.toml").read_text())
    result = fedlora.run(
        config, out=tmp_path / "api", overrides=["compute.threads=1"], progress=False
    )
    assert without_timing(result.metrics) == without_timing(read_metrics(fedit_run))
    assert result.directory == tmp_path / "api"
    assert result.adapter == tmp_path / "api" / "adapter"
    assert (result.adapter / "adapter_config.json").is_file()
    rows = [
        json.loads(line) for line in (tmp_path / "api" / "ledger.jsonl").read_text().splitlines()
    ]
    up = sum(row["bytes"] for row in rows if row["receiver"] == "server")
    down = sum(row["bytes"] for row in rows if row["sender"] == "server")
    assert result.bytes == {
        "total_bytes_up": up,
        "total_bytes_down": down,
        "total_bytes": sum(row["bytes"] for row in rows),
    }
    assert up > 0 and down > 0
    frame = result.frame
    assert list(frame["round"]) == [0, 1, 2]
    assert frame["accuracy"].tolist() == [m["accuracy"] for m in result.metrics]
    assert result.final("accuracy") == result.metrics[-1]["accuracy"]
    assert result.config["train"]["lr"] == config["train"]["lr"]


def test_load_run_reads_a_cli_run_directory(fedit_run: Path) -> None:
    loaded = fedlora.load_run(fedit_run)
    assert loaded.metrics == read_metrics(fedit_run)
    assert loaded.config == tomllib.loads((fedit_run / "config.toml").read_text())
    assert loaded.adapter == fedit_run / "adapter" and loaded.client_adapters == []
    assert loaded.bytes["total_bytes"] == loaded.metrics[-1]["cumulative_bytes"]


def test_load_run_refuses_what_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(fedlora.FedloraError, match="is not a run directory"):
        fedlora.load_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("{not json\n")
    (tmp_path / "config.toml").write_text("")
    with pytest.raises(fedlora.FedloraError, match="a run file is damaged"):
        fedlora.load_run(tmp_path)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["train.lr=fast"], "train.lr: Input should be a valid number"),
        (["method.name=nope"], "method.name"),
        (["experiment.rounds=0"], "experiment.rounds"),
    ],
)
def test_a_bad_config_raises_the_clis_message(
    overrides: list[str], expected: str, tmp_path: Path
) -> None:
    """The API raises ``FedloraError`` (a ``ConfigError``) with exactly the CLI's text."""
    args = [arg for override in overrides for arg in ("--set", override)]
    code, output = run_cli("run", str(TINY / "fedit.toml"), "--out", str(tmp_path), *args)
    assert code == 2
    with pytest.raises(fedlora.FedloraError) as raised:
        fedlora.run(TINY / "fedit.toml", out=tmp_path, overrides=overrides)
    assert isinstance(raised.value, fedlora.ConfigError)
    assert expected in str(raised.value)
    cli_message = " ".join(output.removeprefix("error: ").split())
    assert " ".join(str(raised.value).split()) == cli_message
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before anything ran


def test_a_config_of_the_wrong_type_is_refused(tmp_path: Path) -> None:
    with pytest.raises(fedlora.ConfigError, match="not int"):
        fedlora.run(3, out=tmp_path)  # type: ignore[arg-type]
    config = fedlora.Config()
    with pytest.raises(fedlora.ConfigError, match="--engine must be"):
        fedlora.run(config, out=tmp_path, engine="cluster")


def test_the_example_script_runs(tmp_path: Path) -> None:
    """examples/python_api.py, as the docs show it, in a fresh interpreter."""
    done = subprocess.run(
        [sys.executable, str(REPO / "examples" / "python_api.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "lr 0.005: final accuracy" in done.stdout and "lr 0.02: final accuracy" in done.stdout
    assert "refused: train.lr: Input should be a valid number" in done.stdout
    for lr in ("0.005", "0.02"):
        assert len(read_metrics(tmp_path / f"lr{lr}")) == 3
