"""Cloud–edge split execution of LoRA (algorithms.md §3.1): the cloud runs the frozen base, the
user's device (the edge) holds the LoRA factors, the head, the labels and the loss.

Per training step, for every *active* module m at a frozen linear y = W0 x (+ bias):

    forward   cloud --x-->      edge    edge computes u = s·B_m A_m x
              cloud <--u--      edge    cloud continues with y + u
    backward  cloud --g_y-->    edge    edge computes ∇A_m, ∇B_m (its own autograd graph)
              cloud <--g_x--    edge    g_x = s·A_mᵀB_mᵀ g_y, added by autograd to W0ᵀ g_y

plus, once per step, the word embeddings (and the attention mask) up, the head input (or the
logits, ``head_on = "cloud"``) down and its gradient up. Every one of these tensors is a real
safetensors message through a ``Channel``; the link logs its float count (what the §1.4
formula counts) and its serialized bytes, per step and module.

The cloud side is forward hooks on the frozen ``nn.Linear``s of an ordinary model plus one
autograd Function, so with every module active the loss and gradients are those of monolithic
LoRA training (test T11). The hooks exist only inside ``CloudModel.forward``: outside it the
model is untouched, so the same base can serve evaluation and other users.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

from fedlora.channel import Channel
from fedlora.compute import Compute, on_cpu
from fedlora.dlora.flops import head_flops, lora_backward_flops, lora_forward_flops
from fedlora.dlora.protocol import HeadOn, KilledForward
from fedlora.models import ModelSpec
from fedlora.tensors import LoraModule, TensorDict

CLOUD = "server"  # the cloud is the ledger's server side: "up" = edge -> cloud
CPU_DEVICE = torch.device("cpu")
PEFT_PREFIX = "base_model.model."


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """s·B(Ax), in PEFT's order of operations so the split matches it to the last bit."""
    return F.linear(F.linear(x, a), b) * scale


@dataclass(frozen=True)
class Traffic:
    """One message: ``module`` is the module key, or "" for the per-step base crossings."""

    step: int
    module: str
    kind: str  # x, u, grad_y, grad_x, embeddings, hidden, grad_hidden, logits, grad_logits, factors
    direction: Literal["down", "up"]  # down: cloud -> edge
    values: int  # floats carried: the §1.4 formula counts these (x 4 bytes in float32)
    bytes: int  # serialized bytes actually sent


@dataclass
class _Pending:
    """The edge's own graph of one module call, kept until its backward arrives."""

    input: torch.Tensor
    output: torch.Tensor


class EdgeAdapters:
    """One user's device: LoRA factors (A_m, B_m), the output head, labels and loss.

    ``state`` is keyed like PEFT's adapter state dict (``<module>.lora_A.weight`` ...), the
    same wire format every method uses, so it exports as a PEFT adapter unchanged. The word
    embeddings and a frozen head are the device's own copies of public weights; in simulation
    they are the base model's modules themselves (read only).
    """

    def __init__(
        self,
        modules: list[LoraModule],
        state: TensorDict,
        embeddings: torch.nn.Module,
        head: torch.nn.Module,
        head_prefix: str | None,
        task: str,
        dropout: float = 0.0,
        device: torch.device = CPU_DEVICE,
    ) -> None:
        self.modules = {m.key: m for m in modules}
        self.device = device
        self.params = {
            k: torch.nn.Parameter(v.detach().to(device, torch.float32, copy=True))
            for k, v in state.items()
        }
        self.embeddings = embeddings
        trained = (
            {}
            if head_prefix is None
            else {
                k.removeprefix(head_prefix): p
                for k, p in self.params.items()
                if k.startswith(head_prefix)
            }
        )
        self.head_weight = trained.get("weight", head.weight)
        self.head_bias = trained.get("bias", head.bias)
        self.task = task
        self.dropout = dropout

    def state(self) -> TensorDict:
        return {k: p.detach().to("cpu", copy=True) for k, p in self.params.items()}

    def load(self, state: TensorDict) -> None:
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(state[k])

    def flat(self, key: str) -> torch.Tensor:
        """Module ``key``'s parameters as one vector (what Kill-and-Revive measures)."""
        m = self.modules[key]
        return torch.cat([self.params[m.a].detach().flatten(), self.params[m.b].detach().flatten()])

    def factors(self, key: str) -> TensorDict:
        m = self.modules[key]
        return {"A": self.params[m.a].detach(), "B": self.params[m.b].detach()}

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings(input_ids)

    def module_forward(
        self, key: str, x: torch.Tensor, train: bool
    ) -> tuple[torch.Tensor, _Pending | None]:
        """u = s·B A x; with ``train`` the edge keeps the graph for the coming backward."""
        m = self.modules[key]
        a, b = self.params[m.a], self.params[m.b]
        if not train:
            with torch.no_grad():
                return lora_delta(x, a, b, m.scale), None
        x = x.requires_grad_(True)
        with torch.enable_grad():
            dropped = F.dropout(x, self.dropout) if self.dropout else x
            u = lora_delta(dropped, a, b, m.scale)
        return u.detach(), _Pending(x, u)

    def module_backward(self, pending: _Pending, grad_y: torch.Tensor) -> torch.Tensor:
        """Accumulate ∇A, ∇B and return the input-gradient contribution s·AᵀBᵀ g_y."""
        torch.autograd.backward(pending.output, grad_y)
        assert pending.input.grad is not None
        return pending.input.grad

    def loss(
        self, received: torch.Tensor, labels: torch.Tensor, from_logits: bool, weight: float = 1.0
    ) -> tuple[float, torch.Tensor]:
        """The private loss from the head input (or logits); returns it and ∂L/∂received,
        and leaves the head's gradient in its parameters when the device trains the head."""
        received = received.requires_grad_(True)
        with torch.enable_grad():
            logits = (
                received if from_logits else F.linear(received, self.head_weight, self.head_bias)
            )
            if self.task == "causal":
                loss = ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1])
            else:
                loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.view(-1))
            (loss * weight).backward()
        assert received.grad is not None
        return loss.item(), received.grad

    def head_trained(self) -> bool:
        return isinstance(self.head_weight, torch.nn.Parameter) and self.head_weight.requires_grad


class CloudEdgeLink:
    """The wire between the cloud and one user's device, plus the cloud's per-user state.

    It carries every crossing through the channel and logs it; ``active`` is the device's
    current active set (Kill-and-Revive decides it) and ``cloud_factors`` the frozen factors
    of killed modules the device uploaded under option (a) (``killed_forward = "cloud"``).
    """

    def __init__(
        self,
        user: str,
        edge: EdgeAdapters,
        channel: Channel,
        killed_forward: KilledForward = "cloud",
        cloud_device: torch.device = CPU_DEVICE,
    ) -> None:
        self.user = user
        self.edge = edge
        self.channel = channel
        self.killed_forward = killed_forward
        self.active: set[str] = set(edge.modules)
        self.cloud_factors: dict[str, TensorDict] = {}
        self.log: list[Traffic] = []
        self.step = 0
        self.round = 0
        self.flops = {"modules": 0, "head": 0}
        # Where each direction's receiver computes: down -> the device, up -> the cloud.
        self.devices: dict[str, torch.device] = {"down": edge.device, "up": cloud_device}

    def place(self, tensors: TensorDict, direction: Literal["down", "up"]) -> TensorDict:
        """Decoded (CPU) tensors onto the receiver's device."""
        where = self.devices[direction]
        if where.type == "cpu":
            return tensors
        return {name: t.to(where) for name, t in tensors.items()}

    def begin_step(self, step: int, round_index: int) -> None:
        self.step, self.round = step, round_index
        self.flops = {"modules": 0, "head": 0}

    def parties(self, direction: Literal["down", "up"]) -> tuple[str, str]:
        """(sender, receiver) in the ledger's names."""
        return (CLOUD, self.user) if direction == "down" else (self.user, CLOUD)

    def send(
        self, tensors: TensorDict, kind: str, module: str, direction: Literal["down", "up"]
    ) -> TensorDict:
        sender, receiver = self.parties(direction)
        expect = {name: tuple(t.shape) for name, t in tensors.items()}
        received = self.channel.send(tensors, sender, receiver, self.round, expect)
        self.note(kind, module, direction, tensors, self.channel.ledger.records[-1].bytes)
        return self.place(received, direction)

    def note(
        self,
        kind: str,
        module: str,
        direction: Literal["down", "up"],
        tensors: TensorDict,
        sent: int,
    ) -> None:
        """Log one message (its floats and serialized bytes) for the step's accounting."""
        values = sum(t.numel() for t in tensors.values())
        self.log.append(Traffic(self.step, module, kind, direction, values, sent))

    def send_one(
        self, tensor: torch.Tensor, kind: str, module: str, direction: Literal["down", "up"]
    ) -> torch.Tensor:
        return self.send({kind: tensor}, kind, module, direction)[kind]

    # -- the device's halves (the edge runs these wherever the cloud is) ----------------------
    def edge_embed(self, batch: dict[str, torch.Tensor]) -> TensorDict:
        """The step's first message: word embeddings and the attention mask."""
        return {
            "embeddings": self.edge.embed(batch["input_ids"]),
            "attention_mask": batch["attention_mask"].float(),
        }

    def edge_forward(
        self, key: str, x: torch.Tensor, train: bool
    ) -> tuple[torch.Tensor, _Pending | None]:
        """u = s·B A x on the device, counted in the step's device FLOPs."""
        u, pending = self.edge.module_forward(key, x, train)
        self.flops["modules"] += lora_forward_flops(self.edge.modules[key], _tokens(x))
        return u, pending

    def edge_backward(self, key: str, pending: _Pending, grad_y: torch.Tensor) -> torch.Tensor:
        """∇A, ∇B into the device's parameters; returns s·AᵀBᵀ g_y (counted FLOPs)."""
        grad_x = self.edge.module_backward(pending, grad_y)
        self.flops["modules"] += lora_backward_flops(self.edge.modules[key], _tokens(grad_y))
        return grad_x

    def edge_loss(
        self, received: torch.Tensor, labels: torch.Tensor, head_on: HeadOn, weight: float
    ) -> tuple[float, torch.Tensor]:
        """The private loss from what the cloud sent down, and its gradient to send back."""
        edge = self.edge
        loss, grad = edge.loss(received, labels, from_logits=head_on == "cloud", weight=weight)
        if head_on == "edge":
            rows = _tokens(received)
            self.flops["head"] += head_flops(
                rows, received.shape[-1], edge.head_weight.shape[0], edge.head_trained()
            )
        return loss, grad

    # -- per module: the round trips the cloud makes ------------------------------------------
    def module_delta(
        self, key: str, x: torch.Tensor, train: bool = True
    ) -> tuple[torch.Tensor, _Pending | None]:
        """x down, u up; with ``train`` the device keeps the graph for ``module_grad``."""
        x_edge = self.send_one(x, "x", key, "down")
        u, pending = self.edge_forward(key, x_edge, train)
        return self.send_one(u, "u", key, "up"), pending

    def module_grad(self, key: str, pending: _Pending, grad_y: torch.Tensor) -> torch.Tensor:
        grad_edge = self.send_one(grad_y, "grad_y", key, "down")
        return self.send_one(self.edge_backward(key, pending, grad_edge), "grad_x", key, "up")

    # -- killed modules ----------------------------------------------------------------------
    def killed_delta(self, key: str, x: torch.Tensor) -> torch.Tensor | None:
        """A killed module's forward contribution: (a) the cloud's frozen copy, (b) computed on
        the device without backward, (c) none."""
        if self.killed_forward == "cloud":
            factors = self.cloud_factors[key]
            return lora_delta(x, factors["A"], factors["B"], self.edge.modules[key].scale)
        if self.killed_forward == "edge":
            return self.module_delta(key, x.detach(), train=False)[0]
        return None

    def kill(self, key: str) -> None:
        self.active.discard(key)
        if self.killed_forward == "cloud":
            self.cloud_factors[key] = self.send(self.edge.factors(key), "factors", key, "up")

    def revive(self, key: str) -> None:
        self.active.add(key)
        self.cloud_factors.pop(key, None)

    def restore(self, active: set[str]) -> None:
        """After a resume: the active set, and the cloud's copies of killed factors as the
        cloud saved them (equal to the device's frozen ones, so nothing is sent again)."""
        self.active = set(active)
        self.cloud_factors = {}
        if self.killed_forward == "cloud":
            self.cloud_factors = {
                k: self.edge.factors(k) for k in self.edge.modules if k not in active
            }


def _tokens(x: torch.Tensor) -> int:
    """Rows the device multiplies: every position of the padded batch."""
    return x.numel() // x.shape[-1]


class _HeadReached(Exception):
    """Stops the cloud's forward at the output head and carries the head's input."""

    def __init__(self, tensor: torch.Tensor) -> None:
        super().__init__()
        self.tensor = tensor


def _stop_at_head(module: torch.nn.Module, args: tuple) -> None:
    raise _HeadReached(args[0])


class _EdgeModule(torch.autograd.Function):
    """The cloud's view of an active module: forward and backward are each a round trip to
    the device. ``anchor`` makes the output require grad even where x does not (the first
    layer), so the device's backward is always reached."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, anchor: torch.Tensor, link: CloudEdgeLink, key: str
    ) -> torch.Tensor:  # type: ignore[override]
        u, pending = link.module_delta(key, x)
        ctx.link, ctx.key, ctx.pending = link, key, pending
        return u

    @staticmethod
    def backward(ctx, grad_u: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:  # type: ignore[override]
        grad_x = ctx.link.module_grad(ctx.key, ctx.pending, grad_u.contiguous())
        ctx.pending = None
        return (grad_x if ctx.needs_input_grad[0] else None), None, None, None


def _edge_copy(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``module`` itself if it already sits on ``device`` in float32, else a float32 copy there."""
    weight = next(module.parameters())
    if weight.device == device and weight.dtype == torch.float32:
        return module
    return copy.deepcopy(module).to(device, torch.float32)


def output_head(model: torch.nn.Module, spec: ModelSpec) -> torch.nn.Module:
    if spec.task == "causal":
        return model.get_output_embeddings()
    assert spec.head is not None
    return model.get_submodule(spec.head)


class CloudModel:
    """The frozen base on the cloud, shared by every user: one set of weights, and forward
    hooks at each adapted linear that route through whichever user's link is being served.

    ``model`` is a plain transformers model, or the base inside a PEFT wrapper with ``plain``
    its ``disable_adapter`` (then the hooks sit on PEFT's ``base_layer``s, and the wrapper's
    own LoRA path is off while the cloud serves).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        spec: ModelSpec,
        modules: list[LoraModule],
        plain: Callable[[], AbstractContextManager] = nullcontext,
        compute: Compute | None = None,
    ) -> None:
        self.model = model
        self.compute = compute or on_cpu()  # the cloud's device and compute dtype
        self.spec = spec
        self.modules = {m.key: m for m in modules}
        self.linears: dict[str, torch.nn.Module] = {}
        for m in modules:
            layer = model.get_submodule(m.key.removeprefix(PEFT_PREFIX))
            self.linears[m.key] = getattr(layer, "base_layer", layer)
        self.head = output_head(model, spec)
        self.plain = plain

    def edge(self, state: TensorDict, dropout: float = 0.0) -> EdgeAdapters:
        """A new user's device (on ``compute.edge_device``), starting from ``state`` (PEFT wire
        format). Its embeddings and frozen head are the base's own modules where the device
        computes like the cloud, else float32 copies on the device (public weights)."""
        device = self.compute.edge_device
        return EdgeAdapters(
            list(self.modules.values()),
            state,
            _edge_copy(self.model.get_input_embeddings(), device),
            _edge_copy(self.head, device),
            f"{PEFT_PREFIX}{self.spec.head}." if self.spec.head else None,
            self.spec.task,
            dropout,
            device,
        )

    def _route(
        self,
        link: CloudEdgeLink,
        key: str,
        anchor: torch.Tensor,
        layer: torch.nn.Module,
        args: tuple,
        output: torch.Tensor,
    ) -> torch.Tensor:
        x = args[0]
        if key in link.active:
            return output + _EdgeModule.apply(x, anchor, link, key)
        delta = link.killed_delta(key, x)
        return output if delta is None else output + delta

    @contextmanager
    def _serving(self, link: CloudEdgeLink, head_on: HeadOn) -> Iterator[None]:
        anchor = torch.zeros((), requires_grad=True)
        handles = [
            layer.register_forward_hook(partial(self._route, link, key, anchor))
            for key, layer in self.linears.items()
        ]
        if head_on == "edge":
            handles.append(self.head.register_forward_pre_hook(_stop_at_head))
        try:
            with self.plain():
                yield
        finally:
            for handle in handles:
                handle.remove()

    def forward(
        self, link: CloudEdgeLink, embeds: torch.Tensor, mask: torch.Tensor, head_on: HeadOn
    ) -> torch.Tensor:
        """The base from the word embeddings up to the head input (or the logits). The
        embeddings arrive as float32 (the wire's type) and continue in the base's own storage
        dtype, as in the monolithic model."""
        embeds = embeds.to(self.model.dtype)
        try:
            with self._serving(link, head_on), self.compute.autocast():
                output = self.model(inputs_embeds=embeds, attention_mask=mask)
        except _HeadReached as reached:
            return reached.tensor
        return output.logits


def split_step(
    cloud: CloudModel,
    link: CloudEdgeLink,
    batch: dict[str, torch.Tensor],
    head_on: HeadOn = "edge",
    loss_weight: float = 1.0,
) -> float:
    """One forward/backward of one user through the cloud; gradients land in the device's
    parameters (the caller steps the device's optimizer). Returns the loss."""
    up = link.send(link.edge_embed(batch), "embeddings", "", "up")
    out = cloud.forward(link, up["embeddings"], up["attention_mask"].long(), head_on)
    kind = head_kind(head_on)
    received = link.send_one(out.detach(), kind, "", "down")
    loss, grad = link.edge_loss(received, batch["labels"], head_on, loss_weight)
    if out.requires_grad:  # some module is active: the cloud backpropagates to it
        out.backward(link.send_one(grad, "grad_" + kind, "", "up"))
    return loss


def head_kind(head_on: HeadOn) -> str:
    """What the cloud sends down at the end of its forward."""
    return "hidden" if head_on == "edge" else "logits"
