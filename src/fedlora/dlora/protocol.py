"""The choices of the DLoRA cloud-edge protocol that both its method options and its engine
name (kept apart from ``fedlora.dlora.split`` so that validating options loads no model code)."""

from __future__ import annotations

from typing import Literal

KilledForward = Literal["cloud", "edge", "drop"]  # a killed module's forward: where, or none
HeadOn = Literal["edge", "cloud"]  # where the output head and the loss run
