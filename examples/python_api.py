"""fedlora from Python: run an experiment, read its metrics, compare two settings.

    .venv/bin/python examples/python_api.py [OUT_DIR]

Runs the tiny FedIT config (a random tiny BERT, seconds on a laptop CPU) at two learning
rates, prints each run's metrics as a pandas DataFrame, and reads a finished run back with
``fedlora.load_run``. A mistake in a config raises ``fedlora.FedloraError`` with the message the
CLI would print.
"""

from __future__ import annotations

import sys
from pathlib import Path

import fedlora

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny" / "fedit.toml"


def main(out: Path) -> None:
    finals = {}
    for lr in (5e-3, 2e-2):
        result = fedlora.run(
            CONFIG, out=out / f"lr{lr:g}", overrides=[f"train.lr={lr}"], progress=False
        )
        print(result.frame[["round", "train_loss", "accuracy", "cumulative_bytes"]])
        finals[lr] = result.final("accuracy")
    for lr, accuracy in finals.items():
        print(f"lr {lr:g}: final accuracy {accuracy:.4f}")

    again = fedlora.load_run(out / "lr0.005")  # a finished run, read back from its directory
    print(f"{again.directory}: {again.bytes['total_bytes']:,} bytes, adapter in {again.adapter}")

    try:
        fedlora.run({"train": {"lr": "fast"}}, out=out / "bad")
    except fedlora.FedloraError as error:
        print(f"refused: {error}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("runs") / "python-api")
