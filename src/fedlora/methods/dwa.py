"""Direct weight averaging (DWA, algorithms.md §4.2): clients fine-tune the target modules' whole
weight matrices from the global ones, the server averages them, W ← Σ p_i W_i.

It is FedIT's round on different tensors: the slots hold full copies of the target matrices
instead of LoRA factors (``full_weights``), and averaging them is exact FedAvg because the model
is linear in what is averaged (§7 T12). Bytes: d·k per matrix each way (§1.4).
"""

from __future__ import annotations

from fedlora.methods.fedit import FedIT


class DirectWeightAveraging(FedIT):
    name = "dwa"
    summary = "direct weight averaging of the fine-tuned full target matrices (FedFTG paper §4.2)"
    full_weights = True
