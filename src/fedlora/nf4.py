"""A 4-bit NF4 frozen base (QLoRA-style), as in Dec-LoRA's quantization study (§2.3, Table 4).

Every frozen ``nn.Linear`` of the base except the trained head becomes a bitsandbytes
``Linear4bit`` (NF4, double quantization), computing in the run's compute dtype on its device
(QLoRA on CUDA: bfloat16; on the CPU float32, since bf16 matmuls have no hardware support on the
CPUs we run on). Checked on bitsandbytes 0.50.2 (CPU): forward and backward through
PEFT LoRA work, including gradients flowing through quantized layers to earlier adapters. Its CPU
kernel reshapes the per-block absmax to (out, in // 64), so every quantized layer needs
``in_features`` to be a multiple of the block size 64; anything else is refused here by name
rather than failing inside the kernel at the first forward.
"""

from __future__ import annotations

import torch

from fedlora.compute import Compute, on_cpu
from fedlora.config import ConfigError

BLOCK = 64
KEEP = ("lm_head",)  # trained or tied output layers stay float32


def quantize_nf4(model: torch.nn.Module, head: str | None, compute: Compute | None = None) -> int:
    """Replace the frozen linears of ``model`` in place (quantized as they move to the compute
    device); returns how many were replaced."""
    import bitsandbytes as bnb  # heavy import, only when asked for

    compute = compute or on_cpu()

    keep = {*KEEP, *([head] if head else [])}
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not keep & set(name.split("."))
    ]
    for name, module in targets if compute.device.type == "cpu" else []:
        if module.in_features % BLOCK:
            raise ConfigError(
                f"model.quantize_4bit: {name} has in_features {module.in_features}; the "
                f"bitsandbytes CPU NF4 kernel needs a multiple of {BLOCK} (use a larger model)"
            )
    for name, module in targets:
        quantized = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=compute.dtype,
            compress_statistics=True,
            quant_type="nf4",
        )
        quantized.weight = bnb.nn.Params4bit(
            module.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4"
        )
        if module.bias is not None:
            quantized.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        # .to quantizes (on the compute device)
        setattr(model.get_submodule(parent_name), child, quantized.to(compute.device))
    return len(targets)
