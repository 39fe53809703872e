"""Fault drills (``FEDLORA_DRILL_EXIT``): which party takes which item, and the refusal of
malformed ones; the kills themselves are tests/test_flower.py's and
tests/test_secure_aggregation_processes.py's."""

from __future__ import annotations

import pytest

from fedlora.config import ConfigError
from fedlora.drill import ANSWERING, STEPS, VARIABLE, Drill, Drills, drills_from_env
from fedlora.privacy.secagg import STEPS as PROTOCOL_STEPS
from tests.conftest import TINY, run_cli


def test_each_party_takes_its_own_items(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VARIABLE, "share_keys@1@rank2, masked_input@3@rank3,train@2")
    assert drills_from_env() == [
        Drill("share_keys", 1, 2),
        Drill("masked_input", 3, 3),
        Drill("train", 2, None),
    ]
    assert Drills(2).mine == [Drill("share_keys", 1, 2), Drill("train", 2, None)]
    assert Drills(None).mine == [Drill("train", 2, None)]  # a Flower node: no rank items
    Drills(2).after("share_keys", 1)  # round 2 (from 0: 1) is not the drill's round: no kill
    Drills(2).after("unmasking", 0)


def test_the_drill_steps_are_the_protocols_answers() -> None:
    assert {kind: answer for _, kind, answer in PROTOCOL_STEPS} == ANSWERING
    assert ("train", *ANSWERING.values()) == STEPS


@pytest.mark.parametrize("text", ["share_keys", "share_keys@0", "masked@1", "train@1@2", "x@1"])
def test_malformed_items_are_refused_naming_the_form(
    text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(VARIABLE, text)
    with pytest.raises(ConfigError, match="STEP@ROUND or STEP@ROUND@rankK"):
        drills_from_env()


@pytest.mark.parametrize(
    ("config", "extra", "names"),
    [
        ("declora.toml", [], "not gossip"),
        ("fedsa.toml", [], "evaluate each client's own model"),
        ("fedit.toml", ["--observer"], "not --observer"),
    ],
)
def test_going_on_without_a_lost_rank_is_refused_where_it_cannot(
    config: str, extra: list[str], names: str
) -> None:
    code, output = run_cli(
        "run", str(TINY / config), "--engine", "distributed", "--nproc", "3", *extra,
        "--set", "federation.lost_ranks=continue",
    )  # fmt: skip
    assert code == 2 and "Traceback" not in output, output
    assert "federation.lost_ranks = 'continue'" in output and names in output, output
