"""Secure aggregation by pairwise masking (Bonawitz et al. 2017, "Practical Secure Aggregation
for Privacy-Preserving Machine Learning"): the server learns the sum of the clients' vectors
modulo 2^32 and nothing else about any one of them.

The four rounds of the paper's semi-honest protocol, every message a uint8 tensor dict that
crosses a ``Wire`` (the engine's channel, so its bytes are in the ledger):

0. AdvertiseKeys: client u sends two fresh X25519 public keys, c_u (to encrypt its share
   traffic) and s_u (to agree on masks); the server announces the roster U1 with everyone's.
1. ShareKeys: u draws a self-mask seed b_u and splits its mask private key and b_u into t-of-|U1|
   Shamir shares, one pair per client v, each sealed with AES-GCM under
   HKDF(X25519(c_u, c_v)) and routed through the server, which sees only ciphertexts. U2: the
   clients whose shares arrived.
2. MaskedInputCollection: u ∈ U2 sends
   y_u = x_u + PRG(b_u) + Σ_{v∈U2, v>u} PRG(s_uv) − Σ_{v∈U2, v<u} PRG(s_uv)  (mod 2^32),
   s_uv = HKDF(X25519(s_u, s_v)) the key both ends of a pair agree on, PRG the AES-256-CTR
   keystream (cryptographic; the engine's seeded generators are not). U3: the inputs that came.
3. Unmasking: each survivor v ∈ U3 sends its shares of b_u for u ∈ U3 and of the mask key of
   u ∈ U2 \\ U3 (never both for one client). The server rebuilds them from t shares, removes
   the self masks of U3 and the masks that U3 shares with the dropped, and Σ_{u∈U3} x_u is left.

Any step with fewer than t clients raises ``SecureAggregationError``: no sum rather than a
wrong one. Keys, seeds and polynomial coefficients come from the OS's cryptographic generator,
never from the run seed (which the server knows); the sum is still the same every run, since
the masks cancel exactly. Not implemented: the paper's signatures and consistency round
against a server that lies about who dropped (its active-adversary version).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedlora.channel import Channel, MessageError, Schema
from fedlora.privacy import shamir
from fedlora.tensors import TensorDict

KEY_BYTES = 32  # X25519 keys, AES-256 keys, self-mask seeds
ID_BYTES = 4  # a client index on the wire: uint32, little-endian
NONCE_BYTES, TAG_BYTES = 12, 16  # AES-GCM
SEALED_BYTES = NONCE_BYTES + 2 * shamir.SHARE_BYTES + TAG_BYTES  # one client's pair of shares

ADVERT_SCHEMA: Schema = {"cipher_key": (KEY_BYTES,), "mask_key": (KEY_BYTES,)}
ROSTER_SCHEMA: Schema = {
    "clients": (None, ID_BYTES),
    "cipher_keys": (None, KEY_BYTES),
    "mask_keys": (None, KEY_BYTES),
}


class SecureAggregationError(RuntimeError):
    """The round's sum cannot be recovered (too few clients at a step): the reason."""


# -- primitives ------------------------------------------------------------------------------
def derive_key(shared: bytes, purpose: str) -> bytes:
    """A 32-byte key from an X25519 shared secret, separate per purpose (HKDF-SHA256)."""
    info = f"fedlora secure aggregation: {purpose}".encode()
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def prg(key: bytes, length: int) -> np.ndarray:
    """``length`` uint32 words of the AES-256-CTR keystream of ``key``. The counter starts at
    zero: every key here is fresh for one round and expands to one stream only."""
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    stream = encryptor.update(bytes(4 * length)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32)


def agree(private: X25519PrivateKey, public: bytes, purpose: str) -> bytes:
    """The key both ends of a pair derive from X25519(own private, other's public)."""
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as error:
        raise MessageError(f"a peer's public key is unusable: {error}") from None
    return derive_key(shared, purpose)


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def secret_of(key: X25519PrivateKey) -> int:
    return int.from_bytes(key.private_bytes_raw(), "big")


def byte_tensor(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())


def rows(blobs: list[bytes], width: int) -> torch.Tensor:
    """Equal-length byte strings as the rows of a uint8 tensor (0 rows allowed)."""
    flat = np.frombuffer(b"".join(blobs), dtype=np.uint8).reshape(len(blobs), width)
    return torch.from_numpy(flat.copy())


def members_tensor(roster: list[int], members: Collection[int]) -> torch.Tensor:
    """Which clients of the roster belong to a set, as a 0/1 byte per roster position."""
    return torch.tensor([c in members for c in roster], dtype=torch.uint8)


def members_of(tensor: torch.Tensor, roster: list[int]) -> list[int]:
    flags = tensor.tolist()
    if any(flag not in (0, 1) for flag in flags):
        raise MessageError("a membership list must hold only 0 and 1")
    return [c for c, flag in zip(roster, flags, strict=True) if flag]


def words_tensor(words: np.ndarray) -> torch.Tensor:
    """uint32 words as their little-endian bytes (a flat uint8 tensor)."""
    return torch.from_numpy(np.asarray(words, dtype="<u4").view(np.uint8).copy())


def words_of(tensor: torch.Tensor) -> np.ndarray:
    """The inverse of ``words_tensor`` (whatever the tensor's shape)."""
    return np.ascontiguousarray(tensor.numpy()).reshape(-1).view("<u4").astype(np.uint32)


def point(client: int) -> int:
    """The Shamir evaluation point of a client (nonzero)."""
    return client + 1


# -- the two sides ---------------------------------------------------------------------------
class Client:
    """One client's side of one round: fresh keys and seed, the shares it holds for the others."""

    def __init__(self, index: int, threshold: int) -> None:
        self.index, self.threshold = index, threshold
        self.cipher_key = X25519PrivateKey.generate()
        self.mask_key = X25519PrivateKey.generate()
        self.seed = secrets.token_bytes(KEY_BYTES)  # b_u
        self.roster: list[int] = []  # U1, as the server announced it
        self.cipher_public: dict[int, bytes] = {}
        self.mask_public: dict[int, bytes] = {}
        self.sharers: list[int] = []  # U2
        self.held: dict[int, tuple[int, int]] = {}  # from u: (share of s_u, share of b_u)
        self.sealing_keys: dict[int, bytes] = {}  # the AES-GCM key of the shares with v

    def _share_key(self, peer: int) -> bytes:
        """The key sealing the shares between this client and ``peer`` (both directions; the
        associated data tells them apart)."""
        if peer not in self.sealing_keys:
            self.sealing_keys[peer] = agree(
                self.cipher_key, self.cipher_public[peer], "share encryption"
            )
        return self.sealing_keys[peer]

    def _aad(self, sender: int, receiver: int) -> bytes:
        return f"fedlora secure aggregation: shares {sender}->{receiver}".encode()

    def _enough(self, clients: list[int], what: str) -> None:
        if len(clients) < self.threshold:
            raise MessageError(f"{len(clients)} {what}, fewer than the threshold {self.threshold}")

    # round 0
    def advertise(self) -> TensorDict:
        return {
            "cipher_key": byte_tensor(public_bytes(self.cipher_key)),
            "mask_key": byte_tensor(public_bytes(self.mask_key)),
        }

    # round 1
    def share_keys(self, roster: TensorDict) -> TensorDict:
        """Check the roster, then seal a share of s_u and of b_u for every other client."""
        clients = words_of(roster["clients"]).tolist()
        counts = {len(clients), len(roster["cipher_keys"]), len(roster["mask_keys"])}
        if len(counts) != 1 or len(set(clients)) != len(clients) or self.index not in clients:
            raise MessageError("the roster must list distinct clients, this one among them")
        self._enough(clients, "clients on the roster")
        self.roster = clients
        for name, keys in (("cipher_keys", self.cipher_public), ("mask_keys", self.mask_public)):
            keys.update({c: bytes(k.numpy()) for c, k in zip(clients, roster[name], strict=True)})
        own = (self.cipher_public[self.index], self.mask_public[self.index])
        if own != (public_bytes(self.cipher_key), public_bytes(self.mask_key)):
            raise MessageError("the roster does not carry this client's own public keys")
        points = [point(c) for c in clients]
        key_shares = shamir.split(secret_of(self.mask_key), points, self.threshold)
        seed_shares = shamir.split(int.from_bytes(self.seed, "big"), points, self.threshold)
        sealed = []
        for c in clients:
            pair = key_shares[point(c)], seed_shares[point(c)]
            if c == self.index:
                self.held[c] = pair
                continue
            nonce = secrets.token_bytes(NONCE_BYTES)
            plain = shamir.to_bytes(pair[0]) + shamir.to_bytes(pair[1])
            box = AESGCM(self._share_key(c))
            sealed.append(nonce + box.encrypt(nonce, plain, self._aad(self.index, c)))
        return {"ciphertexts": rows(sealed, SEALED_BYTES)}

    def shares_schema(self) -> Schema:
        return {"members": (len(self.roster),), "ciphertexts": (None, SEALED_BYTES)}

    def receive_shares(self, message: TensorDict) -> None:
        """U2 and the others' sealed shares for this client, opened and kept."""
        sharers = members_of(message["members"], self.roster)
        senders = [c for c in sharers if c != self.index]
        if self.index not in sharers or len(message["ciphertexts"]) != len(senders):
            raise MessageError("the shares must come from the listed clients, this one among them")
        self._enough(sharers, "clients shared their keys")
        for sender, sealed in zip(senders, message["ciphertexts"], strict=True):
            blob = bytes(sealed.numpy())
            try:
                plain = AESGCM(self._share_key(sender)).decrypt(
                    blob[:NONCE_BYTES], blob[NONCE_BYTES:], self._aad(sender, self.index)
                )
                half = shamir.SHARE_BYTES
                self.held[sender] = shamir.from_bytes(plain[:half]), shamir.from_bytes(plain[half:])
            except (InvalidTag, ValueError):
                raise MessageError(f"the shares of client {sender} do not open") from None
        self.sharers = sharers

    # round 2
    def masked_input(self, encoded: np.ndarray) -> TensorDict:
        """y_u: the uint32 input plus its self mask and the pairwise masks with U2."""
        length = len(encoded)
        masked = encoded.astype(np.uint32) + prg(self.seed, length)
        for peer in self.sharers:
            if peer == self.index:
                continue
            mask = prg(agree(self.mask_key, self.mask_public[peer], "pairwise mask"), length)
            masked = masked + mask if peer > self.index else masked - mask
        return {"masked": words_tensor(masked)}

    def survivors_schema(self) -> Schema:
        return {"survivors": (len(self.roster),)}

    # round 3
    def unmask(self, message: TensorDict) -> TensorDict:
        """Shares of b_u for the survivors, of s_u for the dropped: never both for a client."""
        survivors = members_of(message["survivors"], self.roster)
        if self.index not in survivors or not set(survivors) <= set(self.sharers):
            raise MessageError("the survivors must have shared keys, this client among them")
        self._enough(survivors, "clients sent a masked input")
        dropped = [c for c in self.sharers if c not in survivors]
        width = shamir.SHARE_BYTES
        reply = {"seed_shares": rows([shamir.to_bytes(self.held[c][1]) for c in survivors], width)}
        if dropped:
            reply["key_shares"] = rows([shamir.to_bytes(self.held[c][0]) for c in dropped], width)
        return reply


class Server:
    """The server's side of one round: it routes, collects, and recovers only the sum."""

    def __init__(self, threshold: int, length: int) -> None:
        self.threshold, self.length = threshold, length
        self.cipher_public: dict[int, bytes] = {}
        self.mask_public: dict[int, bytes] = {}
        self.roster: list[int] = []  # U1
        self.sealed: dict[int, torch.Tensor] = {}  # u -> its ciphertexts, roster order minus u
        self.sharers: list[int] = []  # U2
        self.masked: dict[int, np.ndarray] = {}  # U3 -> y_u
        # v -> its shares of the survivors' seeds, and of the dropped clients' mask keys
        self.seed_shares: dict[int, list[int]] = {}
        self.key_shares: dict[int, list[int]] = {}
        self.chosen: list[int] = []  # the t clients whose shares rebuild the secrets
        self.weights: dict[int, int] = {}  # their Lagrange weights at 0

    def _enough(self, clients: Collection[int], what: str) -> None:
        if len(clients) < self.threshold:
            raise SecureAggregationError(
                f"secure aggregation: {len(clients)} clients {what}, fewer than the threshold "
                f"t = {self.threshold} (privacy.threshold); no sum this round"
            )

    # round 0
    def accept_keys(self, client: int, message: TensorDict) -> None:
        self.cipher_public[client] = bytes(message["cipher_key"].numpy())
        self.mask_public[client] = bytes(message["mask_key"].numpy())

    def roster_message(self) -> TensorDict:
        self.roster = sorted(self.mask_public)
        self._enough(self.roster, "advertised keys")
        return {
            "clients": words_tensor(np.array(self.roster)).reshape(-1, ID_BYTES),
            "cipher_keys": rows([self.cipher_public[c] for c in self.roster], KEY_BYTES),
            "mask_keys": rows([self.mask_public[c] for c in self.roster], KEY_BYTES),
        }

    # round 1
    def shares_schema(self) -> Schema:
        return {"ciphertexts": (len(self.roster) - 1, SEALED_BYTES)}

    def accept_shares(self, client: int, message: TensorDict) -> None:
        self.sealed[client] = message["ciphertexts"]

    def shares_messages(self) -> dict[int, TensorDict]:
        """For each v ∈ U2: who is in U2, and the ciphertexts the others sealed for v."""
        self.sharers = sorted(self.sealed)
        self._enough(self.sharers, "shared their keys")
        members = members_tensor(self.roster, self.sharers)
        position = {c: i for i, c in enumerate(self.roster)}
        messages = {}
        for v in self.sharers:
            # u's row for v: v's roster position, less one if u comes before v (u skips itself)
            sealed = [
                bytes(self.sealed[u][position[v] - (position[u] < position[v])].numpy())
                for u in self.sharers
                if u != v
            ]
            messages[v] = {"members": members, "ciphertexts": rows(sealed, SEALED_BYTES)}
        return messages

    # round 2
    def masked_schema(self) -> Schema:
        return {"masked": (4 * self.length,)}

    def accept_masked(self, client: int, message: TensorDict) -> None:
        self.masked[client] = words_of(message["masked"])

    def survivors_message(self) -> TensorDict:
        self._enough(self.masked, "sent a masked input")
        return {"survivors": members_tensor(self.roster, self.masked)}

    # round 3
    def unmasking_schema(self) -> Schema:
        dropped = len(self.sharers) - len(self.masked)
        schema: Schema = {"seed_shares": (len(self.masked), shamir.SHARE_BYTES)}
        if dropped:
            schema["key_shares"] = (dropped, shamir.SHARE_BYTES)
        return schema

    def accept_unmasking(self, client: int, message: TensorDict) -> None:
        try:
            seeds = [shamir.from_bytes(bytes(row.numpy())) for row in message["seed_shares"]]
            keys = [shamir.from_bytes(bytes(row.numpy())) for row in message.get("key_shares", [])]
        except ValueError as error:
            raise MessageError(str(error)) from None
        self.seed_shares[client], self.key_shares[client] = seeds, keys

    def _rebuild(self, client: int, answers: dict[int, list[int]], column: int) -> bytes:
        """The 32-byte secret of ``client``, column ``column`` of ``answers``, from the shares
        of the first t clients that answered (the same t for every secret of the round)."""
        shares = {point(v): answers[v][column] for v in self.chosen}
        try:
            return shamir.reconstruct(shares, self.weights).to_bytes(KEY_BYTES, "big")
        except OverflowError:
            raise SecureAggregationError(
                f"secure aggregation: the shares of client {client} do not rebuild a key"
            ) from None

    def total(self) -> np.ndarray:
        """Σ_{u∈U3} x_u mod 2^32: the masked inputs less the rebuilt masks."""
        self._enough(self.seed_shares, "answered the unmasking")
        self.chosen = sorted(self.seed_shares)[: self.threshold]
        self.weights = shamir.lagrange_at_zero([point(v) for v in self.chosen])
        survivors = sorted(self.masked)
        dropped = [u for u in self.sharers if u not in self.masked]
        total = np.zeros(self.length, dtype=np.uint32)
        for u in survivors:
            total += self.masked[u]
        for column, u in enumerate(survivors):
            total -= prg(self._rebuild(u, self.seed_shares, column), self.length)
        for column, u in enumerate(dropped):
            key = X25519PrivateKey.from_private_bytes(self._rebuild(u, self.key_shares, column))
            if public_bytes(key) != self.mask_public[u]:
                raise SecureAggregationError(
                    f"secure aggregation: the mask key of dropped client {u} rebuilt from the "
                    "shares does not match its public key (a share was wrong); no sum this round"
                )
            for v in survivors:  # y_v holds +PRG(s_uv) if u > v, −PRG(s_uv) if u < v
                mask = prg(agree(key, self.mask_public[v], "pairwise mask"), self.length)
                total = total - mask if u > v else total + mask
        return total


# -- a client's side, driven by its messages -----------------------------------------------------
# The protocol's steps: (its name, the server's message kind, the client's answer kind).
STEPS = (
    ("AdvertiseKeys", "begin", "advertise_keys"),
    ("ShareKeys", "roster", "share_keys"),
    ("MaskedInputCollection", "shares", "masked_input"),
    ("Unmasking", "survivors", "unmasking"),
)


class ClientParty:
    """One client's side of one protocol run, wherever the client lives: it answers each of
    the server's messages (``STEPS``) in turn. ``input_of`` gives its uint32 input from the
    run's opening message (``begin``: the parameters the input depends on, such as central
    DP's clip norm); ``leaves_after_masking``: it vanishes once its masked input is sent."""

    def __init__(
        self,
        index: int,
        threshold: int,
        input_of: Callable[[TensorDict], np.ndarray],
        begin_schema: Schema | None = None,
        leaves_after_masking: bool = False,
    ) -> None:
        self.client = Client(index, threshold)
        self.input_of = input_of
        self.begin_schema = begin_schema or {}
        self.begin: TensorDict = {}
        self.leaves_after_masking = leaves_after_masking

    def expect(self, kind: str) -> Schema:
        """What the server's message of ``kind`` must be."""
        if kind == "begin":
            return self.begin_schema
        if kind == "roster":
            return ROSTER_SCHEMA
        if kind == "shares":
            return self.client.shares_schema()
        return self.client.survivors_schema()

    def respond(self, kind: str, message: TensorDict) -> TensorDict | None:
        """The answer to the server's (validated) message of ``kind``; None once gone.
        Raises ``MessageError`` for a message whose content breaks the protocol."""
        client = self.client
        if kind == "begin":
            self.begin = message
            return client.advertise()
        if kind == "roster":
            return client.share_keys(message)
        if kind == "shares":
            client.receive_shares(message)
            return client.masked_input(self.input_of(self.begin))
        return None if self.leaves_after_masking else client.unmask(message)


# -- the server's side of one run ----------------------------------------------------------------
# A client's answer to one step: its message as the server accepted it, the reason it dropped
# (a refused or broken message), or None (it vanished without a word).
Answer = TensorDict | str | None


class Exchange(Protocol):
    """How one step's messages reach the clients and their answers come back: each client of
    ``messages`` gets its message of kind ``down`` (validated where the client lives) and
    answers with one of kind ``up``, which the server validates against ``expect``."""

    def __call__(
        self, down: str, up: str, messages: dict[int, TensorDict], expect: Schema
    ) -> dict[int, Answer]: ...


@dataclass(frozen=True)
class SecureSum:
    total: np.ndarray  # Σ x_u mod 2^32 over ``summed``
    summed: list[int]  # U3: the clients whose inputs are in the total
    absent: dict[int, str]  # clients the protocol lost, and why (refused messages)
    gone: list[int]  # clients of U3 that vanished before the unmasking (recovered)


def run_protocol(
    exchange: Exchange,
    participants: Iterable[int],
    senders: Collection[int],
    threshold: int,
    length: int,
    begin: Callable[[int], TensorDict] = lambda _: {},
) -> SecureSum:
    """The server's side of one run among ``participants`` over ``exchange``: ``senders`` are
    those expected to send an input (the others take part in rounds 0 and 1, then drop; their
    masks are recovered from the shares); ``begin``: each client's opening message. A client
    whose message is refused or breaks the protocol drops at that step. Raises
    ``SecureAggregationError`` when fewer than ``threshold`` clients remain at any step."""
    server = Server(threshold, length)
    absent: dict[int, str] = {}

    def step(index: int, messages: dict[int, TensorDict], expect: Schema) -> dict[int, TensorDict]:
        name, down, up = STEPS[index]
        answers = exchange(down, up, messages, expect)
        for u, answer in answers.items():
            if isinstance(answer, str):
                absent[u] = f"secure aggregation, {name}: {answer}"
        return {u: answer for u, answer in answers.items() if isinstance(answer, dict)}

    for u, message in step(0, {u: begin(u) for u in participants}, ADVERT_SCHEMA).items():
        server.accept_keys(u, message)
    roster = server.roster_message()
    for u, message in step(1, dict.fromkeys(server.roster, roster), server.shares_schema()).items():
        server.accept_shares(u, message)
    shares = server.shares_messages()
    sending = {u: shares[u] for u in server.sharers if u in senders}
    for u, message in step(2, sending, server.masked_schema()).items():
        server.accept_masked(u, message)
    survivors = server.survivors_message()
    unmasking = dict.fromkeys(sorted(server.masked), survivors)
    answered = step(3, unmasking, server.unmasking_schema())
    for u, message in answered.items():
        server.accept_unmasking(u, message)
    # Whoever sent a masked input is in the sum, whether it then vanished, failed or sent a
    # refused answer: its input is recovered from the others' shares, so it is not absent.
    gone = [u for u in unmasking if u not in answered]
    for u in gone:
        absent.pop(u, None)
    return SecureSum(server.total(), sorted(server.masked), absent, gone)


# -- every party in one process, over a wire ---------------------------------------------------
class Wire(Protocol):
    """How the protocol's messages travel between the server and client ``client``; each hop
    checks the message against ``expect`` at the receiver (``MessageError`` if refused)."""

    def up(self, client: int, kind: str, tensors: TensorDict, expect: Schema) -> TensorDict: ...

    def down(self, client: int, kind: str, tensors: TensorDict, expect: Schema) -> TensorDict: ...


@dataclass(frozen=True)
class ChannelWire:
    """The protocol's hops through a ``Channel``: uint8 messages in its ledger as
    ``secagg.<kind>``, between the parties named ``name(client)`` and ``server``."""

    channel: Channel
    round_index: int
    name: Callable[[int], str]
    server: str

    def up(self, client: int, kind: str, tensors: TensorDict, expect: Schema) -> TensorDict:
        return self._send(tensors, self.name(client), self.server, kind, expect)

    def down(self, client: int, kind: str, tensors: TensorDict, expect: Schema) -> TensorDict:
        return self._send(tensors, self.server, self.name(client), kind, expect)

    def _send(
        self, tensors: TensorDict, sender: str, receiver: str, kind: str, expect: Schema
    ) -> TensorDict:
        return self.channel.send(
            tensors, sender, receiver, self.round_index, expect, torch.uint8, f"secagg.{kind}"
        )


@dataclass(frozen=True)
class WireExchange:
    """Every client's party in this process, each message over ``wire``."""

    wire: Wire
    parties: Mapping[int, ClientParty]

    def __call__(
        self, down: str, up: str, messages: dict[int, TensorDict], expect: Schema
    ) -> dict[int, Answer]:
        answers: dict[int, Answer] = {}
        for u, message in messages.items():
            party = self.parties[u]
            try:
                answer = party.respond(down, self.wire.down(u, down, message, party.expect(down)))
                answers[u] = None if answer is None else self.wire.up(u, up, answer, expect)
            except MessageError as error:
                answers[u] = str(error)
        return answers


def secure_sum(
    wire: Wire,
    participants: Iterable[int],
    inputs: Mapping[int, np.ndarray],
    threshold: int,
    length: int,
    gone_after_masking: Collection[int] = (),
) -> SecureSum:
    """One run of the protocol among ``participants``, every party in this process, over
    ``wire``. ``inputs``: the uint32 vectors (``length`` words) of the clients that send one;
    a participant without an input takes part in rounds 0 and 1, then drops; one in
    ``gone_after_masking`` drops after sending its masked input (its input is in the sum)."""
    participants = list(participants)
    parties = {
        u: ClientParty(
            u, threshold, lambda _, u=u: inputs[u], leaves_after_masking=u in gone_after_masking
        )
        for u in participants
    }
    return run_protocol(WireExchange(wire, parties), participants, inputs, threshold, length)
