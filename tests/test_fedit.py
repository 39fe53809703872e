"""FedIT on real adapters: the aggregation identity of algorithms.md §7 T1."""

from __future__ import annotations

import torch

from fedlora.config import load_config
from fedlora.experiment import build
from fedlora.lora import weighted_average
from tests.conftest import TINY


def train_two_clients():
    experiment = build(load_config(TINY / "fedit.toml"))
    method = experiment.method
    replies = {}
    for client in (0, 1):
        start = method.client_start(client, method.server_message(client, 0), {})
        result = experiment.trainer.train(
            start, experiment.clients[client], 0, client, method.trainable
        )
        replies[client] = method.client_reply(client, result.state, start, {})
    sizes = {c: len(experiment.clients[c]) for c in replies}
    weights = {c: sizes[c] / sum(sizes.values()) for c in replies}
    return experiment, replies, weights


def test_fedit_aggregates_a_and_b_separately_and_its_noise_is_the_factor_covariance() -> None:
    experiment, replies, weights = train_two_clients()
    experiment.method.aggregate(0, replies, weights)
    merged = experiment.method.global_state()
    assert merged is not None
    expected = weighted_average([replies[0], replies[1]], [weights[0], weights[1]])
    for key in merged:
        torch.testing.assert_close(merged[key], expected[key], rtol=0, atol=0)

    p = [weights[0], weights[1]]
    largest_noise = 0.0
    for module in experiment.slots.modules:
        b = [replies[c][module.b].double() for c in (0, 1)]
        a = [replies[c][module.a].double() for c in (0, 1)]
        b_bar = sum(w * bi for w, bi in zip(p, b, strict=True))
        a_bar = sum(w * ai for w, ai in zip(p, a, strict=True))
        torch.testing.assert_close(merged[module.b].double(), b_bar, rtol=1e-6, atol=1e-7)
        ideal = sum(w * bi @ ai for w, bi, ai in zip(p, b, a, strict=True))
        noise = ideal - b_bar @ a_bar
        covariance = sum(w * (bi - b_bar) @ (ai - a_bar) for w, bi, ai in zip(p, b, a, strict=True))
        torch.testing.assert_close(noise, covariance, rtol=0, atol=1e-12)
        largest_noise = max(largest_noise, float(noise.norm()))
    # After real local training from a common init the factors differ, so FedIT is inexact.
    assert largest_noise > 1e-8


def test_clients_start_from_one_common_a_and_zero_b() -> None:
    experiment = build(load_config(TINY / "fedit.toml"))
    initial = experiment.method.context.initial
    for module in experiment.slots.modules:
        assert torch.count_nonzero(initial[module.b]) == 0
        assert initial[module.a].abs().sum() > 0
    again = build(load_config(TINY / "fedit.toml"))
    for key, value in initial.items():
        assert torch.equal(value, again.method.context.initial[key])
