"""Dec-LoRA: local LoRA steps, then gossip of A and B with graph neighbours (algorithms.md §2.2).

Each node mixes A and B *separately* with the same weights, which keeps the network averages Ā
and B̄ exact but not the average product (§2.4, tested in T9). ``topology.mix_space = "products"``
is the DeCAF-like variant: a node mixes its neighbours' s·B·A and re-factorises to rank r by a
truncated SVD computed on the factors (``lora.weighted_product_svd``; the d×k product is never
formed). All nodes share r and s, so mixing B·A and mixing s·B·A give the same factors. The
classifier head is mixed with the same weights ([Recon], the paper is silent).

The optimizer (``train.optimizer``: ``sgd`` is Algorithm 1, ``adamw`` what reproductions use),
whether its state survives a round (``train.keep_optimizer_state``; reset by default) and K
(``train.local_steps`` or ``train.local_epochs``) come from ``[train]``.

``freeze_a = true`` is the rule of the decentralized LoRA code LuYuPromax/DFL-LORA (formerly
ConLoRA: its ``training_type = "ConLoRA"``, ``finetune/bert/client.py`` and ``server.py``; the
paper behind it was not found, so nothing here is checked against one). Every node holds the
common random A (the code copies node 1's A to every node; here it is the seeded PEFT init every
node already has) and never trains it; B is trained and mixed with the gossip weights, and the
head as plain Dec-LoRA's is ([Recon]; the code puts LoRA factors on its classifier layers
instead). With one A everywhere, Σ_j w_ij B_j A = (Σ_j w_ij B_j) A: the factor mix is exact on
the products, a doubly stochastic W keeps the network's mean of B and so the mean product B̄A
(mixing A and B separately does not, T9), and one mixing step contracts the consensus error of
B, hence of the products, by at most λ2. A never goes on the wire: a node sends B and the head
(the code mixes A too, a no-op on identical copies). Refused with it: ``topology.mix_space =
"products"``, whose SVD re-factorisation would move A (with A frozen the factor mix already is
the product mix). The code's other choices are ``[train]`` and ``[topology]`` settings here, not
defaults: Adam (lr 1e-3) kept across rounds (``train.keep_optimizer_state``), one local epoch a
round (``train.local_epochs = 1``), Metropolis-Hastings weights (``topology.mixing =
"metropolis"``).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from fedlora.channel import Schema
from fedlora.config import ConfigError
from fedlora.lora import normalized, weighted_average, weighted_product_svd
from fedlora.methods.base import MethodContext
from fedlora.methods.peer import PeerMethod
from fedlora.tensors import TensorDict


class DecLoRAOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    freeze_a: bool = Field(
        False, description="every node keeps the common random A frozen; only B and the head gossip"
    )


class DecLoRA(PeerMethod):
    name = "declora"
    summary = "decentralized LoRA: local steps, then neighbours mix A and B over a graph (Dec-LoRA)"
    Options = DecLoRAOptions

    def __init__(self, context: MethodContext, options: BaseModel) -> None:
        super().__init__(context, options)
        # freeze_a: the common A every node holds and never trains or sends.
        self.frozen: TensorDict = {}
        if isinstance(options, DecLoRAOptions) and options.freeze_a:  # (NoOptions: plain)
            if context.config.topology.mix_space == "products":
                raise ConfigError(
                    "topology.mix_space 'products': method declora with freeze_a keeps A fixed, "
                    "and the product mix re-factorises A; with A frozen the factor mix is "
                    "already exact on the products, use mix_space = 'factors'"
                )
            self.frozen = {m.a: context.initial[m.a] for m in context.modules}

    def trainable(self, name: str) -> bool:
        return name not in self.frozen

    def message_schema(self, shapes: Schema) -> Schema:
        """The adapter less a frozen A."""
        return {k: v for k, v in shapes.items() if k not in self.frozen}

    def client_reply(
        self, client: int, trained: TensorDict, message: TensorDict, store: TensorDict
    ) -> TensorDict:
        return {k: v for k, v in trained.items() if k not in self.frozen}

    def client_model(self, client: int, store: TensorDict) -> TensorDict | None:
        """The node's kept (mixed) tensors, with the frozen A if there is one."""
        own = super().client_model(client, store)
        return {**self.frozen, **own} if own is not None else None

    def _combine(self, states: list[TensorDict], weights: list[float], space: str) -> TensorDict:
        weights = normalized(weights)
        combined = weighted_average(states, weights)
        if space == "products":
            for module in self.context.modules:
                u, sigma, vh = weighted_product_svd(
                    [s[module.b] for s in states],
                    [s[module.a] for s in states],
                    weights,
                    module.rank,
                )
                # Gauge [Recon]: A = V_rᵀ (orthonormal rows, the O(1) scale of a LoRA init, and
                # still trainable if the mixed product is 0), B = U_r Σ_r.
                combined[module.b], combined[module.a] = u * sigma, vh
        return combined

    def mix(
        self, node: int, states: dict[int, TensorDict], weights: dict[int, float]
    ) -> TensorDict:
        order = sorted(states)
        return self._combine(
            [states[j] for j in order],
            [weights[j] for j in order],
            self.context.config.topology.mix_space,
        )

    def combine_network(self, states: list[TensorDict]) -> TensorDict:
        """Uniform mean over nodes (what gossip preserves), in factor or product space."""
        return self._combine(
            states, [1.0] * len(states), self.context.config.topology.average_model
        )
