"""Experiment trackers, each read back with its own reader: TensorBoard's event accumulator,
MLflow's client on the local store, and W&B's transaction-log inspector (``wandb leet``) on an
offline run. One tiny run logs to all three."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ONE, TINY, read_metrics, run_cli

TRACKERS = ("log.tensorboard=true", "log.mlflow=true", "log.wandb=true")
SETS = [arg for flag in TRACKERS for arg in ("--set", flag)]


@pytest.fixture(scope="module")
def tracked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    saved = {
        key: os.environ.get(key) for key in ("WANDB_MODE", "WANDB_SILENT", "MLFLOW_TRACKING_URI")
    }
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    out = tmp_path_factory.mktemp("tracked") / "run"
    code, output = run_cli(
        "run", str(TINY / "fedit.toml"), "--out", str(out), "--quiet", *ONE, *SETS
    )
    assert code == 0, output
    yield out
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def curve(run: Path, key: str) -> list[tuple[int, float]]:
    return [(m["round"], m[key]) for m in read_metrics(run) if key in m]


def ledger_total(run: Path) -> int:
    rows = (run / "ledger.jsonl").read_text().splitlines()
    return sum(json.loads(row)["bytes"] for row in rows)


def test_tensorboard_event_files(tracked: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    for key in ("accuracy", "train_loss", "cumulative_bytes"):
        expected = curve(tracked, key)
        logged = events.Scalars(key)
        assert [e.step for e in logged] == [step for step, _ in expected]
        values = [value for _, value in expected]
        assert [e.value for e in logged] == pytest.approx(values, rel=1e-6)  # float32
    assert [e.value for e in events.Scalars("total_bytes")] == [ledger_total(tracked)]
    assert "figures/accuracy" in events.Tags()["images"]
    assert "config/text_summary" in events.Tags()["tensors"]


def mlflow_run(tracked: Path):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tracked.parent / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fedlora")
    runs = client.search_runs([experiment.experiment_id])
    return client, runs


def test_mlflow_local_store(tracked: Path) -> None:
    client, runs = mlflow_run(tracked)
    assert [run.info.run_name for run in runs] == ["run"]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.005" and run.data.params["method.name"] == "fedit"
    for key in ("accuracy", "train_loss"):
        history = client.get_metric_history(run.info.run_id, key)
        logged = sorted((m.step, m.value) for m in history)
        assert logged == curve(tracked, key)
    assert run.data.metrics["total_bytes"] == ledger_total(tracked)
    adapter = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter_model.safetensors" in adapter
    figures = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "figures")}
    assert "accuracy.png" in figures


def wandb_records(run_dir: Path) -> list[dict]:
    """W&B's own reader of its transaction log, one JSON record per line."""
    wandb = Path(sys.executable).parent / "wandb"
    done = subprocess.run(
        [str(wandb), "leet", "inspect", str(run_dir), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_wandb_offline_run(tracked: Path) -> None:
    (offline,) = (tracked / "wandb").glob("offline-run-*")
    records = wandb_records(offline)
    history = [r["history"] for r in records if r["type"] == "history"]
    for key in ("accuracy", "train_loss"):
        logged = [(h["step"].get("num", 0), h["item"][key]) for h in history if key in h["item"]]
        assert logged == curve(tracked, key)  # JSON numbers, as logged
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert run["config"]["update"]["train.lr"] == 0.005 and run["project"] == "fedlora"
    artifacts = {r["artifact"]["name"] for r in records if r["type"] == "artifact"}
    assert artifacts == {"run-adapter", "run-figures"}
    summary = {}
    for record in records:
        if record["type"] == "summary":
            summary.update(record["summary"].get("update", {}))
    assert summary["total_bytes"] == ledger_total(tracked)
    assert [r["exit"].get("exit_code", 0) for r in records if r["type"] == "exit"] == [0]


def test_resume_continues_the_same_tracker_runs(tracked: Path) -> None:
    ids = json.loads((tracked / "trackers.json").read_text())
    args = ("run", str(TINY / "fedit.toml"), "--out", str(tracked), "--quiet", *ONE, *SETS)
    code, output = run_cli(*args, "--resume")
    assert code == 0, output
    assert json.loads((tracked / "trackers.json").read_text()) == ids
    _, runs = mlflow_run(tracked)
    assert [run.info.run_id for run in runs] == [ids["mlflow"]]  # no second MLflow run
    assert runs[0].info.status == "FINISHED"
    resumed = sorted((tracked / "wandb").glob("offline-run-*"))
    assert len(resumed) == 2 and all(path.name.endswith(ids["wandb"]) for path in resumed)


def test_wandb_without_a_login_is_one_line_before_the_model_loads(tmp_path: Path) -> None:
    """Online mode with no API key (a fresh HOME, so no netrc), in a fresh process (W&B keeps
    process-wide settings): a config error naming both ways out, and nothing trained."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env |= {"HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config")}
    out = tmp_path / "run"
    command = [sys.executable, "-m", "fedlora", "run", str(TINY / "fedit.toml"), "--out", str(out)]
    done = subprocess.run(
        [*command, "--quiet", "--set", "log.wandb=true"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    said = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 2, said
    assert "log.wandb: W&B could not start a run (No API key configured" in said
    assert "set WANDB_MODE=offline" in said and "Traceback" not in said
    assert not (out / "metrics.jsonl").exists()
