"""Streaming aggregation (issue 16): the running weighted mean against numpy, and a tiny run
whose streamed server step equals the same run through a path that keeps every reply."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from fedlora.config import load_config
from fedlora.engines.loop import RunLoop
from fedlora.engines.placements import local_loop
from fedlora.experiment import build
from fedlora.streaming import RunningMean
from tests.conftest import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_running_mean_is_the_weighted_mean_in_any_order() -> None:
    rng = np.random.default_rng(7)
    states = [
        {
            "a": rng.normal(size=(3, 5)).astype(np.float32),
            "b": rng.normal(size=4).astype(np.float32),
        }
        for _ in range(6)
    ]
    weights = rng.integers(1, 50, size=6).astype(float)
    expected = {
        k: sum(w * s[k].astype(np.float64) for w, s in zip(weights, states, strict=True))
        / weights.sum()
        for k in ("a", "b")
    }
    for order in (range(6), [5, 2, 0, 4, 1, 3]):
        running = RunningMean()
        for i in order:
            running.add({k: torch.from_numpy(v) for k, v in states[i].items()}, weights[i])
        mean = running.mean()
        assert {k: v.dtype for k, v in mean.items()} == {"a": torch.float32, "b": torch.float32}
        for key, value in expected.items():
            np.testing.assert_allclose(mean[key].numpy(), value, rtol=0, atol=1e-6)


def test_the_running_mean_refuses_what_cannot_be_averaged() -> None:
    running = RunningMean()
    with pytest.raises(ValueError, match="nothing to average"):
        running.mean()
    running.add({"a": torch.ones(2)}, 1.0)
    with pytest.raises(ValueError, match="same tensors"):
        running.add({"b": torch.ones(2)}, 1.0)
    with pytest.raises(ValueError, match="positive"):
        running.add({"a": torch.ones(2)}, 0.0)


def engine(overrides: list[str], out: Path) -> RunLoop:
    experiment = build(load_config(TINY / "fedit.toml", ["experiment.rounds=2", *overrides]))
    out.mkdir(parents=True)
    return local_loop(experiment, out, Console(quiet=True), pooled=False)


def test_a_streamed_round_equals_the_round_that_keeps_every_reply(tmp_path: Path) -> None:
    """Uniform weights and a dropout (client 0 and 3 absent in round 1 at seed 0): the
    streamed mean (``aggregator = mean``) against the trimmed mean with nothing trimmed, which
    sorts and averages every kept reply per coordinate in float32, a different computation of
    the same unweighted mean."""
    common = ["federation.weighting=uniform", "federation.dropout=0.3"]
    streamed = engine(common, tmp_path / "streamed")
    kept = engine(
        [*common, "federation.aggregator=trimmed_mean", "federation.trim_fraction=0"],
        tmp_path / "kept",
    )
    assert streamed.round.streams() and not kept.round.streams()
    first = streamed.run(show_progress=False).metrics
    second = kept.run(show_progress=False).metrics
    assert [m["round"] for m in first] == [m["round"] for m in second] == [0, 1, 2]
    for records in (first, second):  # only a round that lost replies records them
        assert records[1]["aggregated"] == [1, 2] and "aggregated" not in records[2]
    a, b = streamed.exp.method.global_state(), kept.exp.method.global_state()
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    moved = max(float((a[k] - streamed.exp.method.context.initial[k]).abs().max()) for k in a)
    assert moved > 1e-3  # the rounds did change the model
