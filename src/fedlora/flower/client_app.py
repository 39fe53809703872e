"""fedlora's Flower ClientApp: a SuperNode's clients' half of each round.

Flower starts it in a fresh process per message. It forwards the message to the node's warm
fedlora runtime (``node_runtime``: the experiment built once per node) and returns its answer.
Where no runtime answers (none was started, or it died), it says so in the node's log and does
the same work itself: it rebuilds the experiment from the fedlora config in the run config (the
same base model, data split and partition on every node, from the seed), which is correct but
costs the whole build per message. Either way a client's state is read from and written to the
node's directory (``node_state``), and the work is the client runtime's (``answer``: the
method's ``client_start``, the local steps, ``client_reply``; for methods that evaluate each
client's own model, ``evaluate``; under secure aggregation, the protocol's steps,
``query.secagg``, which need the runtime). Which clients it may serve is its node config's
partition (``partition-id``, ``num-partitions``); it answers the server's ``query`` with it.
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedlora.compat import stamp
from fedlora.flower import node_runtime, node_state
from fedlora.flower.protocol import (
    CONFIG_TEXT,
    RECORD,
    REPLY_TIMEOUT,
    RUN_KEY,
    STATE_DIR,
    hosting,
    join_frames,
)

app = ClientApp()


def reply(message: Message, fields: dict) -> Message:
    return Message(RecordDict({RECORD: ConfigRecord(fields)}), reply_to=message)


@app.query()
def query(message: Message, context: Context) -> Message:
    """Which partition this node hosts (from its node config), and which fedlora it runs."""
    hosted = hosting(dict(context.node_config))
    return reply(message, {"hosting": json.dumps(vars(hosted)), "fedlora": json.dumps(stamp())})


def hosted(context: Context, clients: list[int]) -> tuple[Path, Path]:
    """The node's state directory and the run's directory in it, refused when a client is not
    this node's to serve."""
    partition = hosting(dict(context.node_config))
    foreign = [c for c in clients if not partition.hosts(c)]
    if foreign:
        raise ValueError(
            f"client {foreign[0]} is not in this node's partition {partition.partition}"
        )
    state_dir = context.node_config.get(STATE_DIR)
    root = node_state.node_root(str(state_dir) if state_dir else None, partition.partition)
    key = context.run_config.get(RUN_KEY) or str(context.run_id)  # apps made before run keys
    return root, root / f"run-{key}"


def work(context: Context, request: dict, payload: bytes, offset: bytes) -> tuple[dict, bytes]:
    """The node's answer to ``request``: from its warm runtime, else worked out here."""
    text = str(context.run_config[CONFIG_TEXT])
    clients = request.get("clients", [request.get("client")])
    root, directory = hosted(context, clients)
    request = {**request, "directory": str(directory)}
    timeout = float(context.run_config.get(REPLY_TIMEOUT, 600))
    try:
        return node_runtime.ask(root, request, text, payload, offset, timeout)
    except node_runtime.RuntimeAbsent as absent:
        node_runtime.log(f"{absent}: working in this process (correct, but it builds the model)")
    if request["op"] == "mask":  # the keys and the reply would be in the runtime's memory
        count = len(clients)
        return {"reports": [{"failed": node_runtime.COLD_SECURE}] * count}, join_frames(
            [b""] * count
        )
    runtime = node_runtime.build_runtime(text)
    if request["op"] == "train":
        answer, report = node_runtime.train(
            runtime, directory, request["client"], request["round"], payload, offset
        )
        return {"report": report}, answer
    metrics = node_runtime.evaluate(runtime, directory, clients, request["round"], offset)
    return {"metrics": metrics}, b""


@app.train()
def train(message: Message, context: Context) -> Message:
    """One client's round: the download's bytes in, the reply's bytes and a report out."""
    fields = message.content[RECORD]
    request = {"op": "train", "client": int(fields["client"]), "round": int(fields["round"])}
    answer, payload = work(context, request, bytes(fields["payload"]), bytes(fields["offset"]))
    return reply(message, {"payload": payload, "report": json.dumps(answer["report"])})


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """The node's clients' own models on the test (and validation) set, for methods that
    evaluate per client (FedSA-LoRA): the metrics go to the server, the models stay here and
    are exported as PEFT adapters under the node's run directory (``adapters/client_<i>``), the
    latest evaluated ones."""
    fields = message.content[RECORD]
    clients = [int(c) for c in json.loads(fields["clients"])]
    request = {"op": "evaluate", "clients": clients, "round": int(fields.get("round", 0))}
    answer, _ = work(context, request, b"", bytes(fields["offset"]))
    return reply(message, {"metrics": json.dumps(answer["metrics"])})


@app.query("secagg")
def secagg(message: Message, context: Context) -> Message:
    """The node's clients' answers to one step of secure aggregation's protocol: their
    messages in, their answers and reports out (the warm runtime keeps their replies and
    keys; a cold ClientApp declines)."""
    fields = message.content[RECORD]
    clients = [int(c) for c in json.loads(fields["clients"])]
    request = {"op": "mask", "kind": str(fields["kind"]), "clients": clients,
               "round": int(fields["round"])}  # fmt: skip
    answer, answers = work(context, request, bytes(fields["payloads"]), b"")
    return reply(message, {"answers": answers, "reports": json.dumps(answer["reports"])})
