"""A client's half of every round, written once for every host.

Whatever hosts a client (the server's own process, a forked pool worker, a torch.distributed
rank, a Flower SuperNode) runs it through a ``ClientRuntime``: the runtime holds the hosted
clients' stores and optimizer states and does their start, local steps and reply
(``train``), their answer to a download's bytes (``answer``), their own model's evaluation
(``metrics``), the merged base every party trains on (``apply_offset``, FLoRA) and the export of
their adapters. A placement only carries bytes to it and back.

Which sampled client sends no reply (a seeded dropout, a straggler dropped at the deadline) is
a pure function of the config (``missing``): every process agrees without asking, and the
client, on being asked, says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedlora.attack import tamper
from fedlora.channel import Channel, MessageError, encode
from fedlora.experiment import Experiment
from fedlora.methods.base import PersonalPhase
from fedlora.mixing import branches, mixture_metrics
from fedlora.tensors import TensorDict
from fedlora.training import LocalResult, derived_seed, steps_per_round, withheld

SERVER = "server"


def client_name(client: int) -> str:
    return f"client{client}"


def required_steps(exp: Experiment, client: int) -> int:
    return steps_per_round(exp.config.train, len(exp.clients[client]))


def missing(exp: Experiment, client: int, round_index: int) -> str | None:
    """Why a sampled client sends no reply this round, or None: a seeded dropout, or a
    straggler dropped at the deadline."""
    federation = exp.config.federation
    if federation.dropout > 0:
        seed = derived_seed(exp.config.experiment.seed, round_index, client, 0xD0)
        rng = np.random.default_rng(seed)
        if rng.random() < federation.dropout:
            return "dropout"
    deadline, needs = federation.deadline_steps, required_steps(exp, client)
    if deadline is not None and federation.stragglers == "drop" and needs > deadline:
        return f"straggler: needs {needs} steps, deadline {deadline}"
    return None


def outcome(result: LocalResult) -> list[float]:
    """What the server needs of a local result for the round's record (the state stays put)."""
    return [result.loss, result.steps, result.examples]


def from_outcome(row: list[float]) -> LocalResult:
    loss, steps, examples = row
    return LocalResult({}, {}, int(steps), loss, int(examples))


class ClientRuntime:
    """The hosted clients' state and work (see the module docstring)."""

    def __init__(self, experiment: Experiment) -> None:
        self.exp = experiment
        self.stores: dict[int, TensorDict] = {c: {} for c in range(len(experiment.clients))}
        self.optimizers: dict[int, TensorDict] = {}
        limit = experiment.config.federation.max_message_bytes
        # A method that sends nothing between parties has no messages to refuse.
        self.channel = Channel(limit=limit if experiment.method.communicates else None)

    def keeps_optimizer(self) -> bool:
        configured = self.exp.config.train.keep_optimizer_state
        return self.exp.method.keeps_optimizer_state if configured is None else configured

    # -- a round's work -----------------------------------------------------------------------
    def train(
        self, client: int, message: TensorDict, round_index: int
    ) -> tuple[TensorDict, LocalResult]:
        """One client's half of a round, from the decoded message to the reply it sends back
        (a peer's round: from its own model, the message empty)."""
        exp, method, config = self.exp, self.exp.method, self.exp.config
        store = self.stores[client]
        phase = method.personal_phase(client, message, store, round_index)
        if phase is not None:
            method.keep_personal(client, self._personal_steps(client, phase, round_index), store)
        start = method.client_start(client, message, store)
        keep = self.keeps_optimizer()
        with exp.slots.scaled(method.client_scales(client)):
            result = exp.trainer.train(
                start,
                exp.clients[client],
                round_index,
                client,
                method.trainable,
                self.optimizers.get(client) if keep else None,
                regularizer=method.regularizer(client, message),
                max_steps=config.federation.deadline_steps,  # stragglers "cut": stop there
            )
        if keep:
            self.optimizers[client] = result.optimizer_state
        reply = method.client_reply(client, result.state, message, store)
        seed = config.experiment.seed
        reported = withheld(result) if exp.withholds_client_stats else result
        return tamper(reply, message, config.attack, client, seed, round_index), reported

    def _personal_steps(self, client: int, phase: PersonalPhase, round_index: int) -> TensorDict:
        """The client's steps on its personal adapter (``Method.personal_phase``): a fresh
        optimizer, batches and dropout of their own, the round's schedule."""
        exp = self.exp
        own = {m.key: phase.weight * m.scale for m in exp.slots.modules}
        with exp.slots.scaled(own), branches(exp.slots, phase.added):
            result = exp.trainer.train(
                phase.start,
                exp.clients[client],
                round_index,
                client,
                phase.trainable,
                max_steps=exp.config.federation.deadline_steps,
                phase=1,
            )
        return result.state

    def answer(self, client: int, payload: bytes, round_index: int) -> tuple[bytes, dict]:
        """The client's work on a download's bytes: the reply's bytes and a report of scalars,
        ``{"outcome": outcome(result)}``, or ``{"outcome": None, "reason": why}`` when it sends
        nothing (with ``"refused"``: why it refused the download, checked first as on arrival)."""
        try:
            message = self.channel.unpack(payload) if payload else {}
        except MessageError as error:
            why = str(error)
            return b"", {"outcome": None, "reason": f"refused the download: {why}", "refused": why}
        if reason := missing(self.exp, client, round_index):
            return b"", {"outcome": None, "reason": reason}
        reply, result = self.train(client, message, round_index)
        packed = self.channel.pack(reply, client_name(client), round_index) if reply else b""
        return packed, {"outcome": outcome(result)}

    # -- the shared base, evaluation, export ------------------------------------------------
    def apply_offset(self, offset: TensorDict | None) -> None:
        """Bring the shared frozen base to W0 + the method's merged offset (FLoRA), if any."""
        if offset:
            self.exp.slots.merge_into_base(offset)

    def metrics(self, client: int) -> dict[str, float]:
        """Client ``client``'s own model on the test set, and on its own share of it with
        ``eval.own_test_share`` (methods with ``per_client_eval``)."""
        exp, method = self.exp, self.exp.method
        share = exp.own_test(client)  # eval.own_test_share
        mixture = method.client_mixture(client, self.stores[client])
        if mixture is not None:
            return mixture_metrics(exp, client, mixture, share)
        own = method.own_model(client, self.stores[client])
        with exp.slots.scaled(method.client_scales(client)):
            return exp.evaluator.evaluate(own, own=share)

    def export(self, clients: list[int], out: Path) -> list[Path]:
        """The hosted clients' own adapters under ``out/adapters/client_<i>``."""
        from fedlora.rundir import export_client_adapters  # rundir imports the run loop

        return export_client_adapters(self.exp, {c: self.stores[c] for c in clients}, out)

    # -- a client's state as bytes (process-internal: not a message between parties) ----------
    def state_bytes(self, client: int) -> tuple[bytes, bytes]:
        return state_bytes(self.stores[client]), state_bytes(self.optimizers.get(client, {}))

    def load_state_bytes(self, client: int, store: bytes, optimizer: bytes) -> None:
        self.stores[client] = state_from_bytes(store)
        if optimizer:  # none before a client's first round, as in one process
            self.optimizers[client] = state_from_bytes(optimizer)


def state_bytes(tensors: TensorDict) -> bytes:
    return encode(tensors) if tensors else b""


def state_from_bytes(payload: bytes) -> TensorDict:
    from safetensors.torch import load as load_bytes

    return load_bytes(payload) if payload else {}
