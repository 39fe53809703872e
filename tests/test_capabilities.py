"""What each placement runs (``fedlora.engines.capabilities``), as a user meets it: every
combination of placement, topology and secure aggregation is either one clear config error
(exit 2, naming a placement that runs it, no traceback) before anything is built, or a run that
finishes. The runs that finish are cheap here (one round, in one process or on the pool);
torch.distributed's and Flower's are the subject of ``test_distributed`` and ``test_flower``."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlora.config import load_config
from fedlora.engines.capabilities import PLACEMENTS, placement_refusal
from tests.conftest import TINY, run_cli

SECURE = ("--set", "privacy.secure_aggregation=true")
CASES = [
    ("fedit.toml", ()),  # server rounds
    ("fedit.toml", SECURE),
    ("declora.toml", ()),  # gossip
    ("dlora.toml", ()),  # the cloud-edge split
]
ONE_ROUND = ("--set", "experiment.rounds=1")


def command(placement: str, config: str, overrides: tuple[str, ...], out: Path) -> list[str]:
    path = str(TINY / config)
    if placement == "flower":
        return ["flower-app", path, "--out", str(out / "app"), *overrides]
    where = {
        "in-process": (),
        "pool": ("--set", "compute.workers=2"),
        "distributed": ("--engine", "distributed", "--nproc", "2"),
    }[placement]
    return ["run", path, "--out", str(out / "run"), "--quiet", *ONE_ROUND, *overrides, *where]


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
@pytest.mark.parametrize(("config", "overrides"), CASES)
def test_every_combination_is_a_clear_refusal_or_a_run(
    tmp_path: Path, placement: str, config: str, overrides: tuple[str, ...]
) -> None:
    settings = [overrides[i + 1] for i in range(0, len(overrides), 2)]
    refusal = placement_refusal(load_config(TINY / config, settings), placement)
    if refusal is None and placement == "distributed":
        pytest.skip("runs on torch.distributed are test_distributed's")
    code, output = run_cli(*command(placement, config, overrides, tmp_path))
    assert "Traceback" not in output
    if refusal is None:
        assert code == 0, output
        return
    assert code == 2, output
    flat = " ".join(output.split())
    assert "runs with" in flat and any(p.how in flat for p in PLACEMENTS.values()), flat
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before anything ran
