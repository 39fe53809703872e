"""configs/tiny/dlora.toml end to end through the real CLI: the usual run files plus the
schedule, heat maps and accounting, consistent with each other and with Kill-and-Revive."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY, run_cli, trained


@pytest.fixture(scope="module")
def dlora_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest, and the cores are shared
    out = tmp_path_factory.mktemp("runs") / "dlora"
    code, output = run_cli("run", str(TINY / "dlora.toml"), "--out", str(out), "--quiet")
    torch.set_num_threads(threads)
    assert code == 0, output
    yield out


def rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_run_directory_has_the_usual_files_and_the_schedule(dlora_run: Path) -> None:
    for name in (
        "config.toml",
        "metrics.jsonl",
        "ledger.jsonl",
        "summary.md",
        "checkpoint.safetensors",
        "schedule.json",
        "schedule_client0.png",
        "schedule_client1.png",
        "steps.csv",
        "traffic.csv",
        "accounting.json",
    ):
        assert (dlora_run / name).is_file(), name
    for user in (0, 1):  # one personal adapter per user, in PEFT format
        adapter = dlora_run / "adapters" / f"client_{user}"
        assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
        assert any(".lora_A." in k for k in load_file(adapter / "adapter_model.safetensors"))
    metrics = [json.loads(line) for line in (dlora_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [0, 1, 2, 3]  # 0: the initial model
    assert all("accuracy" in m for m in metrics)
    assert all(m["steps"] == 12 for m in trained(metrics))  # 2 users x 6 steps
    assert "## DLoRA split execution and Kill-and-Revive" in (dlora_run / "summary.md").read_text()


def test_schedule_follows_kill_and_revive(dlora_run: Path) -> None:
    schedule = json.loads((dlora_run / "schedule.json").read_text())
    assert len(schedule["modules"]) == 6
    for steps in schedule["users"].values():
        counts = [len(active) for active in steps]
        assert len(counts) == 18
        assert counts[:4] == [6] * 4  # all active until the first check (tau = 4)
        assert counts[4:8] == [3] * 4  # budget: ceil(0.34 * 6); nothing to revive yet
        assert set(counts[8:]) == {4}  # budget + 1 revived


def test_accounting_is_consistent(dlora_run: Path) -> None:
    totals = json.loads((dlora_run / "accounting.json").read_text())
    steps = rows(dlora_run / "steps.csv")
    traffic = rows(dlora_run / "traffic.csv")
    assert totals["steps"] == len(steps) == 36
    moved = sum(float(r["values_down"]) + float(r["values_up"]) for r in traffic)
    assert moved == totals["module_traffic_values"]
    measured = sum(float(r["bytes_down"]) + float(r["bytes_up"]) for r in traffic)
    assert measured == totals["module_traffic_bytes_measured"]
    ledger = [json.loads(line) for line in (dlora_run / "ledger.jsonl").read_text().splitlines()]
    assert sum(r["bytes"] for r in ledger) == totals["total_bytes_measured"]
    assert (
        sum(float(r["bytes_up"]) + float(r["bytes_down"]) for r in steps)
        == totals["total_bytes_measured"]
    )
    # mean active 4.22 of 6 modules: traffic and LoRA FLOPs both fall by 1 - 4.22/6
    expected = 1 - totals["mean_active_modules"] / totals["modules"]
    assert totals["module_traffic_reduction"] == pytest.approx(expected)
    assert totals["module_flops_reduction"] == pytest.approx(expected)
    assert 0 < totals["device_flops_reduction"] < totals["module_flops_reduction"]


def test_users_train_their_own_adapters(dlora_run: Path) -> None:
    adapters = [
        load_file(dlora_run / "adapters" / f"client_{u}" / "adapter_model.safetensors")
        for u in (0, 1)
    ]
    assert adapters[0].keys() == adapters[1].keys()
    assert any(not torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


def test_resume_after_an_interrupted_round_gives_the_same_run(
    dlora_run: Path, tmp_path: Path
) -> None:
    """Stop after round 1 (an exception in round 2), resume from the checkpoint: adapters,
    Kill-and-Revive schedule and accounting equal the uninterrupted run's."""
    from fedlora import experiment as experiments
    from fedlora import rundir
    from fedlora.config import load_config
    from fedlora.engines.placements import local_loop

    config = load_config(TINY / "dlora.toml")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rundir.prepare(tmp_path, config, resume=False)
        engine = local_loop(experiments.build(config), tmp_path)
        first_round = engine.run_round

        def stop_in_round_two(round_index: int, progress: object) -> dict:
            if round_index == 1:
                raise KeyboardInterrupt
            return first_round(round_index, progress)  # type: ignore[arg-type]

        engine.run_round = stop_in_round_two  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            engine.run(show_progress=False)
        resumed = local_loop(experiments.build(config), tmp_path)
        assert resumed.resume() == 1
        result = resumed.run(1, show_progress=False)
    finally:
        torch.set_num_threads(threads)
    for user in (0, 1):
        whole = load_file(dlora_run / "adapters" / f"client_{user}" / "adapter_model.safetensors")
        state = resumed.exp.method.client_model(user, result.stores[user])
        assert state is not None
        for key, tensor in whole.items():
            assert torch.equal(state[key], tensor), key
    for name in ("schedule.json", "accounting.json", "traffic.csv", "steps.csv"):
        assert (tmp_path / name).read_text() == (dlora_run / name).read_text(), name
