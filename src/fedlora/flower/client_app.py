"""fedlora's Flower ClientApp: a SuperNode's clients' half of each round.

Flower starts it in a fresh process per message. It rebuilds the experiment from the fedlora
config in the run config (the same base model, data split and partition on every node, from
the seed), reads the client's state from the node's directory (``node_state``), runs the client
runtime's ``answer`` on the download's bytes (the method's ``client_start``, the local steps,
``client_reply``) and writes the state back; for methods that evaluate each client's own model
it evaluates its clients when asked (``evaluate``). Which clients it may serve is its node config's
partition (``partition-id``, ``num-partitions``); it answers the server's ``query`` with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedlora.flower import node_state
from fedlora.flower.app_dir import config_from_text
from fedlora.flower.protocol import CONFIG_TEXT, RECORD, STATE_DIR, hosting

if TYPE_CHECKING:  # the heavy stack loads only for training, not to answer a query
    from fedlora.engines.client import ClientRuntime

THREADS = 1  # as a distributed rank (the reference runs with one thread too)

app = ClientApp()
_runtimes: dict[str, ClientRuntime] = {}  # by config text: a process serving twice builds once


def reply(message: Message, fields: dict) -> Message:
    return Message(RecordDict({RECORD: ConfigRecord(fields)}), reply_to=message)


def runtime_for(text: str) -> ClientRuntime:
    if text not in _runtimes:
        from fedlora import experiment as experiments
        from fedlora.compute import configure_threads
        from fedlora.engines.client import ClientRuntime
        from fedlora.session import configure_runtime

        with config_from_text(text) as (config, _):
            compute = experiments.validate(config)
            configure_threads(config.compute, THREADS)
            configure_runtime(compute)
            _runtimes[text] = ClientRuntime(experiments.build(config, deployed=True))
    return _runtimes[text]


@app.query()
def query(message: Message, context: Context) -> Message:
    """Which partition this node hosts (from its node config)."""
    hosted = hosting(dict(context.node_config))
    return reply(message, {"hosting": json.dumps(vars(hosted))})


def hosted_client_runtime(
    message: Message, context: Context, clients: list[int]
) -> tuple[ClientRuntime, Path]:
    """The node's client runtime for a message about ``clients`` (on the base the server's
    parties train on) and its run's state directory: refused when a client is not this node's
    to serve."""
    from safetensors.torch import load as load_bytes

    hosted = hosting(dict(context.node_config))
    foreign = [c for c in clients if not hosted.hosts(c)]
    if foreign:
        raise ValueError(f"client {foreign[0]} is not in this node's partition {hosted.partition}")
    runtime = runtime_for(str(context.run_config[CONFIG_TEXT]))
    offset = bytes(message.content[RECORD]["offset"])
    if offset:  # FLoRA: the base every party trains on moved with the merged updates
        runtime.apply_offset(load_bytes(offset))
    state_dir = context.node_config.get(STATE_DIR)
    directory = node_state.run_directory(
        str(state_dir) if state_dir else None, hosted.partition, context.run_id
    )
    return runtime, directory


@app.train()
def train(message: Message, context: Context) -> Message:
    """One client's round: the download's bytes in, the reply's bytes and a report out."""
    fields = message.content[RECORD]
    client, round_index = int(fields["client"]), int(fields["round"])
    runtime, directory = hosted_client_runtime(message, context, [client])
    runtime.stores[client], optimizer = node_state.load(directory, client)
    if optimizer:
        runtime.optimizers[client] = optimizer
    payload, report = runtime.answer(client, bytes(fields["payload"]), round_index)
    node_state.save(directory, client, runtime.stores[client], runtime.optimizers.get(client, {}))
    return reply(message, {"payload": payload, "report": json.dumps(report)})


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """The node's clients' own models on the test (and validation) set, for methods that
    evaluate per client (FedSA-LoRA): the metrics go to the server, the models stay here and
    are exported as PEFT adapters under the node's run directory (``adapters/client_<i>``), the
    latest evaluated ones."""
    clients = [int(c) for c in json.loads(message.content[RECORD]["clients"])]
    runtime, directory = hosted_client_runtime(message, context, clients)
    for client in clients:
        runtime.stores[client], _ = node_state.load(directory, client)
    metrics = {str(c): runtime.metrics(c) for c in clients}
    runtime.export(clients, directory)
    return reply(message, {"metrics": json.dumps(metrics)})
