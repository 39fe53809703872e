"""The quantized-gossip codec (our extension, algorithms.md §2.3, §7 T10) and its channel use."""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.channel import Channel, MessageError, encode
from fedlora.codecs import CODES, SCALE, SHAPE, StochasticQuantizer, make_codec


def sample(seed: int = 0, shape: tuple[int, ...] = (7, 9)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_unbiased_and_variance_bound_by_monte_carlo(bits: int) -> None:
    """E[Q_b(X)] = X and E||Q_b(X) − X||² = Σ p(1−p)(m/L)² ≤ d m² / (4L²) (T10).

    Many copies of X in one tensor share X's scale m = max|X|, so each row is an independent
    draw of Q_b(X)."""
    x = sample(bits, (40,)).to(torch.float64)
    draws = 20_000
    quantizer = StochasticQuantizer(bits, seed=0)
    codes, scale = quantizer.quantize(x.repeat(draws, 1), torch.Generator().manual_seed(1))
    q = codes.reshape(draws, -1).to(torch.float64) * (float(scale) / quantizer.levels)
    m, levels = float(x.abs().max()), quantizer.levels
    assert float(scale) == pytest.approx(m, rel=1e-6)
    step = m / levels
    assert ((q - x).abs() <= step + 1e-9).all()  # always a neighbouring grid point
    standard_error = step / 2 / math.sqrt(draws)
    assert (q.mean(0) - x).abs().max() < 5 * standard_error
    frac = x / step - torch.floor(x / step)
    predicted = float((frac * (1 - frac)).sum()) * step**2
    empirical = float(((q - x) ** 2).sum(1).mean())
    assert empirical == pytest.approx(predicted, rel=0.05)
    assert predicted <= x.numel() * m**2 / (4 * levels**2)


def test_32_bits_is_the_identity() -> None:
    assert make_codec(32, seed=0) is None
    x = {"a": sample(0), "b": sample(1, (3,))}
    out = Channel(codec=make_codec(32, seed=0)).send(x, "node0", "node1", 0)
    assert all(torch.equal(out[k], x[k]) for k in x)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("count", [1, 5, 8, 13])
def test_pack_unpack_roundtrip(bits: int, count: int) -> None:
    quantizer = StochasticQuantizer(bits, seed=0)
    levels = quantizer.levels
    codes = torch.randint(
        -levels, levels + 1, (count,), generator=torch.Generator().manual_seed(count)
    )
    packed = quantizer.pack(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(count * bits / 8)
    assert torch.equal(quantizer.unpack(packed, count), codes)


def test_ledger_counts_the_packed_bytes() -> None:
    x = {"layer.lora_A.weight": sample(0, (8, 64)), "layer.lora_B.weight": sample(1, (64, 8))}
    exact = Channel()
    exact.send(x, "node0", "node1", 0)
    sizes = {}
    for bits in (2, 4, 8):
        codec = StochasticQuantizer(bits, seed=0)
        channel = Channel(codec=codec)
        received = channel.send(
            x, "node0", "node1", 0, expect={k: tuple(v.shape) for k, v in x.items()}
        )
        wire = codec.encode(x, 0, "node0")
        assert channel.ledger.records[0].bytes == len(encode(wire))  # what was actually sent
        for name, tensor in x.items():
            assert wire[name + CODES].numel() == 512 * bits // 8
            assert received[name].shape == tensor.shape and received[name].dtype == torch.float32
            assert (received[name] - tensor).abs().max() <= tensor.abs().max() / codec.levels + 1e-6
        sizes[bits] = channel.ledger.total()
    assert sizes[2] < sizes[4] < sizes[8] < exact.ledger.total()
    # 1024 values: 4096 payload bytes exact, 256 at 2 bits; the rest is the safetensors JSON
    # header (3 entries per tensor when quantized), scales and shapes.
    assert exact.ledger.total() > 4096 and sizes[2] < 256 + 600


def test_broadcast_is_the_same_draw_for_every_receiver_and_fresh_each_round() -> None:
    codec = StochasticQuantizer(2, seed=3)
    channel = Channel(codec=codec)
    x = {"w": sample(0, (50,))}
    to_one = channel.send(x, "node0", "node1", 4)["w"]
    to_two = channel.send(x, "node0", "node2", 4)["w"]
    own = codec.decode(codec.encode(x, 4, "node0"))["w"]  # what the sender knows was received
    assert torch.equal(to_one, to_two) and torch.equal(to_one, own)
    assert not torch.equal(to_one, channel.send(x, "node0", "node1", 5)["w"])
    assert not torch.equal(to_one, channel.send(x, "node3", "node1", 4)["w"])


def test_zero_tensor_stays_zero() -> None:
    codec = StochasticQuantizer(4, seed=0)
    out = codec.decode(codec.encode({"z": torch.zeros(3, 5)}, 0, "node0"))
    assert torch.equal(out["z"], torch.zeros(3, 5))


def test_malformed_quantized_messages_are_refused() -> None:
    codec = StochasticQuantizer(2, seed=0)
    wire = codec.encode({"w": sample(0, (10,))}, 0, "node0")
    broken = [
        ({k: v for k, v in wire.items() if not k.endswith(SCALE)}, "lacks"),
        ({**wire, "w" + CODES: wire["w" + CODES][:-1]}, "bytes for 10 values"),
        ({**wire, "w" + CODES: torch.full_like(wire["w" + CODES], 255)}, "codes outside"),
        ({**wire, "w" + SCALE: torch.tensor([float("nan")])}, "invalid scale"),
        ({**wire, "w" + SHAPE: wire["w" + SHAPE].to(torch.int64)}, "malformed parts"),
    ]
    for message, error in broken:
        with pytest.raises(MessageError, match=error):
            codec.decode(message)
    with pytest.raises(ValueError, match="bits must be"):
        StochasticQuantizer(3, seed=0)


def test_contractive_mode_shrinks_the_error_below_the_signal() -> None:
    """Error feedback needs E||C(X) − X||² < ||X||²; unbiased 2-bit Q breaks it on spiky X."""
    x = torch.cat([torch.full((1,), 10.0), 0.1 * sample(0, (200,)).reshape(-1)]).to(torch.float64)
    draws = 2000
    errors = {}
    for contractive in (False, True):
        quantizer = StochasticQuantizer(2, seed=0, contractive=contractive)
        gen = torch.Generator().manual_seed(0)
        total = 0.0
        for _ in range(draws):
            codes, scale = quantizer.quantize(x, gen)
            total += float(((quantizer.dequantize(codes, scale).double() - x) ** 2).sum())
        errors[contractive] = total / draws
    signal = float((x**2).sum())
    assert errors[False] > signal > errors[True]
