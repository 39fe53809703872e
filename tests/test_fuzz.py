"""Fuzzing (issue 10, item 7): random and mutated bytes fed to the message decoder, the
quantized-gossip decoder and the checkpoint loader only ever raise the project's own errors
(``MessageError``, ``CheckpointError``), and random config dicts only ever give a
``ConfigError`` or a valid config. ``EXAMPLES`` per property; docs/benchmarks.md counts them."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora.channel import MessageError, decode, encode
from fedlora.checkpoint import FILE, Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from fedlora.codecs import StochasticQuantizer
from fedlora.config import Config, ConfigError, config_from_dict

EXAMPLES = 300
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same inputs on every run: a CI failure reproduces here
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

MESSAGE = {"m.lora_A.weight": torch.randn(4, 6), "m.lora_B.weight": torch.randn(5, 4)}
SCHEMA = {name: tuple(t.shape) for name, t in MESSAGE.items()}
VALID = encode(MESSAGE)


def mutations(valid: bytes) -> st.SearchStrategy[bytes]:
    """Byte flips, overwrites, truncations and insertions of a valid payload."""
    flips = st.lists(
        st.tuples(st.integers(0, len(valid) - 1), st.integers(1, 255)), min_size=1, max_size=8
    ).map(lambda edits: _flip(valid, edits))
    cuts = st.integers(0, len(valid) - 1).map(lambda n: valid[:n])
    inserts = st.tuples(st.integers(0, len(valid)), st.binary(min_size=1, max_size=64)).map(
        lambda edit: valid[: edit[0]] + edit[1] + valid[edit[0] :]
    )
    header = st.tuples(st.integers(8, 200), st.binary(min_size=1, max_size=16)).map(
        lambda edit: valid[: edit[0]] + edit[1] + valid[edit[0] + len(edit[1]) :]
    )
    return st.one_of(flips, cuts, inserts, header)


def _flip(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    mutable = bytearray(data)
    for position, mask in edits:
        mutable[position] ^= mask
    return bytes(mutable)


def accepts_or_refuses(payload: bytes, **options: object) -> None:
    """decode either returns a message that meets the schema or raises MessageError."""
    try:
        tensors = decode(payload, **options)
    except MessageError:
        return
    expect = options.get("expect")
    if expect is not None:
        assert {k: tuple(v.shape) for k, v in tensors.items()} == expect
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_never_crash_the_decoder(payload: bytes) -> None:
    accepts_or_refuses(payload, expect=SCHEMA)
    accepts_or_refuses(payload, expect=None)


@FUZZ
@given(mutations(VALID))
def test_mutated_messages_never_crash_the_decoder(payload: bytes) -> None:
    accepts_or_refuses(payload, expect=SCHEMA, limit=len(VALID) + 32)


CODEC = StochasticQuantizer(4, seed=0)
WIRE = encode(CODEC.encode(MESSAGE, 0, "node0"))


@FUZZ
@given(st.one_of(mutations(WIRE), st.binary(max_size=2048)))
def test_mutated_quantized_messages_never_crash_the_gossip_decoder(payload: bytes) -> None:
    accepts_or_refuses(payload, expect=SCHEMA, codec=CODEC)


VALID_WIRE = CODEC.encode(MESSAGE, 0, "node0")
part_edits = st.lists(
    st.tuples(
        st.sampled_from(sorted(VALID_WIRE)),
        st.sampled_from([torch.uint8, torch.int32, torch.float32, torch.int64]),
        st.lists(st.integers(0, 4), max_size=2),
        st.integers(-(2**31), 2**31 - 1),
    ),
    min_size=1,
    max_size=3,
)


@FUZZ
@given(part_edits, st.sets(st.sampled_from(sorted(VALID_WIRE)), max_size=2))
def test_structured_garbage_never_crashes_the_quantized_decoder(
    edits: list[tuple], dropped: set[str]
) -> None:
    """A valid quantized wire with parts replaced (any dtype, rank, value) or missing."""
    wire = {k: v for k, v in VALID_WIRE.items() if k not in dropped}
    for name, dtype, shape, fill in edits:
        value = (
            fill % 256 if dtype == torch.uint8 else float(fill) if dtype.is_floating_point else fill
        )
        wire[name] = torch.full(shape, value, dtype=dtype)
    with contextlib.suppress(MessageError):
        CODEC.decode(wire)


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    directory = tmp_path_factory.mktemp("checkpoint")
    save_checkpoint(
        directory,
        Checkpoint(
            2,
            dict(MESSAGE),
            {0: {"own.b": torch.ones(3)}},
            {0: {"0.exp_avg": torch.zeros(2, 2)}},
            [{"round": 1, "accuracy": 0.5}],
            [{"round": 0, "sender": "server", "receiver": "client0", "bytes": 10, "tensors": 1}],
        ),
    )
    return (directory / FILE).read_bytes()


@FUZZ
@given(data=st.data())
def test_damaged_checkpoints_are_refused_or_identical(
    data: st.DataObject, checkpoint_bytes: bytes, tmp_path: Path
) -> None:
    payload = data.draw(st.one_of(mutations(checkpoint_bytes), st.binary(max_size=2048)))
    (tmp_path / FILE).write_bytes(payload)
    try:
        loaded = load_checkpoint(tmp_path)
    except CheckpointError:
        return
    # Accepted only if nothing that matters changed (a mutation of header padding).
    assert loaded is not None and loaded.completed_rounds == 2
    assert all(torch.equal(loaded.method[k], MESSAGE[k]) for k in MESSAGE)
    assert loaded.metrics == [{"round": 1, "accuracy": 0.5}]


SECTIONS = list(Config.model_fields)
KEYS = sorted(
    {key for section in SECTIONS for key in Config.model_fields[section].annotation.model_fields}
)  # type: ignore[union-attr]
values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(10**6), 10**6),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12),
    ),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=6,
)
config_dicts = st.dictionaries(
    st.sampled_from(SECTIONS) | st.text(max_size=8),
    st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), values, max_size=4) | values,
    max_size=4,
)


@FUZZ
@given(config_dicts)
def test_random_configs_are_valid_or_a_config_error(data: dict) -> None:
    try:
        config = config_from_dict(data)
    except ConfigError:
        return
    assert isinstance(config, Config)
