"""A SuperNode's warm fedlora runtime: one long-lived process that keeps the experiment (the
base model, the tokenized data, the partition) between Flower's messages.

Flower starts a fresh ClientApp process for every message. Built cold, that process would
re-import the stack and rebuild the experiment each time (seconds per message on a small model,
a whole 7B load on a large one). So each node runs one runtime (``fedlora flower-node`` starts
it beside ``flower-supernode``; ``fedlora flower-runtime`` alone), and the ClientApp only
forwards a message's bytes to it and returns its answer. The runtime builds a client runtime
(``fedlora.engines.client``) once per experiment (by the config's text) and keeps it across the
runs of that experiment; the clients' state stays in the node's files (``node_state``), so a
runtime that restarts, a ClientApp that falls back to working cold and a resumed run all read
the same state.

The two talk over a Unix-domain socket in the node's state directory (``runtime.sock``, mode
0600), never a network port, and every request carries the node's secret (``runtime.secret``,
mode 0600, made by the runtime when it starts): a local process that cannot read the secret is
refused. A request is four frames (a JSON header, the config's text, the payload, the base
offset), an answer two (a JSON report, the payload); a frame is 8 bytes of length and its bytes.
A frame over the limit, a malformed header or a wrong secret is refused with the reason, and
the connection closed; nothing is pickled.

The work itself (``train``, ``evaluate``) is the same code whether the runtime or a cold
ClientApp runs it. Secure aggregation (``mask``) needs the runtime: a client's reply and its
keys stay in the runtime's memory between the round's messages, never on the wire or on disk,
so a cold ClientApp declines both its training and its protocol steps (the client is absent
from the round, with that reason).

A fault drill (``fedlora.drill``, ``FEDLORA_DRILL_EXIT=STEP@ROUND``) makes the runtime kill
itself right after it answers that step of that round.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import secrets
import socket
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fedlora.compat import mismatch, stamp
from fedlora.drill import ANSWERING, Drills
from fedlora.flower import node_state
from fedlora.flower.protocol import join_frames, split_frames

if TYPE_CHECKING:
    from fedlora.engines.client import ClientRuntime
    from fedlora.engines.masking import MaskingClients

SOCKET, SECRET = "runtime.sock", "runtime.secret"
DEFAULT_LIMIT = 4 * 2**30  # bytes in one frame: a download or reply of a 1B-parameter model
THREADS = 1  # as a distributed rank (the reference runs with one thread too)


class FrameError(ValueError):
    """A frame or request outside the protocol; its text is the reason."""


# -- the work, warm or cold ---------------------------------------------------------------------
def build_runtime(text: str) -> ClientRuntime:
    """The client runtime of the experiment whose resolved config is ``text``."""
    from fedlora import experiment as experiments
    from fedlora.compute import configure_threads
    from fedlora.engines.client import ClientRuntime
    from fedlora.flower.app_dir import config_from_text
    from fedlora.session import configure_runtime

    with config_from_text(text) as (config, _):
        compute = experiments.validate(config)
        configure_threads(config.compute, THREADS)
        configure_runtime(compute)
        return ClientRuntime(experiments.build(config, deployed=True))


def _on_base(runtime: ClientRuntime, offset: bytes) -> None:
    """The base every party trains on: W0 + the merged offset (FLoRA), else W0."""
    from fedlora.engines.client import state_from_bytes

    runtime.exp.slots.restore_base()
    runtime.apply_offset(state_from_bytes(offset))


COLD_SECURE = (
    "secure aggregation needs the node's warm fedlora runtime (fedlora flower-node), which "
    "keeps the client's reply and keys between the protocol's messages; none answers"
)


def train(
    runtime: ClientRuntime, directory: Path, client: int, round_index: int, payload: bytes,
    offset: bytes, masking: MaskingClients | None = None,
) -> tuple[bytes, dict]:  # fmt: skip
    """One client's round on this node: its state as of the round, the runtime's answer, its
    state after (when it trained). Under secure aggregation the reply stays in ``masking``
    (the warm runtime's); without one (a cold ClientApp) the client declines the round."""
    if runtime.exp.config.privacy.secure_aggregation and masking is None:
        return b"", {"outcome": None, "reason": COLD_SECURE}
    _on_base(runtime, offset)
    runtime.stores[client], optimizer = node_state.load(directory, client, round_index)
    runtime.optimizers.pop(client, None)
    if optimizer:
        runtime.optimizers[client] = optimizer
    reply, report = runtime.answer(client, payload, round_index)
    if report["outcome"] is not None:
        store, kept = runtime.stores[client], runtime.optimizers.get(client, {})
        node_state.save(directory, client, store, kept, round_index + 1)
    if masking is not None and reply:
        from fedlora.channel import decode

        masking.hold(client, decode(reply), decode(payload), round_index)
        reply = b""
    return reply, report


def mask(
    masking: MaskingClients, clients: list[int], kind: str, round_index: int, payload: bytes
) -> tuple[dict, bytes]:
    """The node's clients' answers to one step of secure aggregation's protocol (``payload``:
    their messages, ``join_frames``): their reports, and their answers as frames."""
    try:
        messages = split_frames(payload, len(clients))
    except ValueError as error:
        raise FrameError(f"the step's messages: {error}") from None
    pairs = zip(clients, messages, strict=True)
    answers = [masking.respond(client, round_index, kind, message) for client, message in pairs]
    return {"reports": [report for _, report in answers]}, join_frames([a for a, _ in answers])


def evaluate(
    runtime: ClientRuntime, directory: Path, clients: list[int], round_index: int, offset: bytes
) -> dict[str, dict[str, float]]:
    """The node's clients' own models as of round ``round_index`` on the test set (methods
    that evaluate per client), and their adapters exported under ``directory``."""
    _on_base(runtime, offset)
    for client in clients:
        runtime.stores[client], _ = node_state.load(directory, client, round_index)
    metrics = {str(c): runtime.metrics(c) for c in clients}
    runtime.export(clients, directory)
    return metrics


# -- frames ---------------------------------------------------------------------------------------
def send_frames(connection: socket.socket, *frames: bytes) -> None:
    connection.sendall(join_frames(list(frames)))


def _exactly(connection: socket.socket, size: int) -> bytes:
    parts, left = [], size
    while left:
        chunk = connection.recv(min(left, 2**20))
        if not chunk:
            raise FrameError(f"the connection closed with {left} of {size} bytes unread")
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def recv_frames(connection: socket.socket, count: int, limit: int) -> list[bytes]:
    frames = []
    for _ in range(count):
        size = int.from_bytes(_exactly(connection, 8), "big")
        if size > limit:
            raise FrameError(f"a frame of {size} bytes exceeds the limit of {limit}")
        frames.append(_exactly(connection, size))
    return frames


def header_of(frame: bytes) -> dict:
    try:
        header = json.loads(frame)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise FrameError(f"the header is not JSON: {error}") from None
    if not isinstance(header, dict):
        raise FrameError(f"the header is {type(header).__name__}, not an object")
    return header


# -- the runtime --------------------------------------------------------------------------------
def step_of(request: dict) -> str | None:
    """The drill's name for what ``request`` asked (``fedlora.drill``)."""
    if request.get("op") == "train":
        return "train"
    if request.get("op") == "mask":
        return ANSWERING.get(str(request.get("kind")))
    return None


class NodeRuntime:
    """The runtime's side: requests one at a time (one model, CPU-bound work)."""

    def __init__(self, root: Path, limit: int = DEFAULT_LIMIT) -> None:
        self.root = root
        self.limit = limit
        self.drills = Drills()
        self.runtimes: dict[str, ClientRuntime] = {}  # by the digest of the config's text
        self.masking: dict[str, MaskingClients] = {}  # secure aggregation's, by run directory
        self.secret = ""

    def prepare(self) -> socket.socket:
        """The secret (a fresh one each start) and the listening socket, both mode 0600."""
        self.root.mkdir(parents=True, exist_ok=True)
        secret_path = self.root / SECRET
        self.secret = secrets.token_hex(32)
        descriptor = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.write(self.secret)
        os.chmod(secret_path, 0o600)
        path = self.root / SOCKET
        path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        previous = os.umask(0o177)  # the socket file is made 0600, never readable by others
        try:
            listener.bind(str(path))
        finally:
            os.umask(previous)
        os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
        listener.listen(8)
        return listener

    def serve(self, listener: socket.socket) -> None:
        """Answer ClientApps, one at a time, until the listener is closed."""
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:  # the listener was closed: the runtime is stopping
                return
            with connection:
                self.answer(connection)

    def answer(self, connection: socket.socket) -> None:
        try:
            header, text, payload, offset = recv_frames(connection, 4, self.limit)
            request = header_of(header)
            if not hmac.compare_digest(str(request.get("secret", "")), self.secret):
                raise FrameError("wrong secret: refused")
            why = mismatch("the ClientApp", request)
            if why is not None:  # a newer install beside a runtime still running the old one
                raise FrameError(f"{why}; restart fedlora flower-node")
            report, reply = self.work(request, text.decode(), payload, offset)
        except FrameError as error:
            with contextlib.suppress(OSError):
                send_frames(connection, json.dumps({"refused": str(error)}).encode(), b"")
            return
        except Exception as error:  # a failure of the work, reported to the ClientApp
            report, reply = {"error": f"{type(error).__name__}: {error}"}, b""
        with contextlib.suppress(OSError):
            send_frames(connection, json.dumps(report).encode(), reply)
        step, round_index = step_of(request), request.get("round")
        if step is not None and isinstance(round_index, int):
            self.drills.after(step, round_index)

    def work(self, request: dict, text: str, payload: bytes, offset: bytes) -> tuple[dict, bytes]:
        operation, directory = request.get("op"), request.get("directory")
        round_index = request.get("round")
        if not isinstance(directory, str) or not isinstance(round_index, int):
            raise FrameError("the header needs a directory (text) and a round (integer)")
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest not in self.runtimes:
            self.runtimes[digest] = build_runtime(text)
        runtime = self.runtimes[digest]
        masking = self.masking_of(runtime, directory)
        if operation == "train" and isinstance(request.get("client"), int):
            reply, report = train(
                runtime, Path(directory), request["client"], round_index, payload, offset, masking
            )
            return {"report": report}, reply
        clients = request.get("clients")
        if operation in ("evaluate", "mask") and isinstance(clients, list):
            if not all(isinstance(c, int) for c in clients):
                raise FrameError("clients must be integers")
            if operation == "evaluate":
                metrics = evaluate(runtime, Path(directory), clients, round_index, offset)
                return {"metrics": metrics}, b""
            return self._mask(masking, request, clients, round_index, payload)
        raise FrameError(
            f"unknown request {operation!r}: train (client), evaluate or mask (clients)"
        )

    def masking_of(self, runtime: ClientRuntime, directory: str) -> MaskingClients | None:
        """The run's secure aggregation parties on this node (None without it)."""
        from fedlora.engines.masking import MaskingClients, secure_aggregation
        from fedlora.engines.server_round import round_weights

        secure = secure_aggregation(runtime.exp)
        if secure is None:
            return None
        if directory not in self.masking:
            exp = runtime.exp
            self.masking[directory] = MaskingClients(exp, secure, lambda r: round_weights(exp, r))
        return self.masking[directory]

    @staticmethod
    def _mask(
        masking: MaskingClients | None, request: dict, clients: list[int], round_index: int,
        payload: bytes,
    ) -> tuple[dict, bytes]:  # fmt: skip
        from fedlora.engines.masking import KINDS

        kind = request.get("kind")
        if masking is None or kind not in KINDS:
            raise FrameError(f"a mask request needs secure aggregation and a kind of {KINDS}")
        return mask(masking, clients, kind, round_index, payload)


def run_runtime(root: Path, limit: int = DEFAULT_LIMIT) -> None:
    """``fedlora flower-runtime``: serve the node at ``root`` until stopped."""
    runtime = NodeRuntime(root, limit)
    listener = runtime.prepare()
    print(f"fedlora node runtime listening on {root / SOCKET}", flush=True)
    try:
        runtime.serve(listener)
    finally:
        listener.close()
        (root / SOCKET).unlink(missing_ok=True)


# -- the ClientApp's side ------------------------------------------------------------------------
class RuntimeAbsent(RuntimeError):
    """No runtime answers at the node's socket; the ClientApp works cold instead."""


def ask(
    root: Path, request: dict, text: str, payload: bytes, offset: bytes, timeout: float
) -> tuple[dict, bytes]:
    """The runtime's answer to ``request``; ``RuntimeAbsent`` if none listens (or it died
    before answering), a ``RuntimeError`` with its reason if it refused or failed."""
    try:
        secret = (root / SECRET).read_text()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(timeout)
            connection.connect(str(root / SOCKET))
            header = json.dumps({**request, **stamp(), "secret": secret}).encode()
            send_frames(connection, header, text.encode(), payload, offset)
            report, reply = recv_frames(connection, 2, DEFAULT_LIMIT)
    except (OSError, FrameError) as error:
        raise RuntimeAbsent(f"no fedlora runtime answers at {root / SOCKET} ({error})") from None
    answer = header_of(report)
    if "refused" in answer or "error" in answer:
        raise RuntimeError(f"the node's runtime: {answer.get('refused') or answer.get('error')}")
    return answer, reply


def wait_for(root: Path, process_alive: Callable[[], bool], timeout: float = 120) -> None:
    """Until the runtime at ``root`` listens (``process_alive()`` false: it died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (root / SOCKET).exists() and (root / SECRET).exists():
            return
        if not process_alive():
            raise RuntimeError(f"the fedlora runtime for {root} exited before it listened")
        time.sleep(0.1)
    raise TimeoutError(f"no fedlora runtime at {root / SOCKET} after {timeout:g} s")


def log(message: str) -> None:
    """A line in the node's log (the ClientApp's stderr goes there)."""
    print(f"fedlora: {message}", file=sys.stderr, flush=True)
