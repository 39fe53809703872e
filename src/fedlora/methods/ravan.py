"""RAVAN (Raje, Askin, Jhunjhunwala, Joshi, NeurIPS 2025, arXiv 2506.05568; no official code
known): a multi-head LoRA whose update is ΔW = Σ_{i=1..h} s_i B_i H_i A_i, with B_i and A_i
random, frozen and the same on every client, and only the r_h×r_h cores H_i and the scalars s_i
trained. Clients upload s_i H_i; the server averages them and sends the mean back as H_i with
s_i = 1 again.

Why averaging is exact: the bases are common, so Σ_k p_k Σ_i s_i^k B_i H_i^k A_i =
Σ_i B_i (Σ_k p_k s_i^k H_i^k) A_i, which is the model the server sends (H_i ← Σ_k p_k s_i^k H_i^k,
s_i ← 1). A client uploads h·r_h² floats per module (plus the head), and the h heads together
give an update of rank up to h·r_h, more than one LoRA of the same upload could reach.

Follows the paper (read as far as its abstract and published summaries): the sum of h heads
s_i B_i H_i A_i; B_i, A_i frozen random bases from a shared seed (never on the wire); H_i and s_i
the trained parameters; s_i H_i uploaded and averaged (weights by data size); s_i reset to 1 at
the server. The third-party implementation in FedLLM-Factory (``alg/ravan.py``) agrees on these
and on H_i = 0, s_i = 1 at the start.

Reconstructed (the paper's initialisation, head-selection and head-rank details were not
readable here), each stated so:

- The adapter's slot rank ``lora.rank`` is the total rank h·r_h, so the per-head rank is
  r_h = lora.rank / ``heads`` (``heads`` must divide it). To spend FedIT's upload at rank r on
  RAVAN, choose h·r_h² ≈ r(d + k). ``heads`` = 2 by default, the smallest split into several
  heads, valid for every even rank (FedLLM-Factory's default is 4; the paper's was not read).
- The bases: random with orthonormal columns (B_i) and rows (A_i), from the QR of a Gaussian
  drawn from ``lora.init_seed`` (else ``experiment.seed``) and the module's index; the heads'
  subspaces are mutually orthogonal where h·r_h ≤ the dimension, else each head is orthonormal on
  its own. Unscaled N(0, 1) bases (FedLLM-Factory's) make ‖B_i H A_i‖ grow like √(d·k) with the
  width; orthonormal ones keep ‖B_i H_i A_i‖_F = ‖H_i‖_F at any width, so ``train.lr`` and
  ``lora.alpha`` mean the same for every model.
- H_i = 0 and s_i = 1 at the start (ΔW = 0, as LoRA's B = 0), and the PEFT scale α/r stays a
  constant factor of the whole sum: ΔW = (α/r)·Σ_i s_i B_i H_i A_i.
- No head selection: every client trains every head (the paper's answer to heterogeneous
  compute is not reconstructed; ``[ranks]`` is refused).

The adapter on PEFT's LoRA slots: slot B = [s_1 B_1 H_1 | … | s_h B_h H_h] (d × h·r_h) and slot
A = [A_1; …; A_h] (h·r_h × k), so slot B · slot A = Σ_i s_i B_i H_i A_i and the exported adapter
is a standard PEFT LoRA adapter of rank h·r_h, as Fed-SB maps U·R onto the slots. Slot A is
frozen; the local optimizer (``head_optimizer``) trains H_i and s_i themselves through slot B,
mapping its gradient G_i (block i) to s_i B_iᵀ G_i for H_i and ⟨B_i H_i, G_i⟩ for s_i (the chain
rule, exact), stepping ``[train]``'s AdamW or SGD on them and writing slot B back. The reply
s_i H_i = B_iᵀ·(block i of slot B), exact since B_i has orthonormal columns.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fedlora.config import ConfigError, TrainConfig
from fedlora.lazy import torch
from fedlora.methods.base import MethodContext
from fedlora.methods.factors import head_of
from fedlora.methods.fedit import FedIT
from fedlora.tensors import LoraModule, TensorDict
from fedlora.training import derived_seed, standard_optimizer

CORES = ".ravan_H"  # suffix to a module key: its h cores, h × r_h × r_h
SCALES = ".ravan_s"  # suffix to a slot-B name: the optimizer's h scalars (never on the wire)
BASES_SEED = 0x7A5A  # stream of the shared random bases, apart from the PEFT init's


class RavanOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    heads: int = Field(2, ge=1, description="h, the number of heads; lora.rank = h × head rank")


def orthonormal_heads(dim: int, heads: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    """``heads`` random dim×rank bases with orthonormal columns (heads × dim × rank, float64):
    the Q of a Gaussian's QR with R's diagonal made positive (so Q is unique); jointly
    orthonormal (BᵢᵀBⱼ = 0 for i ≠ j) where heads·rank ≤ dim, else each head on its own."""
    gauss = torch.randn(dim, heads * rank, generator=generator, dtype=torch.float64)
    if heads * rank <= dim:
        q, r = torch.linalg.qr(gauss)
        q = q * torch.sign(torch.diagonal(r))
        return q.reshape(dim, heads, rank).permute(1, 0, 2).contiguous()
    blocks = gauss.reshape(dim, heads, rank).permute(1, 0, 2)
    q, r = torch.linalg.qr(blocks)
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(1)


def head_blocks(slot_b: torch.Tensor, heads: int) -> torch.Tensor:
    """Slot B (d × h·r_h) as its h column blocks (h × d × r_h)."""
    return slot_b.reshape(slot_b.shape[0], heads, -1).permute(1, 0, 2)


def slot_b_of(bases: torch.Tensor, cores: torch.Tensor) -> torch.Tensor:
    """Slot B = [B_1 C_1 | … | B_h C_h] from bases (h × d × r_h) and cores C_i (h × r_h × r_h)."""
    blocks = bases @ cores
    return blocks.permute(1, 0, 2).reshape(bases.shape[1], -1)


def slot_a_of(bases: torch.Tensor) -> torch.Tensor:
    """Slot A = [A_1; …; A_h] (h·r_h × k) from the A bases stored as h × k × r_h (A_iᵀ)."""
    return bases.transpose(1, 2).reshape(-1, bases.shape[1])


@cache
def head_optimizer() -> Callable[..., torch.optim.Optimizer]:
    """The class of RAVAN's local optimizer, made at first use: it subclasses
    ``torch.optim.Optimizer``, and defining it when the registry imports this module would
    load torch for every config check (``fedlora.lazy``)."""

    from fedlora.core_optimizer import SlotOptimizer

    class HeadOptimizer(SlotOptimizer):
        """Trains the cores H_i and scalars s_i of slot B = [s_i B_i H_i] through the slot;
        the inner optimizer holds H (h × r_h × r_h) and s (h) per module and the other
        tensors. H starts as B_iᵀ·(slot block i), s at 1."""

        def __init__(
            self,
            params: list[tuple[str, torch.nn.Parameter]],
            bases: dict[str, torch.Tensor],
            config: TrainConfig,
        ) -> None:
            super().__init__(params, config)
            self.bases = {
                p: bases[name].to(p.device, p.dtype) for name, p in params if name in bases
            }
            self.cores: dict[Any, torch.nn.Parameter] = {}
            self.scales: dict[Any, torch.nn.Parameter] = {}
            inner: list[tuple[str, torch.nn.Parameter]] = []
            for name, p in params:
                if p not in self.bases:
                    inner.append((name, p))
                    continue
                u = self.bases[p]
                blocks = head_blocks(p.detach(), u.shape[0])
                self.cores[p] = torch.nn.Parameter(u.transpose(1, 2) @ blocks)
                self.scales[p] = torch.nn.Parameter(p.new_ones(u.shape[0]))
                inner += [(name, self.cores[p]), (name + SCALES, self.scales[p])]
            self.inner = standard_optimizer(inner, config)

        @torch.no_grad()
        def step(self, closure: Callable[[], float] | None = None) -> None:
            self.sync_learning_rates()
            for p, u in self.bases.items():
                core, scale = self.cores[p], self.scales[p]
                if p.grad is None:
                    core.grad = scale.grad = None
                    continue
                grads = head_blocks(p.grad, u.shape[0])  # G_i
                core.grad = scale[:, None, None] * (u.transpose(1, 2) @ grads)
                scale.grad = ((u @ core) * grads).sum(dim=(1, 2))
            self.inner.step()
            for p, u in self.bases.items():
                p.copy_(slot_b_of(u, self.scales[p][:, None, None] * self.cores[p]))

    return HeadOptimizer


class Ravan(FedIT):
    """FedIT's server loop over the cores s_i H_i; the bases never leave the seed."""

    name = "ravan"
    summary = (
        "RAVAN: h heads s_i·B_i·H_i·A_i, random frozen bases; train and average s_i·H_i (2025)"
    )
    Options = RavanOptions

    def __init__(self, context: MethodContext, options: BaseModel) -> None:
        heads = options.heads
        rank = context.config.lora.rank
        if rank % heads:
            raise ConfigError(
                f"method.heads {heads}: method ravan splits the slot rank lora.rank = {rank} "
                "into equal heads; choose heads dividing lora.rank"
            )
        super().__init__(context, options)
        self.heads, self.head_rank = heads, rank // heads
        lora = context.config.lora
        seed = lora.init_seed if lora.init_seed is not None else context.config.experiment.seed
        # Per module key: B bases (h × d_out × r_h) and A bases as A_iᵀ (h × d_in × r_h).
        self.bases_b: TensorDict = {}
        self.bases_a: TensorDict = {}
        for index, m in enumerate(context.modules):
            generator = torch.Generator().manual_seed(derived_seed(seed, BASES_SEED, index))
            self.bases_b[m.key] = self._bases(m, m.d_out, generator)
            self.bases_a[m.key] = self._bases(m, m.d_in, generator)
        self.frozen = {m.a for m in context.modules}
        self.state = {
            **head_of(self.state, context.modules),
            **{
                m.key + CORES: torch.zeros(heads, self.head_rank, self.head_rank)
                for m in context.modules
            },
        }

    def _bases(self, module: LoraModule, dim: int, generator: torch.Generator) -> torch.Tensor:
        if self.head_rank > dim:
            raise ConfigError(
                f"lora.rank {module.rank}: method ravan's heads have rank {self.head_rank}, "
                f"more than {module.key}'s dimension {dim}; use more heads or a smaller rank"
            )
        return orthonormal_heads(dim, self.heads, self.head_rank, generator).float()

    def slot_state(self, message: TensorDict) -> TensorDict:
        """The PEFT slots of the model whose cores (s_i H_i, s_i = 1) ``message`` holds: slot B
        = [B_i H_i], slot A = [A_i], and the head."""
        state = {k: v for k, v in message.items() if not k.endswith(CORES)}
        for m in self.context.modules:
            state[m.b] = slot_b_of(self.bases_b[m.key], message[m.key + CORES])
            state[m.a] = slot_a_of(self.bases_a[m.key])
        return state

    def global_state(self) -> TensorDict:
        return self.slot_state(self.state)

    # -- client ----------------------------------------------------------------------------
    def client_start(self, client: int, message: TensorDict, store: TensorDict) -> TensorDict:
        return self.slot_state(message)

    def trainable(self, name: str) -> bool:
        return name not in self.frozen

    def local_optimizer(
        self, params: list[tuple[str, torch.nn.Parameter]], config: TrainConfig
    ) -> torch.optim.Optimizer:
        bases = {m.b: self.bases_b[m.key] for m in self.context.modules}
        return head_optimizer()(params, bases, config)

    def client_reply(
        self, client: int, trained: TensorDict, message: TensorDict, store: TensorDict
    ) -> TensorDict:
        """s_i H_i = B_iᵀ (block i of slot B) per module, and the head."""
        reply = head_of(trained, self.context.modules)
        for m in self.context.modules:
            u = self.bases_b[m.key]
            reply[m.key + CORES] = u.transpose(1, 2) @ head_blocks(trained[m.b], self.heads)
        return reply
