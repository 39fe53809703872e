"""Secure aggregation (issue 13, item 4): Shamir sharing, the fixed-point code, the masking
protocol over a real channel (what the server sees, dropouts, too few clients), the server step
of every method that needs only the mean, a tiny FedIT run against the plain one, and the
config-time refusals through the CLI."""

from __future__ import annotations

import copy
import itertools
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import sympy
import torch
from rich.console import Console
from rich.progress import Progress
from scipy import stats

from fedlora.channel import Channel, MessageError, Schema
from fedlora.config import config_from_dict, load_config
from fedlora.engines.client import ClientRuntime
from fedlora.engines.loop import RunLoop
from fedlora.engines.masking import Answers, Carrier, LocalCarrier
from fedlora.engines.placements import local_loop
from fedlora.engines.server_round import LocalHosts, ServerRound
from fedlora.experiment import build
from fedlora.methods import build_method, registry
from fedlora.methods.base import MethodContext
from fedlora.privacy import fixed_point, shamir
from fedlora.privacy.secagg import (
    ChannelWire,
    Client,
    SecureAggregationError,
    Server,
    point,
    secure_sum,
)
from fedlora.tensors import LoraModule, TensorDict
from tests.conftest import ADAPTIVE_CENTRAL, TINY, run_cli

MODULUS = 2**32


pytestmark = pytest.mark.usefixtures("one_thread")


def channel_wire(channel: Channel | None = None) -> ChannelWire:
    return ChannelWire(channel or Channel(), 0, lambda c: f"client{c}", "server")


def random_words(rng: np.random.Generator, length: int) -> np.ndarray:
    return rng.integers(0, MODULUS, length, dtype=np.uint64).astype(np.uint32)


def sum_mod(vectors: list[np.ndarray]) -> np.ndarray:
    """Σ mod 2^32 in Python integers (no numpy wrap-around involved)."""
    return np.array([sum(int(v[i]) for v in vectors) % MODULUS for i in range(len(vectors[0]))])


# -- Shamir -------------------------------------------------------------------------------------
def vandermonde_solve(points: dict[int, int]) -> list[int]:
    """The coefficients of the polynomial through ``points`` over GF(p), by inverting the
    Vandermonde matrix with sympy (independent of ``shamir``'s Lagrange interpolation)."""
    xs = sorted(points)
    matrix = sympy.Matrix([[pow(x, k, shamir.PRIME) for k in range(len(xs))] for x in xs])
    solution = matrix.inv_mod(shamir.PRIME) * sympy.Matrix([points[x] for x in xs])
    return [int(c) % shamir.PRIME for c in solution]


def test_any_t_shares_rebuild_the_secret_and_t_minus_1_are_consistent_with_any_secret() -> None:
    n, t = 6, 4
    secret = secrets.randbits(256)
    points = [point(c) for c in range(n)]
    shares = shamir.split(secret, points, t)
    for subset in itertools.combinations(points, t):
        chosen = {x: shares[x] for x in subset}
        assert shamir.reconstruct(chosen) == secret
        assert vandermonde_solve(chosen)[0] == secret
    for subset in itertools.combinations(points, t - 1):
        assert shamir.reconstruct({x: shares[x] for x in subset}) != secret
    # The t − 1 shares {1, 2, 3} are also a valid sharing of any other secret: the polynomial
    # through (0, other) and them extends to the remaining points, and every t of the new set
    # rebuild ``other``.
    other = secrets.randbits(256)
    seen = {x: shares[x] for x in points[: t - 1]}
    coefficients = vandermonde_solve({0: other, **seen})
    forged = {x: shamir.evaluate(coefficients, x) for x in points}
    assert all(forged[x] == shares[x] for x in seen)
    for subset in itertools.combinations(points, t):
        assert shamir.reconstruct({x: forged[x] for x in subset}) == other


def share_round(n: int, t: int) -> dict[int, Client]:
    """Rounds 0 and 1 of the protocol between real clients and a real server."""
    server, clients = Server(t, 1), {u: Client(u, t) for u in range(n)}
    for u, client in clients.items():
        server.accept_keys(u, client.advertise())
    roster = server.roster_message()
    for u, client in clients.items():
        server.accept_shares(u, client.share_keys(roster))
    for v, message in server.shares_messages().items():
        clients[v].receive_shares(message)
    return clients


def test_t_minus_1_clients_shares_do_not_rebuild_a_seed_or_a_mask_key() -> None:
    n, t = 5, 3
    clients = share_round(n, t)
    target = clients[0]
    seed = int.from_bytes(target.seed, "big")
    mask_key = int.from_bytes(target.mask_key.private_bytes_raw(), "big")
    for size, expected in ((t - 1, False), (t, True)):
        for holders in itertools.combinations(range(n), size):
            seed_shares = {point(v): clients[v].held[0][1] for v in holders}
            key_shares = {point(v): clients[v].held[0][0] for v in holders}
            assert (shamir.reconstruct(seed_shares) == seed) is expected
            assert (shamir.reconstruct(key_shares) == mask_key) is expected


def test_bad_protocol_bytes_are_refused_with_a_message_error() -> None:
    """Content the channel's schema check cannot see (ids, keys, ciphertexts, flags, field
    elements) is checked by the receiving party: a ``MessageError`` names it."""
    n, t = 4, 3
    server, clients = Server(t, 8), {u: Client(u, t) for u in range(n)}
    for u, client in clients.items():
        server.accept_keys(u, client.advertise())
    roster = server.roster_message()
    twice = {**roster, "clients": torch.cat([roster["clients"][:1], roster["clients"][:-1]])}
    with pytest.raises(MessageError, match="distinct clients"):
        Client(0, t).share_keys(twice)
    with pytest.raises(MessageError, match="own public keys"):
        Client(0, t).share_keys(roster)  # a stranger's roster: not this client's keys
    for u, client in clients.items():
        server.accept_shares(u, client.share_keys(roster))
    routed = server.shares_messages()
    flipped = routed[0]["ciphertexts"].clone()
    flipped[1, 20] ^= 1
    with pytest.raises(MessageError, match="the shares of client 2 do not open"):
        clients[0].receive_shares({**routed[0], "ciphertexts": flipped})
    with pytest.raises(MessageError, match="only 0 and 1"):
        clients[0].receive_shares({**routed[0], "members": torch.full((n,), 2, dtype=torch.uint8)})
    for v, message in routed.items():
        clients[v].receive_shares(message)
        server.accept_masked(v, clients[v].masked_input(np.zeros(8, dtype=np.uint32)))
    answer = clients[0].unmask(server.survivors_message())
    with pytest.raises(MessageError, match="below 2\\^521 - 1"):
        server.accept_unmasking(0, {"seed_shares": torch.full_like(answer["seed_shares"], 255)})


# -- the fixed-point code and the sum -----------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 16, 24])
def test_the_unmasked_sum_is_the_weighted_sum_within_the_fixed_point_error(bits: int) -> None:
    rng = np.random.default_rng(bits)
    n, length = 5, 3000
    sizes = rng.integers(5, 50, n)
    weights = sizes / sizes.sum()
    scales = [1e-4, 1.0, 0.99 * fixed_point.value_limit(bits, n)]  # up to the range's edge
    replies = [rng.uniform(-1, 1, length) * rng.choice(scales, length) for _ in range(n)]
    inputs = {u: fixed_point.encode(replies[u], weights[u], bits, n) for u in range(n)}
    outcome = secure_sum(channel_wire(), range(n), inputs, 3, length)
    decoded = fixed_point.decode(outcome.total, bits)
    exact = sum(weights[u] * replies[u] for u in range(n))  # numpy float64
    error = np.abs(decoded - exact).max()
    assert error <= fixed_point.quantization_error(bits, n) == n * 2.0 ** (-bits - 1)
    assert error > 0  # the code is lossy: the bound is what holds, not exactness


def test_values_that_could_wrap_are_refused_and_the_largest_allowed_do_not_wrap() -> None:
    bits, n = 16, 4
    limit = fixed_point.value_limit(bits, n)
    with pytest.raises(fixed_point.FixedPointError, match=r"privacy\.fixed_point_bits = 16"):
        fixed_point.encode(np.array([0.0, -limit]), 0.25, bits, n)
    with pytest.raises(fixed_point.FixedPointError, match="NaN or infinite"):
        fixed_point.encode(np.array([np.nan]), 0.25, bits, n)
    # Every client at the edge of the range, all with the same sign: the sum still decodes.
    largest = np.nextafter(limit, 0)
    for sign in (1.0, -1.0):
        codes = [fixed_point.encode(np.array([sign * largest]), 1 / n, bits, n) for _ in range(n)]
        decoded = fixed_point.decode(sum_mod(codes), bits)
        assert abs(decoded[0] - sign * largest) <= fixed_point.quantization_error(bits, n)


# -- what the server sees -----------------------------------------------------------------------
class Observed:
    """The channel wire, keeping the masked inputs as the server received them."""

    def __init__(self) -> None:
        self.wire, self.masked = channel_wire(), {}

    def up(self, client: int, kind: str, tensors: TensorDict, expect: Schema) -> TensorDict:
        received = self.wire.up(client, kind, tensors, expect)
        if kind == "masked_input":
            self.masked[client] = np.frombuffer(received["masked"].numpy().tobytes(), "<u4")
        return received

    def down(self, client: int, kind: str, tensors: TensorDict, expect: Schema) -> TensorDict:
        return self.wire.down(client, kind, tensors, expect)


def test_a_masked_input_is_uniform_and_uncorrelated_with_the_input() -> None:
    length, n = 2**16, 3
    ramp = fixed_point.encode(np.linspace(-1000, 1000, length), 1.0, 16, n)
    for first in (np.zeros(length, dtype=np.uint32), ramp):
        wire = Observed()
        inputs = {0: first, 1: ramp, 2: ramp}
        secure_sum(wire, range(n), inputs, 2, length)
        masked = wire.masked[0].astype(np.float64)
        counts = np.bincount(wire.masked[0] >> 24, minlength=256)  # the high byte
        assert stats.chisquare(counts).pvalue > 1e-4
        assert stats.kstest(masked / MODULUS, "uniform").pvalue > 1e-4
        signed = ramp.view(np.int32).astype(np.float64)
        assert abs(np.corrcoef(masked, signed)[0, 1]) < 5 / np.sqrt(length)
        assert not np.array_equal(wire.masked[0], first)


# -- dropouts -----------------------------------------------------------------------------------
def test_dropouts_after_sharekeys_and_after_masking_still_give_the_exact_sum() -> None:
    rng = np.random.default_rng(3)
    n, t, length = 7, 3, 500
    vectors = {u: random_words(rng, length) for u in range(n)}
    after_sharekeys, after_masking = {1, 5}, {3}
    inputs = {u: v for u, v in vectors.items() if u not in after_sharekeys}
    inputs[6] = random_words(rng, length + 1)  # a malformed masked input: refused, left out
    channel = Channel()
    outcome = secure_sum(channel_wire(channel), range(n), inputs, t, length, after_masking)
    assert outcome.summed == [0, 2, 3, 4]
    assert list(outcome.total) == list(sum_mod([vectors[u] for u in outcome.summed]))
    assert list(outcome.absent) == [6] and "has shape [2004]" in outcome.absent[6]
    sent = {(r.sender, r.kind) for r in channel.ledger.records if r.receiver == "server"}
    assert ("client1", "secagg.share_keys") in sent  # it shared its keys, then vanished
    assert ("client1", "secagg.masked_input") not in sent
    assert ("client3", "secagg.masked_input") in sent
    assert ("client3", "secagg.unmasking") not in sent
    (refused,) = channel.ledger.rejections()
    assert (refused.sender, refused.kind) == ("client6", "secagg.masked_input")


class TruncatingWire(ChannelWire):
    """A wire on which one client's answer to one step arrives a byte short: a broken peer."""

    def __init__(self, channel: Channel, client: int, kind: str) -> None:
        super().__init__(channel, 0, lambda c: f"client{c}", "server")
        self.broken = client, kind

    def up(self, client: int, kind: str, tensors: dict, expect: dict) -> dict:
        if (client, kind) == self.broken:
            tensors = {k: v.flatten()[:-1] for k, v in tensors.items()}
        return super().up(client, kind, tensors, expect)


def test_a_refused_unmasking_answer_leaves_the_input_in_the_sum_and_the_client_not_absent() -> None:
    """Client 4 sends its masked input, then an unmasking answer that is refused: its input is
    already in the sum and its self-mask is rebuilt from the others' shares, so it is one of the
    clients that left after masking, not an absent one (whose input the sum lacks)."""
    rng = np.random.default_rng(5)
    n, t, length = 5, 3, 64
    vectors = {u: random_words(rng, length) for u in range(n)}
    channel = Channel()
    wire = TruncatingWire(channel, 4, "unmasking")
    outcome = secure_sum(wire, range(n), vectors, t, length)
    assert outcome.summed == [0, 1, 2, 3, 4] and outcome.gone == [4] and outcome.absent == {}
    assert list(outcome.total) == list(sum_mod(list(vectors.values())))
    (refused,) = channel.ledger.rejections()
    assert (refused.sender, refused.kind) == ("client4", "secagg.unmasking")


def test_too_few_clients_at_a_step_fail_the_round_with_the_reason() -> None:
    rng = np.random.default_rng(4)
    n, t, length = 5, 4, 64
    vectors = {u: random_words(rng, length) for u in range(n)}
    few_inputs = {u: vectors[u] for u in range(3)}
    with pytest.raises(SecureAggregationError, match="3 clients sent a masked input, fewer than"):
        secure_sum(channel_wire(), range(n), few_inputs, t, length)
    with pytest.raises(SecureAggregationError, match="3 clients answered the unmasking"):
        secure_sum(channel_wire(), range(n), vectors, t, length, gone_after_masking={0, 1})
    with pytest.raises(SecureAggregationError, match="2 clients advertised keys"):
        secure_sum(channel_wire(), range(2), vectors, t, length)


# -- every method whose server step needs only the mean ---------------------------------------
D, K, R = 8, 6, 2
OPTIONS = {"fedftg": {"galore_rank": 2}}


def mean_only_methods() -> list[str]:
    return [
        name
        for name, cls in registry().items()
        if not cls.needs_each_reply and cls.communicates and cls.engine == "simulation"
    ]


def test_the_methods_that_support_secure_aggregation() -> None:
    assert mean_only_methods() == [
        "dwa",
        "feddpa",
        "fedftg",
        "fedftg_code_compat",
        "fedit",
        "fedrot",
        "fedsa",
        "fedsvd",
        "ffa",
        "frlora",
        "ravan",
        "rolora",
    ]


@pytest.mark.parametrize("name", mean_only_methods())
def test_aggregating_the_mean_equals_aggregating_the_replies(name: str) -> None:
    config = config_from_dict(
        {"lora": {"rank": R, "alpha": 4.0}, "method": {"name": name, **OPTIONS.get(name, {})}}
    )
    generator = torch.Generator().manual_seed(0)
    module = LoraModule("m", D, K, R, 2.0)
    initial = {
        module.b: torch.zeros(D, R),
        module.a: torch.randn(R, K, generator=generator),
        "head.weight": torch.randn(3, K, generator=generator),
        "w.ln_tuning_layers.weight": torch.randn(D, K, generator=generator),
    }
    context = MethodContext(config, [module], initial, [10, 20, 30], [R] * 3)
    method = build_method(config.method, context)
    if method.needs_base_weights:
        method.attach_base({module.key: torch.randn(D, K, generator=generator)})
    secure = copy.deepcopy(method)
    replies = {}
    for client in range(3):
        schema = method.expected_reply(client, method.server_message(client, 0))
        replies[client] = {k: torch.randn(s, generator=generator) for k, s in schema.items()}
    weights = {0: 1 / 6, 1: 2 / 6, 2: 3 / 6}
    mean = {
        k: torch.from_numpy(sum(w * replies[c][k].double().numpy() for c, w in weights.items()))
        for k in replies[0]
    }
    method.aggregate(0, replies, weights)
    secure.aggregate_mean(0, {k: v.float() for k, v in mean.items()})
    expected, got = method.state_dict(), secure.state_dict()
    assert sorted(got) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)


# -- end to end ---------------------------------------------------------------------------------
def engine_for(overrides: list[str], out: Path) -> RunLoop:
    experiment = build(load_config(TINY / "fedit.toml", overrides))
    out.mkdir(parents=True)
    return local_loop(experiment, out, Console(quiet=True), pooled=False)


def test_a_fedit_run_with_secure_aggregation_matches_the_plain_run(tmp_path: Path) -> None:
    """Seed 0, dropout 0.3: round 1 loses clients 0 and 3, round 3 client 3. Secure: t = 3 of
    4, so round 1 fails (2 masked inputs) and round 3 rebuilds client 3's mask key; plain:
    min_replies = 3 skips round 1 too. Round 2 starts from the same state in both, so its
    aggregate differs by at most 4·2^-17 per coordinate. The masks cancel exactly, so the run is
    deterministic: its losses are within 2e-5 of the plain run's (measured: ≤ 2e-6) and its
    accuracy and macro-F1 are the same."""
    common = ["experiment.rounds=3", "federation.dropout=0.3"]
    plain = engine_for([*common, "federation.min_replies=3"], tmp_path / "plain")
    secure = engine_for([*common, "privacy.secure_aggregation=true"], tmp_path / "secure")
    records: dict[str, list[dict]] = {"plain": [], "secure": []}
    with Progress(disable=True) as progress:
        for round_index in range(3):
            for name, engine in (("plain", plain), ("secure", secure)):
                records[name].append(engine.run_round(round_index, progress))
            if round_index == 1:
                a, b = plain.exp.method.global_state(), secure.exp.method.global_state()
                bound = fixed_point.quantization_error(16, 4) + 1e-7  # + float32 rounding
                assert max(float((a[k] - b[k]).abs().max()) for k in a) <= bound
    for p, s in zip(records["plain"], records["secure"], strict=True):
        reliability = ("absent", "aggregated", "skipped")
        assert {k: p.get(k) for k in reliability} == {k: s.get(k) for k in reliability}
        for key in ("train_loss", "test_loss"):
            assert abs(p[key] - s[key]) <= 2e-5
        assert (p["accuracy"], p["macro_f1"]) == (s["accuracy"], s["macro_f1"])
        assert p["bytes_up"] + p["bytes_down"] < s["bytes_up"] + s["bytes_down"]
    first = records["secure"][0]
    assert first["skipped"] and first["skip_reason"].startswith(
        "secure aggregation: 2 clients sent a masked input, fewer than the threshold t = 3"
    )
    assert records["plain"][0]["skipped"] and "skipped" not in records["secure"][2]
    assert records["secure"][2]["absent"] == {"3": "dropout"}
    ledger = secure.round.channel.ledger.records
    uploads = {(r.round, r.sender, r.kind) for r in ledger if r.receiver == "server"}
    assert all(kind.startswith("secagg.") for _, _, kind in uploads)  # no plain reply ever
    assert (2, "client3", "secagg.share_keys") in uploads
    assert (2, "client3", "secagg.masked_input") not in uploads
    masked = [r for r in ledger if r.kind == "secagg.masked_input"]
    elements = sum(v.numel() for v in secure.exp.method.global_state().values())
    assert all(r.bytes > 4 * elements for r in masked) and len(masked) == 2 + 4 + 3


@dataclass
class TruncatingCarrier:
    """Carries the masking messages like ``inner``, but ``client``'s answer to the server's
    message of ``kind`` arrives a byte short: a broken peer, as another process could send."""

    inner: Carrier
    client: int
    kind: str

    def step(self, kind: str, payloads: dict[int, bytes], round_index: int) -> Answers:
        answers = self.inner.step(kind, payloads, round_index)
        if kind == self.kind:
            answer, report = answers[self.client]
            answers[self.client] = answer[:-1], report
        return answers

    def end(self, round_index: int) -> None:
        self.inner.end(round_index)


class OneAnswerShort(LocalHosts):
    """The clients in this process, their masking answers carried by ``TruncatingCarrier``."""

    def __init__(self, runtime: ClientRuntime, client: int, kind: str) -> None:
        super().__init__(runtime)
        self.broken = client, kind
        self.round: ServerRound | None = None

    def masking(self) -> Carrier:
        assert self.round is not None and self.round.held_here is not None
        return TruncatingCarrier(LocalCarrier(self.round.held_here), *self.broken)


def test_a_refused_unmasking_answer_is_in_the_round_record_and_the_sum(tmp_path: Path) -> None:
    """Client 2's answer to the survivors message (its unmasking shares) is refused. Its masked
    input is already in the sum and its self-mask is rebuilt from the others' shares, so the
    round aggregates all four clients: the record lists the refused message and client 2 as
    left after masking, no client absent, and the global model is the plain run's within the
    fixed-point error."""
    overrides = ["experiment.rounds=1", "privacy.secure_aggregation=true"]
    experiment = build(load_config(TINY / "fedit.toml", overrides))
    runtime = ClientRuntime(experiment)
    hosts = OneAnswerShort(runtime, 2, "survivors")
    hosts.round = ServerRound(experiment, runtime, hosts)
    (tmp_path / "secure").mkdir()
    secure = RunLoop(hosts.round, tmp_path / "secure", Console(quiet=True))
    plain = engine_for(["experiment.rounds=1"], tmp_path / "plain")
    with Progress(disable=True) as progress:
        record = secure.run_round(0, progress)
        plain.run_round(0, progress)
    (rejected,) = record["rejected"]
    assert rejected["sender"] == "client2"
    assert record["left_after_masking"] == [2]
    assert "absent" not in record and "skipped" not in record
    (refused,) = secure.round.channel.ledger.rejections(0)
    assert (refused.sender, refused.kind) == ("client2", "secagg.unmasking")
    a, b = plain.exp.method.global_state(), experiment.method.global_state()
    bound = fixed_point.quantization_error(16, 4) + 1e-7  # + float32 rounding
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= bound


@pytest.mark.parametrize("config", ["fedit.toml", "ffa.toml"])
def test_central_dp_under_secure_aggregation_is_the_plain_central_dp_run(
    config: str, tmp_path: Path
) -> None:
    """Adaptive central DP (z = 0.5, C = 0.05, 4 clients, dropout 0.3 as above: round 1 fails
    under t = 3 and is skipped by min_replies = 3 in the plain run, round 3 loses client 3).
    Plain: the server clips each reply's update; secure: each client clips its own and masks it
    with its bit, the server noises the unmasked sums. Same noise draws, so round 2's global
    state (the first aggregated, from the same start) is within the fixed-point error of the
    plain run's (≤ 4·2^-17 ≈ 3.1e-5; measured 2.5-2.7e-5, against a noise std of z_Δ·C/m ≈
    7e-3: noise added twice or not at all would fail), round 3's within twice that (measured
    3.5e-5), the bits' count is exact, so the released clip norms and unclipped
    fractions are the plain run's, and no update ever reaches the server unmasked."""
    central = ["experiment.rounds=3", "federation.dropout=0.3", *ADAPTIVE_CENTRAL]

    def engine(overrides: list[str], out: Path) -> RunLoop:
        experiment = build(load_config(TINY / config, [*central, *overrides]))
        out.mkdir(parents=True)
        return local_loop(experiment, out, Console(quiet=True), pooled=False)

    plain = engine(["federation.min_replies=3"], tmp_path / "plain")
    secure = engine(["federation.min_replies=3", "privacy.secure_aggregation=true"], tmp_path / "s")
    bound = fixed_point.quantization_error(16, 4) + 1e-7  # + float32 rounding
    with Progress(disable=True) as progress:  # min_replies: the same rounds charged in both
        for round_index in range(3):
            before = {k: v.clone() for k, v in plain.exp.method.global_state().items()}
            p, s = (e.run_round(round_index, progress) for e in (plain, secure))
            a, b = plain.exp.method.global_state(), secure.exp.method.global_state()
            moved = max(float((a[k] - before[k]).abs().max()) for k in a)
            gap = max(float((a[k] - b[k]).abs().max()) for k in a)
            assert gap <= (bound if round_index < 2 else 2 * bound), (round_index, gap)
            assert moved > 100 * bound or p.get("skipped"), (round_index, moved)
            released = ("clip_norm", "unclipped_fraction", "epsilon")
            assert {k: s.get(k) for k in released} == {k: p.get(k) for k in released}
            assert p.get("skipped") or "unclipped_fraction" in p
            assert s.get("skipped") == p.get("skipped") and s.get("absent") == p.get("absent")
    uploads = {r.kind for r in secure.round.channel.ledger.records if r.receiver == "server"}
    assert uploads and all(kind.startswith("secagg.") for kind in uploads)


# -- refused at config time ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "overrides", "reason"),
    [
        ("flexlora.toml", [], "an SVD of Σ p_i s_i·B_i·A_i, which needs each client's product"),
        ("hetlora.toml", [], "its weights p_i ∝ ‖s_i·B_i·A_i‖ come from each reply"),
        ("flora.toml", [], "it stacks every client's factors"),
        ("declora.toml", [], "runs on the 'gossip' engine: no server sums replies"),
        (
            "fedit.toml",
            ["federation.aggregator='median'"],
            "federation.aggregator 'median' needs each client's reply",
        ),
        (
            "fedit.toml",
            ["federation.aggregator='norm_clip'", "federation.clip_norm=1.0"],
            "federation.aggregator 'norm_clip' needs each client's reply",
        ),
        ("fedit.toml", ["privacy.threshold=5"], "privacy.threshold 5 exceeds the 4 clients"),
    ],
)
def test_what_cannot_be_aggregated_securely_is_refused_with_the_reason(
    config: str, overrides: list[str], reason: str, tmp_path: Path
) -> None:
    sets = [arg for o in ["privacy.secure_aggregation=true", *overrides] for arg in ("--set", o)]
    code, output = run_cli("run", str(TINY / config), "--out", str(tmp_path), *sets)
    text = " ".join(output.split())
    assert code == 2 and "Traceback" not in output and reason in text, text
