"""FSLoRA: a global rank-r LoRA, each client trains a random sketch of k_i of its components
(algorithms.md §5.1–5.2).

Per round and per (client, module) the server draws I_i ⊂ {1..r}, |I_i| = k_i, uniformly without
replacement (option ``share_across_modules``: one I_i per client); both halves derive it from
(seed, round, client, module). The client trains the rank-k_i LoRA (B[:, I_i], A[I_i, :]) with
scale s·r/k_i, which equals training W0 + s·B·S_i·A with S_i = (r/k_i)Σ_{j∈I_i} e_j e_jᵀ
(E[S_i] = I, §7 T8) step for step, and uploads the changes ΔB_i, ΔA_i of those k_i(d+k)
values. The index set rides along with the download (k_i floats per module) when k_i < r.

Server: D = (1/M)·Σ_i scatter(Δ_i, I_i) over the M clients of the round (the code's rule;
option ``normalization = "per_index_count"`` divides component j by how many clients drew it),
then ``plain`` x ← x + D (the paper) or ``adam`` (an AdamW step on −D, the released code).
The classifier head, trained by every client, is updated the same way.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, Field

from fedlora.channel import Schema
from fedlora.lazy import torch
from fedlora.lora import sketch_factors, sketch_indices
from fedlora.methods.base import Method, MethodContext
from fedlora.methods.factors import factors_of, head_of, pack, slot_state
from fedlora.privacy.central import summed
from fedlora.robust import clipped_updates, combine
from fedlora.server_optimizer import ServerKind, ServerOptimizer, ServerOptions
from fedlora.tensors import TensorDict
from fedlora.training import derived_seed

INDEX = ".sketch_index"  # suffix of the index-set tensor of a module in a download


class FSLoRAOptions(ServerOptions):
    server: ServerKind = Field(
        "plain", description="plain: x += D (paper); adam: AdamW on -D (code)"
    )
    normalization: Literal["clients", "per_index_count"] = Field(
        "clients",
        description="clients: divide by M (the code); per_index_count: by draws of each j",
    )
    share_across_modules: bool = Field(
        False, description="one index set per client for all modules"
    )


class FSLoRA(Method):
    name = "fslora"
    mean_of_replies = True  # a scatter mean: robust rules apply per drawn component
    summary = (
        "FSLoRA: global rank-r LoRA, clients train random k_i-of-r sketches (Fang et al. 2025)"
    )
    Options = FSLoRAOptions
    heterogeneous_ranks = True
    needs_each_reply = (
        "each reply holds the client's own sketched components I_i (its shape and place "
        "differ per client), scattered by the server"
    )
    sketched: ClassVar[bool] = True  # False: every client trains all r components

    def __init__(self, context: MethodContext, options: BaseModel) -> None:
        super().__init__(context, options)
        assert isinstance(options, FSLoRAOptions)
        self.options: FSLoRAOptions = options
        self.server = ServerOptimizer(
            context.initial, options.server, options, context.config.train.lr
        )

    def _budget(self, client: int) -> int:
        return self.context.rank(client) if self.sketched else self.context.config.lora.rank

    def _index(self, round_index: int, client: int, position: int) -> torch.Tensor:
        r, k = self.context.config.lora.rank, self._budget(client)
        if k == r:
            return torch.arange(r)
        where = 0 if self.options.share_across_modules else position
        seed = derived_seed(self.context.config.experiment.seed, round_index, client, where, 0x5C)
        return sketch_indices(r, k, torch.Generator().manual_seed(seed))

    def client_scales(self, client: int) -> dict[str, float] | None:
        r, k = self.context.config.lora.rank, self._budget(client)
        return None if k == r else {m.key: m.scale * r / k for m in self.context.modules}

    def server_message(self, client: int, round_index: int) -> TensorDict:
        modules, state = self.context.modules, self.server.values()
        message = head_of(state, modules)
        for position, m in enumerate(modules):
            index = self._index(round_index, client, position)
            message[m.b], message[m.a] = sketch_factors(state[m.b], state[m.a], index)
            if index.numel() < m.rank:
                message[m.key + INDEX] = index.float()
        return message

    def client_start(self, client: int, message: TensorDict, store: TensorDict) -> TensorDict:
        modules = self.context.modules
        head = {k: v for k, v in head_of(message, modules).items() if not k.endswith(INDEX)}
        return slot_state(factors_of(message, modules), head, modules)

    def expected_reply(self, client: int, message: TensorDict) -> Schema:
        """The sketched factors and head it was sent, as deltas; not the index sets."""
        return {k: tuple(v.shape) for k, v in message.items() if not k.endswith(INDEX)}

    def client_reply(
        self, client: int, trained: TensorDict, message: TensorDict, store: TensorDict
    ) -> TensorDict:
        """ΔB_i, ΔA_i of the k_i trained components and Δ of the head."""
        modules, k = self.context.modules, self._budget(client)
        reply = pack(factors_of(trained, modules, k), modules)
        reply.update(head_of(trained, modules))
        return {name: value - message[name] for name, value in reply.items()}

    @classmethod
    def central_dp_refusal(cls, options: BaseModel) -> str | None:
        if getattr(options, "normalization", "clients") == "per_index_count":
            return (
                "normalization 'per_index_count' divides a component by how many clients drew "
                "it, so one client's share of it can be all of it; use 'clients'"
            )
        return None

    def aggregate(
        self, round_index: int, replies: dict[int, TensorDict], weights: dict[int, float]
    ) -> None:
        rule = self.context.config.federation
        central = self.context.central
        if central is not None:  # each client's whole scattered update clipped, mean noised
            scattered = [self._scattered(round_index, c, replies[c]) for c in sorted(replies)]
            self.server.apply(central.mean_update(round_index, scattered))
            return
        if rule.aggregator == "norm_clip":  # bound each client's whole update, then as usual
            assert rule.clip_norm is not None
            order = sorted(replies)
            clipped = clipped_updates([replies[c] for c in order], None, rule.clip_norm)
            replies = dict(zip(order, clipped, strict=True))
        elif rule.aggregator != "mean":
            self.server.apply(self._robust_delta(round_index, replies))
            return
        clients = sorted(replies)
        total = summed([self._scattered(round_index, c, replies[c]) for c in clients])
        delta = {k: v / len(clients) for k, v in total.items()}
        if self.options.normalization == "per_index_count":
            for position, m in enumerate(self.context.modules):
                draws = torch.zeros(self.context.config.lora.rank)
                for c in clients:
                    draws[self._index(round_index, c, position)] += 1
                divisor = draws.clamp(min=1)
                delta[m.b], delta[m.a] = total[m.b] / divisor, total[m.a] / divisor[:, None]
        self.server.apply(delta)

    def _scattered(self, round_index: int, client: int, reply: TensorDict) -> TensorDict:
        """A client's update in the global shape: its k_i components at their drawn indices,
        zero elsewhere (the same norm as the reply, the indices being distinct)."""
        modules, state = self.context.modules, self.server.values()
        update = head_of(reply, modules)
        for position, m in enumerate(modules):
            index = self._index(round_index, client, position)
            update[m.b] = torch.zeros_like(state[m.b]).index_add_(1, index, reply[m.b])
            update[m.a] = torch.zeros_like(state[m.a]).index_add_(0, index, reply[m.a])
        return update

    def _robust_delta(self, round_index: int, replies: dict[int, TensorDict]) -> TensorDict:
        """The scatter mean under a coordinate-wise robust rule (median, trimmed mean): each
        component j of each module (column j of ΔB, row j of ΔA) is combined over the clients
        that drew it, the head over all of them (the replies are updates: no reference)."""
        modules, clients = self.context.modules, sorted(replies)
        rule = self.context.config.federation
        state = self.server.values()
        heads = [head_of(replies[c], modules) for c in clients]
        delta = combine(heads, [1.0] * len(clients), rule) if heads[0] else {}
        for position, m in enumerate(modules):
            delta[m.b], delta[m.a] = torch.zeros_like(state[m.b]), torch.zeros_like(state[m.a])
            drawn: dict[int, list[TensorDict]] = {}
            for c in clients:
                for column, j in enumerate(self._index(round_index, c, position).tolist()):
                    part = {"b": replies[c][m.b][:, column], "a": replies[c][m.a][column]}
                    drawn.setdefault(j, []).append(part)
            for j, parts in drawn.items():
                combined = combine(parts, [1.0] * len(parts), rule)
                delta[m.b][:, j], delta[m.a][j] = combined["b"], combined["a"]
        return delta

    def global_state(self) -> TensorDict:
        return {k: v.clone() for k, v in self.server.values().items()}

    def state_dict(self) -> TensorDict:
        return self.server.state_dict()

    def load_state_dict(self, state: TensorDict) -> None:
        self.server.load_state_dict(state)
