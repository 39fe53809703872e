"""Analytic device (edge) FLOPs of DLoRA, counted the way ``torch.utils.flop_counter`` counts.

Only matrix products are counted (2 FLOPs per multiply-add), as FlopCounterMode does; the
elementwise scale ``s`` and the loss are left out. ``tokens`` is every position of the padded
batch (b·ℓ), because the device computes on the padded tensor. A test checks these numbers
against FlopCounterMode on a tiny model.
"""

from __future__ import annotations

from fedlora.tensors import LoraModule


def lora_forward_flops(module: LoraModule, tokens: int) -> int:
    """u = s·B(A x): (N×k)(k×r) then (N×r)(r×d)."""
    return 2 * tokens * module.rank * (module.d_in + module.d_out)


def lora_backward_flops(module: LoraModule, tokens: int) -> int:
    """∇B, ∂L/∂(Ax), ∇A and the input-gradient s·AᵀBᵀg: four products, twice the forward."""
    return 2 * lora_forward_flops(module, tokens)


def head_flops(rows: int, d_in: int, d_out: int, trains_weight: bool) -> int:
    """The output head on the device: forward, input gradient, and the weight gradient if the
    head is trained (the classifier) rather than frozen (a tied LM head)."""
    products = 3 if trains_weight else 2
    return products * 2 * rows * d_in * d_out
