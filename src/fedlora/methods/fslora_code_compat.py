"""What FSLoRA's released code actually runs (algorithms.md §5.6): no sketch at all.

The code's masks compare full PEFT parameter names with ``==`` and never match, so every client
trains and uploads the full rank-r global LoRA at scale s, and the server takes an AdamW step on
the averaged delta: FedAvg-LoRA with a FedAdam-style server. Kept to reproduce the released
behaviour; per-client ranks from ``[ranks]`` are accepted, like the code's drawn ratios, and
likewise unused.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fedlora.methods.fslora import FSLoRA, FSLoRAOptions


class CodeCompatOptions(FSLoRAOptions):
    """Only the server AdamW's knobs are free; the sketch options are pinned to the code's."""

    server: Literal["adam"] = Field("adam", description="the code's server AdamW step")
    normalization: Literal["clients"] = Field(
        "clients", description="the code's normalization: divide by the number of clients M"
    )
    share_across_modules: Literal[False] = Field(
        False, description="pinned: the code draws no sketch to share"
    )


class FSLoRACodeCompat(FSLoRA):
    name = "fslora_code_compat"
    summary = "FSLoRA as released: no sketch, full rank r, server AdamW on the averaged delta"
    Options = CodeCompatOptions
    sketched = False
