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
"""

from __future__ import annotations

from fedlora.lora import normalized, weighted_average, weighted_product_svd
from fedlora.methods.peer import PeerMethod
from fedlora.tensors import TensorDict


class DecLoRA(PeerMethod):
    name = "declora"
    summary = "decentralized LoRA: local steps, then neighbours mix A and B over a graph (Dec-LoRA)"

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
