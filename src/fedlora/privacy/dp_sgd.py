"""DP-SGD (Abadi et al. 2016) for a client's local steps.

One private step over the tensors the method trains (whatever its ``trainable`` selects: LoRA
factors, the head, full-weight slots), with L = ``train.batch_size · train.grad_accum``:

1. a sample of the client's n rows, seeded by (run seed, round, client): ``poisson`` takes each
   row with probability q = L/n (a batch of variable size), ``fixed`` takes min(L, n) rows
   uniformly without replacement, each step independently of the others;
2. per-example gradients g_i = ∇ℓ(x_i) of those tensors only, with ``torch.func``:
   ``vmap(grad_and_value(loss))`` over the examples, the trained tensors the only inputs and the
   frozen base a constant; at most ``train.batch_size`` examples at a time (``grad_accum`` bounds
   memory here, it does not change what a step computes);
3. each g_i scaled to norm at most C = ``privacy.clip_norm``, the norm of all its tensors
   together: g_i · min(1, C / ‖g_i‖);
4. Σ_i clip(g_i) + N(0, (z·C)² I), z = ``privacy.noise_multiplier``, divided by min(L, n), the
   expected batch size: a public constant, so the division is post-processing;
5. the method's own optimizer step (AdamW, SGD, GaLore) on that gradient, plus the gradient of a
   data-independent regularizer (HetLoRA's), which is post-processing too.

Why not opacus' grad sampler: it computes per-example gradients with module hooks, and
meta-pytorch/opacus#820 reports silently wrong LoRA gradients with recent peft; ``vmap``
differentiates the model as it runs, and tests/test_privacy_dp.py checks it against one backward
pass per example.

Attention masks: Hugging Face's mask builders skip the mask with a Python test on the data
(``padding_mask.all()``) that ``vmap`` cannot trace, so each example gets a prepared 4-D boolean
SDPA mask (its key padding, and the causal triangle for decoders), which they pass through
unchanged. A model on another attention implementation is refused when its first private step
is built.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from fedlora.config import ConfigError, DpSampling
from fedlora.lazy import torch
from fedlora.privacy.noise import NoiseSeeds


@dataclass(frozen=True)
class DpSgd:
    """A run's resolved DP-SGD: the noise multiplier given or solved from ``target_epsilon``;
    ``causal_attention``: whether the model's attention masks are causal (decoders)."""

    clip_norm: float
    noise_multiplier: float
    sampling: DpSampling
    causal_attention: bool
    seeds: NoiseSeeds  # of the samples and the noise (``privacy.noise_source``)


def private_batches(
    kind: DpSampling, rows: list[int], batch: int, seed: int
) -> Iterator[list[int]]:
    """Endless independent samples of ``rows``, one per step (see the module docstring)."""
    rng = np.random.default_rng(seed)
    n = len(rows)
    while True:
        if kind == "poisson":
            chosen = np.flatnonzero(rng.random(n) < min(1.0, batch / n))
        else:
            chosen = rng.choice(n, size=min(batch, n), replace=False)
        yield [int(rows[i]) for i in chosen]


def example_mask(attention_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """One example's key-padding mask (length T) as the (1, 1, T, T) boolean SDPA mask: query
    i attends key j where j is not padding (and j ≤ i for a causal model)."""
    keys = attention_mask.bool()
    allowed = keys.unsqueeze(0).expand(keys.shape[0], -1)
    if causal:
        allowed = allowed & torch.ones_like(allowed).tril()
    return allowed[None, None]


class PerExampleGradients:
    """g_i of the chosen trainable tensors for every example of a batch (torch.func)."""

    def __init__(
        self,
        model: torch.nn.Module,
        params: Sequence[tuple[str, torch.nn.Parameter]],
        causal: bool,
    ):
        implementation = getattr(model.config, "_attn_implementation", None)
        if implementation != "sdpa":
            raise ConfigError(
                "privacy.mechanism 'dp_sgd': per-example gradients pass prepared SDPA attention "
                f"masks, and this model runs {implementation!r} attention"
            )
        chosen = {id(p) for _, p in params}
        named = [(name, p) for name, p in model.named_parameters() if id(p) in chosen]
        self.model = model
        self.causal = causal
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self._gradients = torch.func.vmap(
            torch.func.grad_and_value(self._loss), in_dims=(None, 0), randomness="different"
        )

    def _loss(self, tensors: dict[str, torch.Tensor], example: dict[str, torch.Tensor]):
        inputs = {k: v.unsqueeze(0) for k, v in example.items()}
        inputs["attention_mask"] = example_mask(example["attention_mask"], self.causal)
        return torch.func.functional_call(self.model, tensors, args=(), kwargs=inputs).loss

    def __call__(self, batch: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(per-example gradients, one (B, *shape) tensor per parameter in ``params`` order;
        per-example losses (B,))."""
        tensors = {name: p.detach() for name, p in zip(self.names, self.params, strict=True)}
        grads, losses = self._gradients(tensors, batch)
        return [grads[name] for name in self.names], losses.detach()


def clip_per_example(grads: Sequence[torch.Tensor], clip_norm: float) -> list[torch.Tensor]:
    """Each example's gradient (row i of every tensor together) scaled to norm ≤ clip_norm."""
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
    factors = (clip_norm / norms).clamp(max=1.0)  # a zero gradient: C/0 = inf, factor 1
    return [g * factors.view(-1, *[1] * (g.dim() - 1)) for g in grads]
