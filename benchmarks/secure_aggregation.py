"""Secure aggregation cost per round: time and bytes vs plain FedIT (issue 13).

The update is that of minilm-l6 with LoRA r = 8 on query and value plus the 5-class BBC head:
its names and shapes are read from the model's adapter slots (``AdapterSlots.shapes``), and every
client's reply holds random values of those shapes (no training: the protocol only; local
training is the same with and without it).

A plain FedIT round here: the server sends each client the global adapter and receives its
reply through the channel, then takes the weighted mean (``weighted_average``, FedIT's server
step). A secure round: the same downloads, then ``SecureAggregation.mean``, the engine's own
path (encode, the four protocol rounds through the same channel, unmask, decode), with
``dropped`` clients leaving after ShareKeys (their masks rebuilt from shares; in the plain
round they send no reply). All parties run one after the other in this process, as in the
simulation engine; the per-party split (mean client time, server time) comes from a second,
profiled run: the cumulative time of each party's protocol steps. Bytes are the ledger's, per
round and per client of the round. Each configuration runs ``--repeats`` times; the median is
printed.

    python -P benchmarks/secure_aggregation.py [--clients 10 100] [--repeats 3] [--dropout 0.1]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import numpy as np
import torch

from fedlora.adapters import AdapterSlots
from fedlora.channel import Channel, Ledger
from fedlora.config import LoraConfig, PrivacyConfig
from fedlora.lora import normalized, weighted_average
from fedlora.models import load_base_model, load_tokenizer, model_spec
from fedlora.privacy import fixed_point
from fedlora.privacy.secagg import ChannelWire, Client, Server
from fedlora.privacy.secure_round import SecureAggregation, flatten, unflatten
from fedlora.session import configure_runtime
from fedlora.tensors import TensorDict

SERVER = "server"


def name(client: int) -> str:
    return f"client{client}"


def update_shapes() -> dict[str, tuple[int, ...]]:
    spec = model_spec("minilm-l6")
    base = load_base_model("minilm-l6", 5, load_tokenizer("minilm-l6"), seed=0)
    lora = LoraConfig(rank=8, alpha=16, target_modules=["query", "value"])
    return AdapterSlots(base, spec, lora, init_seed=0).shapes()


def replies_for(shapes: dict[str, tuple[int, ...]], clients: int) -> dict[int, TensorDict]:
    generator = torch.Generator().manual_seed(0)
    return {
        c: {k: 0.02 * torch.randn(s, generator=generator) for k, s in shapes.items()}
        for c in range(clients)
    }


def downloads(channel: Channel, state: TensorDict, clients: int) -> None:
    for c in range(clients):
        channel.send(state, SERVER, name(c), 0)


def plain_round(
    replies: dict[int, TensorDict], weights: dict[int, float], dropped: set[int]
) -> tuple[float, Ledger]:
    channel = Channel()
    began = time.perf_counter()
    downloads(channel, replies[0], len(replies))
    replied = [c for c in sorted(replies) if c not in dropped]
    received = [channel.send(replies[c], name(c), SERVER, 0) for c in replied]
    weighted_average(received, [weights[c] for c in replied])
    return time.perf_counter() - began, channel.ledger


def secure_round(
    replies: dict[int, TensorDict], weights: dict[int, float], dropped: set[int]
) -> tuple[float, Ledger]:
    channel = Channel()
    secure = SecureAggregation(PrivacyConfig(secure_aggregation=True), len(replies))
    schema = {k: tuple(v.shape) for k, v in replies[0].items()}
    held = {c: r for c, r in replies.items() if c not in dropped}
    began = time.perf_counter()
    downloads(channel, replies[0], len(replies))
    wire = ChannelWire(channel, 0, name, SERVER)
    schemas = dict.fromkeys(held, schema)
    secure.mean(0, wire, held, schemas, sorted(replies), weights)
    return time.perf_counter() - began, channel.ledger


CLIENT_STEPS = [Client.__init__, Client.advertise, Client.share_keys, Client.receive_shares]
CLIENT_STEPS += [Client.masked_input, Client.unmask, flatten, fixed_point.encode]
SERVER_STEPS = [Server.accept_keys, Server.roster_message, Server.accept_shares]
SERVER_STEPS += [Server.shares_messages, Server.accept_masked, Server.survivors_message]
SERVER_STEPS += [Server.accept_unmasking, Server.total, fixed_point.decode, unflatten]


def party_times(
    replies: dict[int, TensorDict], weights: dict[int, float], dropped: set[int]
) -> tuple[float, float]:
    """(mean seconds per client, server seconds) of a secure round: the cumulative time of
    each party's protocol steps under cProfile (none of them calls another)."""
    profile = cProfile.Profile()
    profile.runcall(secure_round, replies, weights, dropped)
    cumulative = {
        (path, line): row[3] for (path, line, _), row in pstats.Stats(profile).stats.items()
    }

    def total(steps: list) -> float:
        codes = [step.__code__ for step in steps]
        return sum(cumulative.get((c.co_filename, c.co_firstlineno), 0.0) for c in codes)

    return total(CLIENT_STEPS) / len(replies), total(SERVER_STEPS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dropout", type=float, default=0.1, help="share dropped after ShareKeys")
    args = parser.parse_args()
    torch.set_num_threads(1)
    configure_runtime()
    shapes = update_shapes()
    elements = sum(int(np.prod(s)) for s in shapes.values())
    print(f"update: {len(shapes)} tensors, {elements:,} float32 values")
    print(
        "clients | dropped | plain s | secure s | x | client s (mean) | server s | "
        "plain bytes | secure bytes | x | plain up/client | secure up/client | secure down/client"
    )
    for n in args.clients:
        replies = replies_for(shapes, n)
        sizes = np.random.default_rng(n).integers(50, 500, n)
        weights = dict(enumerate(normalized(sizes.tolist())))
        for dropped in (set(), set(range(0, n, round(1 / args.dropout)))):
            plain, secure, per_client, server = [], [], [], []
            for _ in range(args.repeats):
                seconds, plain_ledger = plain_round(replies, weights, dropped)
                plain.append(seconds)
                seconds, secure_ledger = secure_round(replies, weights, dropped)
                secure.append(seconds)
                client_seconds, server_seconds = party_times(replies, weights, dropped)
                per_client.append(client_seconds)
                server.append(server_seconds)
            mp, ms = statistics.median(plain), statistics.median(secure)
            bp, bs = plain_ledger.total(), secure_ledger.total()
            print(
                f"{n} | {len(dropped)} | {mp:.3f} | {ms:.3f} | {ms / mp:.1f} | "
                f"{statistics.median(per_client):.3f} | {statistics.median(server):.3f} | "
                f"{bp:,} | {bs:,} | {bs / bp:.2f} | {plain_ledger.total('up') / n:,.0f} | "
                f"{secure_ledger.total('up') / n:,.0f} | {secure_ledger.total('down') / n:,.0f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
