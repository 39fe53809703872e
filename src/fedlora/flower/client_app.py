"""fedlora's Flower ClientApp: a SuperNode's clients' half of each round.

Flower starts it in a fresh process per message. It rebuilds the experiment from the fedlora
config in the run config (the same base model, data split and partition on every node, from
the seed), reads the client's state from the node's directory (``node_state``), runs
``ServedEngine.answer`` on the download's bytes (the method's ``client_start``, the local steps,
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
from rich.console import Console

from fedlora.flower import node_state
from fedlora.flower.app_dir import config_from_text
from fedlora.flower.protocol import CONFIG_TEXT, RECORD, STATE_DIR, hosting

if TYPE_CHECKING:  # the heavy stack loads only for training, not to answer a query
    from fedlora.engines.served import ServedEngine

THREADS = 1  # as a distributed rank (the reference runs with one thread too)

app = ClientApp()
_engines: dict[str, ServedEngine] = {}  # by config text: a process that serves twice builds once


def reply(message: Message, fields: dict) -> Message:
    return Message(RecordDict({RECORD: ConfigRecord(fields)}), reply_to=message)


def engine_for(text: str) -> ServedEngine:
    if text not in _engines:
        from fedlora import experiment as experiments
        from fedlora.compute import configure_threads
        from fedlora.engines.served import ServedEngine
        from fedlora.session import configure_runtime

        with config_from_text(text) as (config, path):
            compute = experiments.validate(config)
            configure_threads(config.compute, THREADS)
            configure_runtime(compute)
            experiment = experiments.build(config, deployed=True)
            _engines[text] = ServedEngine(experiment, path.parent, Console(quiet=True))
    return _engines[text]


@app.query()
def query(message: Message, context: Context) -> Message:
    """Which partition this node hosts (from its node config)."""
    hosted = hosting(dict(context.node_config))
    return reply(message, {"hosting": json.dumps(vars(hosted))})


def hosted_client_engine(
    message: Message, context: Context, clients: list[int]
) -> tuple[ServedEngine, Path]:
    """The node's engine for a message about ``clients``, its run's state directory, and the
    base the server's parties train on: refused when a client is not this node's to serve."""
    from safetensors.torch import load as load_bytes

    hosted = hosting(dict(context.node_config))
    foreign = [c for c in clients if not hosted.hosts(c)]
    if foreign:
        raise ValueError(f"client {foreign[0]} is not in this node's partition {hosted.partition}")
    engine = engine_for(str(context.run_config[CONFIG_TEXT]))
    offset = bytes(message.content[RECORD]["offset"])
    if offset:  # FLoRA: the base every party trains on moved with the merged updates
        engine.exp.slots.merge_into_base(load_bytes(offset))
    state_dir = context.node_config.get(STATE_DIR)
    directory = node_state.run_directory(
        str(state_dir) if state_dir else None, hosted.partition, context.run_id
    )
    return engine, directory


@app.train()
def train(message: Message, context: Context) -> Message:
    """One client's round: the download's bytes in, the reply's bytes and a report out."""
    fields = message.content[RECORD]
    client, round_index = int(fields["client"]), int(fields["round"])
    engine, directory = hosted_client_engine(message, context, [client])
    if reason := engine.missing(client, round_index):  # the server knows it too, and skips it
        return reply(
            message, {"payload": b"", "report": json.dumps({"outcome": None, "reason": reason})}
        )
    engine.stores[client], optimizer = node_state.load(directory, client)
    if optimizer:
        engine.optimizers[client] = optimizer
    payload, report = engine.answer(client, bytes(fields["payload"]), round_index)
    node_state.save(directory, client, engine.stores[client], engine.optimizers.get(client, {}))
    return reply(message, {"payload": payload, "report": json.dumps(report)})


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """The node's clients' own models on the test (and validation) set, for methods that
    evaluate per client (FedSA-LoRA): the metrics go to the server, the models stay here and
    are exported as PEFT adapters under the node's run directory (``adapters/client_<i>``), the
    latest evaluated ones."""
    from fedlora.rundir import export_client_adapters

    clients = [int(c) for c in json.loads(message.content[RECORD]["clients"])]
    engine, directory = hosted_client_engine(message, context, clients)
    for client in clients:
        engine.stores[client], _ = node_state.load(directory, client)
    metrics = {str(c): engine.client_metrics(c) for c in clients}
    export_client_adapters(engine.exp, {c: engine.stores[c] for c in clients}, directory)
    return reply(message, {"metrics": json.dumps(metrics)})
