"""The engine's side of secure aggregation (``privacy.secure_aggregation``): the same round, with
replies that travel masked and reach the server only as their weighted mean.

Client side, per reply: ``prepare``, then the client's weight p_i = n_i / Σ_{sampled} n_j
(known before the round), then the fixed-point code. Server side: the unmasked sum over the
clients whose inputs arrived (U3), decoded and divided by Σ_{U3} p_i (the server knows the
weights and who is in the sum), which is exactly the plain engine's mean over the replies it
accepted, up to the quantization error n·2^(−f−1) / Σ_{U3} p_i per coordinate; then ``finish``.

With central DP (``privacy.mechanism = "central"``) nobody but the client sees its update, so
the client clips it: ``prepare`` masks Δ̃_i = clip(reply − sent, C) and, with adaptive clipping,
its bit b_i = 1[‖Δ_i‖ ≤ C] as one more coordinate (C is the server's current clip norm, which
the server sends each client in the protocol's opening message, ``begin``).
Central DP weighs the m sampled clients uniformly (p_i = 1/m), so the k summed inputs decode to
(Σ Δ̃_i / k, Σ b_i / k): ``finish`` multiplies by k and hands the two sums to
``CentralDP.release``, which adds the noise and divides by the fixed m, exactly what the server
does without secure aggregation (the same noise draws), up to the quantization error: ≤
k·2^(−f−1) per coordinate of Δ̄, and Σ b_i is an integer read back exactly (its error,
m·k·2^(−f−1), is below 1/2 while m·k < 2^f). A client that drops out adds a zero update, as
in the plain mean over m.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedlora.channel import MessageError, Schema
from fedlora.config import PrivacyConfig
from fedlora.privacy import fixed_point
from fedlora.privacy.central import CentralDP, clip_update
from fedlora.privacy.secagg import Exchange, run_protocol
from fedlora.robust import applied, update_of
from fedlora.tensors import TensorDict

UNCLIPPED = "privacy.unclipped"  # the coordinate that carries a client's adaptive-clipping bit
CLIP_NORM = "clip_norm"  # the opening message's one field under central DP


def default_threshold(clients: int) -> int:
    """t = ⌊2n/3⌋ + 1 for a round of n clients."""
    return 2 * clients // 3 + 1


def flatten(tensors: TensorDict) -> np.ndarray:
    """Every tensor, in name order, as one float64 vector."""
    return np.concatenate(
        [tensors[k].detach().to("cpu", torch.float64).reshape(-1).numpy() for k in sorted(tensors)]
    )


Shapes = dict[str, tuple[int, ...]]


def unflatten(vector: np.ndarray, shapes: Shapes) -> TensorDict:
    """The inverse of ``flatten`` (float32 tensors)."""
    tensors, start = {}, 0
    for name in sorted(shapes):
        shape = shapes[name]
        size = math.prod(shape)
        tensors[name] = torch.from_numpy(vector[start : start + size].reshape(shape)).float()
        start += size
    return tensors


def common_shapes(schemas: dict[int, Schema]) -> Shapes:
    """The one fully known schema every reply of the round shares (what a sum needs); a
    method that declares it needs only the sum of replies guarantees it."""
    distinct = {tuple(sorted(s.items())) for s in schemas.values()}
    shapes = {
        name: tuple(d for d in shape if d is not None)
        for name, shape in next(iter(schemas.values())).items()
    }
    if len(distinct) != 1 or distinct != {tuple(sorted(shapes.items()))}:
        raise RuntimeError("secure aggregation needs every reply of a round to share one schema")
    return shapes


@dataclass(frozen=True)
class SecureMean:
    mean: TensorDict  # Σ p_i x_i / Σ p_i over ``summed``, after ``finish``
    summed: list[int]
    absent: dict[int, str]  # clients whose input is not in the sum, and why
    gone: list[int]  # clients whose input is in the sum, who vanished before the unmasking


class SecureAggregation:
    """Secure aggregation under ``privacy``'s threshold and code, for rounds of ``round_size``
    clients (the default threshold's n); with ``central``, the server's central-DP mechanism,
    whose clipping moves to the clients."""

    def __init__(
        self, privacy: PrivacyConfig, round_size: int, central: CentralDP | None = None
    ) -> None:
        self.central = central
        self.bits = privacy.fixed_point_bits
        self.threshold = (
            privacy.threshold if privacy.threshold is not None else default_threshold(round_size)
        )

    def describe(self) -> str:
        return (
            f"Secure aggregation (Bonawitz et al. 2017): threshold t = {self.threshold}, "
            f"{self.bits} fractional bits mod 2^32 (per-coordinate error ≤ n·2^-{self.bits + 1} "
            "for n summands, divided by their total weight)."
            + (
                " Central DP: each client clips its own update (and masks its clipping bit); "
                "the server noises the unmasked sum."
                if self.central is not None
                else ""
            )
        )

    # -- the opening message: what a client's input depends on that only the server knows ---
    def begin(self) -> TensorDict:
        """Under central DP, the server's current clip norm (float64 bytes); else nothing."""
        if self.central is None:
            return {}
        norm = np.array([self.central.clip_norm], dtype="<f8").view(np.uint8)
        return {CLIP_NORM: torch.from_numpy(norm.copy())}

    def begin_schema(self) -> Schema:
        return {CLIP_NORM: (8,)} if self.central is not None else {}

    # -- client side -----------------------------------------------------------------------
    def prepare(self, reply: TensorDict, sent: TensorDict, begin: TensorDict) -> TensorDict:
        """What a client masks in place of its reply to ``sent``: the reply itself, or under
        central DP its update clipped to the clip norm of ``begin`` (and its bit, with
        adaptive clipping)."""
        if self.central is None:
            return reply
        norm = float(np.ascontiguousarray(begin[CLIP_NORM].numpy()).view("<f8")[0])
        if not (math.isfinite(norm) and norm > 0):
            raise MessageError(f"the clip norm must be a positive number, got {norm}")
        clipped, unclipped = clip_update(update_of(reply, sent), norm)
        if self.central.adaptive is not None:
            clipped[UNCLIPPED] = torch.tensor([float(unclipped)])
        return clipped

    def client_input(
        self, reply: TensorDict, sent: TensorDict, weight: float, summands: int, begin: TensorDict
    ) -> np.ndarray:
        """A client's uint32 input: its prepared reply, times its weight, in the fixed-point
        code for ``summands`` summands. ``MessageError`` if it cannot be coded."""
        try:
            vector = flatten(self.prepare(reply, sent, begin))
            return fixed_point.encode(vector, weight, self.bits, summands)
        except fixed_point.FixedPointError as error:
            raise MessageError(f"its reply cannot be masked: {error}") from None

    def shapes(self, schemas: dict[int, Schema]) -> Shapes:
        """The names and shapes of every masked input: the replies' common schema, and the
        bit's coordinate under adaptive central DP."""
        shapes = common_shapes(schemas)
        if self.central is not None and self.central.adaptive is not None:
            shapes[UNCLIPPED] = (1,)
        return shapes

    # -- server side -----------------------------------------------------------------------
    def finish(
        self, round_index: int, mean: TensorDict, summed: list[int], reference: TensorDict
    ) -> TensorDict:
        """What the method's server step gets from the unmasked mean of the ``summed`` clients:
        the mean itself, or under central DP ``reference`` (the state the server sent) plus
        the noised mean update."""
        if self.central is None:
            return mean
        count = len(summed)
        bits = mean.pop(UNCLIPPED, None)
        unclipped = round(float(bits.double().sum()) * count) if bits is not None else 0
        total = {k: v * count for k, v in mean.items()}
        return applied(self.central.release(round_index, total, unclipped), reference)

    def mean(
        self,
        round_index: int,
        exchange: Exchange,
        senders: dict[int, Schema],
        participants: list[int],
        weights: dict[int, float],
        reference: TensorDict,
    ) -> SecureMean:
        """One protocol run over ``exchange`` among ``participants`` (the clients that got the
        download): ``senders``, the clients that hold a reply, each with the schema the server
        expects of it (the others drop after ShareKeys); each input carries its client's
        weight of ``weights`` (over at least all participants); the unmasked sum becomes their
        weighted mean. ``reference``: what the server sent (central DP's updates are relative
        to it). Raises ``SecureAggregationError``."""
        shapes = self.shapes(senders)
        length = sum(math.prod(shape) for shape in shapes.values())
        begin = self.begin()
        outcome = run_protocol(
            exchange, participants, senders, self.threshold, length, lambda _: begin
        )
        total = sum(weights[c] for c in outcome.summed)
        mean = unflatten(fixed_point.decode(outcome.total, self.bits) / total, shapes)
        return SecureMean(
            self.finish(round_index, mean, outcome.summed, reference),
            outcome.summed,
            outcome.absent,
            outcome.gone,
        )
