"""Centralized LoRA on pooled data: the reference every federated comparison needs (§6.8)."""

from __future__ import annotations

from fedlora.methods.fedit import FedIT


class Centralized(FedIT):
    """One party holding all training data; a "round" is a block of local steps, nothing is
    sent, and the optimizer state carries over so it is plain continuous training."""

    name = "centralized"
    summary = "pooled-data LoRA in one place, no communication (the upper reference)"
    pooled_data = True
    communicates = False
    keeps_optimizer_state = True
