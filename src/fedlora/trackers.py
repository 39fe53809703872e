"""Experiment trackers: TensorBoard, MLflow and Weights & Biases, each optional and off by default.

``[log]`` turns each on (``--set log.tensorboard=true``). A tracker gets what the run directory
holds, as the run makes it: every round's metrics as it ends (step = round, round 0 being the
initial model), the resolved config as parameters at the start, and at the end the bytes-on-
the-wire totals, the adapter(s) and the figures. The run directory stays the record; a tracker
is a view of it in the tool a team already uses.

- TensorBoard: event files in ``<run>/tensorboard`` (scalars per round, the config as text, the
  totals as scalars at the last round, the figures as images; TensorBoard stores no files).
- MLflow: a run in the experiment ``log.project``, in ``MLFLOW_TRACKING_URI`` when set, else in
  a local store beside the run directory: ``<run>/../mlflow.db`` with artifacts in
  ``<run>/../mlartifacts``, so runs made under one folder are compared in one MLflow UI
  (``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db``). MLflow 3 refuses its old
  filesystem store unless told otherwise and recommends SQLite, hence the ``.db``.
- W&B: a run in the project ``log.project`` whose files go to ``<run>/wandb``; W&B's own
  settings apply, so ``WANDB_MODE=offline`` logs without an account (``wandb sync`` uploads
  it later).

A resumed run (``--resume``) continues the same MLflow and W&B runs: their ids are kept in
``<run>/trackers.json``. Nothing here changes what is trained or written to the run directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from fedlora.config import Config, ConfigError

IDS_FILE = "trackers.json"


class Tracker(Protocol):
    def log_round(self, record: Mapping[str, Any]) -> None: ...

    def finish(self, totals: Mapping[str, int], run_dir: Path, failed: bool) -> None: ...


def flat_config(config: Config) -> dict[str, Any]:
    """``section.key`` -> value of the resolved config (lists and tables as JSON text)."""
    flat: dict[str, Any] = {}
    for section, values in config.model_dump(exclude_none=True).items():
        for key, value in values.items():
            plain = isinstance(value, str | int | float | bool)
            flat[f"{section}.{key}"] = value if plain else json.dumps(value)
    return flat


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """A round record's numbers (not ``round`` itself, not flags)."""
    return {
        key: float(value)
        for key, value in record.items()
        if key != "round" and isinstance(value, int | float) and not isinstance(value, bool)
    }


def figures(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("*.png"))


def adapter_dirs(run_dir: Path) -> dict[str, Path]:
    """The exported adapters: ``adapter`` (the global one) and ``adapters/client_<i>``."""
    found = {}
    if (run_dir / "adapter").is_dir():
        found["adapter"] = run_dir / "adapter"
    if (run_dir / "adapters").is_dir():
        found["adapters"] = run_dir / "adapters"
    return found


class TensorBoardTracker:
    def __init__(self, config: Config, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in flat_config(config).items())
        self.writer.add_text("config", f"| key | value |\n|---|---|\n{rows}")
        self.last_round = 0

    def log_round(self, record: Mapping[str, Any]) -> None:
        self.last_round = int(record["round"])
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, self.last_round)
        self.writer.flush()

    def finish(self, totals: Mapping[str, int], run_dir: Path, failed: bool) -> None:
        from matplotlib.image import imread

        for key, value in totals.items():
            self.writer.add_scalar(key, value, self.last_round)
        for figure in figures(run_dir):
            pixels = imread(figure)[..., :3]  # RGBA -> RGB, floats in [0, 1]
            self.writer.add_image(f"figures/{figure.stem}", pixels, dataformats="HWC")
        self.writer.close()


def mlflow_uri(run_dir: Path) -> tuple[str, str | None]:
    """The tracking URI and, for the local default, where its artifacts go."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], None
    home = run_dir.resolve().parent
    return f"sqlite:///{home / 'mlflow.db'}", (home / "mlartifacts").as_uri()


class MlflowTracker:
    BATCH = 100  # MLflow takes at most 100 params (and 1000 metrics) per log_batch

    def __init__(self, config: Config, run_dir: Path, run_id: str | None) -> None:
        for noisy in ("mlflow", "alembic"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        from mlflow import MlflowClient
        from mlflow.entities import Param

        uri, artifacts = mlflow_uri(run_dir)
        self.client = MlflowClient(tracking_uri=uri)
        if run_id is None:
            project = config.log.project
            experiment = self.client.get_experiment_by_name(project)
            experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else self.client.create_experiment(project, artifact_location=artifacts)
            )
            tags = {"fedlora.run_directory": str(run_dir.resolve())}
            run = self.client.create_run(experiment_id, run_name=run_dir.name, tags=tags)
            run_id = run.info.run_id
            params = [Param(k, str(v)) for k, v in flat_config(config).items()]
            for start in range(0, len(params), self.BATCH):
                self.client.log_batch(run_id, params=params[start : start + self.BATCH])
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        self.last_round = 0

    def log_round(self, record: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        self.last_round = int(record["round"])
        now = int(time.time() * 1000)
        metrics = [
            Metric(key, value, now, self.last_round)
            for key, value in scalars(record).items()
            if math.isfinite(value)
        ]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, totals: Mapping[str, int], run_dir: Path, failed: bool) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, self.last_round) for k, v in totals.items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)
        for name, path in adapter_dirs(run_dir).items():
            self.client.log_artifacts(self.run_id, str(path), name)
        for figure in figures(run_dir):
            self.client.log_artifact(self.run_id, str(figure), "figures")
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def artifact_name(text: str) -> str:
    """W&B artifact names allow letters, digits, '-', '_' and '.'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"


class WandbTracker:
    def __init__(self, config: Config, run_dir: Path, run_id: str | None) -> None:
        import wandb

        try:
            self.run = wandb.init(
                project=config.log.project,
                name=run_dir.name,
                dir=str(run_dir),  # W&B writes into <dir>/wandb
                config=flat_config(config),
                id=run_id,
                resume="allow" if run_id else None,
            )
        except wandb.errors.Error as error:  # no API key, no network, a bad setting
            reason = str(error).strip().rstrip(".")
            raise ConfigError(
                f"log.wandb: W&B could not start a run ({reason}); log in with `wandb login`, or "
                "set WANDB_MODE=offline to keep the run on this machine"
            ) from None
        self.run_id = self.run.id

    def log_round(self, record: Mapping[str, Any]) -> None:
        self.run.log(scalars(record), step=int(record["round"]))

    def finish(self, totals: Mapping[str, int], run_dir: Path, failed: bool) -> None:
        import wandb

        self.run.summary.update(dict(totals))
        stem = artifact_name(run_dir.name)
        for name, path in adapter_dirs(run_dir).items():
            artifact = wandb.Artifact(f"{stem}-{name}", type="model")
            artifact.add_dir(str(path))
            self.run.log_artifact(artifact)
        if shown := figures(run_dir):
            artifact = wandb.Artifact(f"{stem}-figures", type="figures")
            for figure in shown:
                artifact.add_file(str(figure))
            self.run.log_artifact(artifact)
        self.run.finish(exit_code=1 if failed else 0)


class Trackers:
    """The trackers ``[log]`` asks for, fed together; empty when none is."""

    def __init__(self, trackers: dict[str, Tracker], run_dir: Path) -> None:
        self.trackers = trackers
        self.run_dir = run_dir

    def __iter__(self) -> Iterator[Tracker]:
        return iter(self.trackers.values())

    def log_round(self, record: Mapping[str, Any]) -> None:
        for tracker in self:
            tracker.log_round(record)

    def finish(self, totals: Mapping[str, int], failed: bool = False) -> None:
        for tracker in self:
            tracker.finish(totals, self.run_dir, failed)


def open_trackers(config: Config, run_dir: Path, resume: bool) -> Trackers:
    """Start every tracker ``config.log`` turns on (ids kept in ``<run>/trackers.json``, which
    ``--resume`` reads to continue the same MLflow and W&B runs)."""
    log = config.log
    ids_file = run_dir / IDS_FILE
    ids: dict[str, str] = {}
    if resume and ids_file.is_file():
        ids = json.loads(ids_file.read_text())
    trackers: dict[str, Tracker] = {}
    if log.tensorboard:
        trackers["tensorboard"] = TensorBoardTracker(config, run_dir)
    if log.mlflow:
        mlflow = MlflowTracker(config, run_dir, ids.get("mlflow"))
        trackers["mlflow"], ids["mlflow"] = mlflow, mlflow.run_id
    if log.wandb:
        wandb = WandbTracker(config, run_dir, ids.get("wandb"))
        trackers["wandb"], ids["wandb"] = wandb, wandb.run_id
    if ids:
        ids_file.write_text(json.dumps(ids, indent=1) + "\n")
    return Trackers(trackers, run_dir)
