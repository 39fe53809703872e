"""Where DP's randomness comes from (``privacy.noise_source``) and the δ rules.

The replay test plays the server of the issue: it holds config.toml (so the run seed), the
client's download and its reply, and regenerates the noise stream the seed derives. Under
``seeded`` that stream is exactly the noise in the reply, so the clipped gradient sum can be
recovered; under ``secure`` it is unrelated to it.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from fedlora.config import ConfigError, load_config
from fedlora.experiment import build
from fedlora.privacy.noise import gaussian_noise, generator, resolve_source
from fedlora.privacy.plan import default_delta, plan_privacy
from fedlora.training import derived_seed
from tests.conftest import TINY, run_cli

Z, CLIP = 10.0, 0.01
ONE_STEP = [
    "privacy.mechanism=dp_sgd",
    f"privacy.noise_multiplier={Z}",
    f"privacy.clip_norm={CLIP}",
    "privacy.sampling=fixed",  # the whole client every step: the sample is not what differs
    "train.optimizer=sgd",
    "train.momentum=0",
    "train.lr=0.5",
    "train.batch_size=256",
    "train.local_steps=1",
]
CLIENT = 1


def client_turn(source: str):
    """The experiment and a function that trains client 1 in round 0 from its download and
    returns its reply (the trainable tensors), at the noise multiplier given."""
    experiment = build(
        load_config(TINY / "fedit.toml", [*ONE_STEP, f"privacy.noise_source={source}"])
    )
    for module in experiment.slots.model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    method, trainer = experiment.method, experiment.trainer
    start = method.client_start(CLIENT, method.server_message(CLIENT, 0), {})
    rows = experiment.clients[CLIENT]

    def reply(z: float) -> dict[str, torch.Tensor]:
        trainer.dp = replace(trainer.dp, noise_multiplier=z)
        state = trainer.train(start, rows, 0, CLIENT, method.trainable).state
        return {k: v.clone() for k, v in state.items()}

    return experiment, reply


def replayed_noise(experiment) -> torch.Tensor:
    """The server's replay: the stream derived from (run seed, round 0, client, 3), drawn for
    the trainable tensors in the model's order (both public)."""
    params = [p for _, p in experiment.slots.parameters(experiment.method.trainable)]
    seed = derived_seed(experiment.config.experiment.seed, 0, CLIENT, 3)
    return torch.cat([n.ravel() for n in gaussian_noise(params, Z * CLIP, generator(seed))])


def noise_in_reply(experiment, noised: dict, clean: dict) -> torch.Tensor:
    """What the noise moved: the noised reply minus the reply without noise, in the same
    order as the replayed draws."""
    names = [name for name, _ in experiment.slots.parameters(experiment.method.trainable)]
    return torch.cat([(noised[n] - clean[n]).ravel() for n in names])


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


def test_seeded_noise_is_replayed_from_the_config_and_secure_noise_is_not() -> None:
    seeded, reply = client_turn("seeded")
    noised, clean = reply(Z), reply(0.0)
    assert torch.equal(
        torch.cat([v.ravel() for v in reply(Z).values()]),
        torch.cat([v.ravel() for v in noised.values()]),
    )  # bit-identical again
    moved = noise_in_reply(seeded, noised, clean)
    replay = replayed_noise(seeded)
    # The reply's noise is the replayed stream times −lr/L, so the server strips it exactly.
    scale = float((moved @ replay) / (replay @ replay))
    assert scale < 0 and correlation(moved, replay) < -0.999999
    residual = moved - scale * replay
    assert float(residual.abs().max()) < 1e-4 * float(moved.abs().max())

    secure, reply = client_turn("secure")
    first, second, clean = reply(Z), reply(Z), reply(0.0)
    moved = noise_in_reply(secure, first, clean)
    assert not torch.equal(moved, noise_in_reply(secure, second, clean))  # fresh every time
    # Unrelated to the replay: the sample correlation of independent draws has standard
    # deviation 1/√n; 5/√n is crossed by chance once in about two million runs.
    assert abs(correlation(moved, replayed_noise(secure))) < 5 / moved.numel() ** 0.5
    # The noise is still there at its size: std z·C·lr/L per coordinate (L: the client's
    # examples, all in its one batch). A sample std of n normal draws has relative standard
    # error 1/√(2n); 5 of them is crossed by chance about once in 3.5 million runs.
    expected = Z * CLIP * 0.5 / len(secure.clients[CLIENT])
    assert abs(scale) == pytest.approx(0.5 / len(seeded.clients[CLIENT]), rel=1e-4)
    assert abs(float(moved.std()) / expected - 1) < 5 / (2 * moved.numel()) ** 0.5


def test_auto_is_secure_when_parties_are_separate_processes() -> None:
    assert resolve_source("auto", deployed=True) == "secure"
    assert resolve_source("auto", deployed=False) == "seeded"
    assert resolve_source("seeded", deployed=True) == "seeded"
    config = load_config(TINY / "fedit.toml", ONE_STEP)
    assert plan_privacy(config, [50, 60], deployed=True).noise_source == "secure"
    assert plan_privacy(config, [50, 60]).noise_source == "seeded"


def test_delta_defaults_below_one_over_n_and_a_large_delta_is_refused() -> None:
    config = load_config(TINY / "fedit.toml", ONE_STEP)
    # DP-SGD: n is the smallest client's examples (each client's ε covers its own data).
    plan = plan_privacy(config, [50, 3000])
    assert plan.delta == default_delta(50) == 1e-5  # min(1e-5, 1/500)
    assert plan_privacy(config, [10**7, 10**7]).delta == pytest.approx(1e-8)  # 1/(10·n)
    central = load_config(
        TINY / "fedit.toml", ["privacy.mechanism=central", "privacy.noise_multiplier=1.0"]
    )
    assert plan_privacy(central, [50] * 4).delta == 1e-5  # n = 4 clients: min(1e-5, 1/40)
    large = load_config(
        TINY / "fedit.toml",
        ["privacy.mechanism=central", "privacy.noise_multiplier=1.0", "privacy.delta=0.25"],
    )
    with pytest.raises(ConfigError, match=r"privacy.delta = 0.25 is at least 1/n = 0.25"):
        plan_privacy(large, [50] * 4)
    allowed = load_config(
        TINY / "fedit.toml",
        [
            "privacy.mechanism=central",
            "privacy.noise_multiplier=1.0",
            "privacy.delta=0.25",
            "privacy.allow_large_delta=true",
        ],
    )
    assert plan_privacy(allowed, [50] * 4).large_delta


def test_a_run_states_its_noise_source_and_a_large_delta(tmp_path) -> None:
    sets = [
        "federation.weighting=uniform",
        "privacy.mechanism=central",
        "privacy.noise_multiplier=1.0",
        "privacy.delta=0.3",
        "privacy.allow_large_delta=true",
        "experiment.rounds=1",
    ]
    args = [arg for s in sets for arg in ("--set", s)]
    code, output = run_cli("run", str(TINY / "fedit.toml"), "--out", str(tmp_path), *args)
    assert code == 0, output
    assert "δ ≥ 1/n" in " ".join(output.split())  # beside ε in the final table
    summary = (tmp_path / "summary.md").read_text()
    assert "Noise and samples: **seeded**" in summary and "not against the server" in summary
    assert "**δ ≥ 1/n**, accepted by privacy.allow_large_delta" in summary
    code, output = run_cli(
        "run",
        str(TINY / "fedit.toml"),
        "--out",
        str(tmp_path / "refused"),
        *args[:-4],
        "--set",
        "experiment.rounds=1",
    )
    assert code == 2 and "privacy.allow_large_delta = true" in " ".join(output.split())


@pytest.mark.parametrize("share", [False, True])
def test_under_dp_clients_keep_their_loss_and_counts_unless_asked(share: bool, tmp_path) -> None:
    """What ε does not cover stays on the client by default: no round record has train_loss
    or examples; ``privacy.client_stats = true`` reports them (the round's mean and sum)."""
    sets = [*ONE_STEP, "experiment.rounds=2", f"privacy.client_stats={str(share).lower()}"]
    args = [arg for s in sets for arg in ("--set", s)]
    code, output = run_cli("run", str(TINY / "fedit.toml"), "--out", str(tmp_path), *args)
    assert code == 0, output
    rounds = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in rounds if m["round"] > 0]
    assert all(("train_loss" in m) == share and ("examples" in m) == share for m in trained)
    assert all(m["steps"] > 0 and "epsilon" in m for m in trained)  # steps: from the config
    if share:
        assert all(math.isfinite(m["train_loss"]) and m["examples"] > 0 for m in trained)
