"""What the released FedFTG code really runs (algorithms.md §4.6): galore-torch's AdamW built
from a bare parameter list, ``GaLoreAdamW(params, lr)``. With no ``rank`` key in the param group
galore-torch never projects, so this is plain AdamW (galore-torch's, eps = 1e-6) full-weight
fine-tuning plus direct weight averaging, with the optimizers kept across rounds as the code
does (``train.head_lr`` may split off the head's group, still unprojected). It exists so users
can compare it with ``fedftg``.
"""

from __future__ import annotations

from fedlora.config import TrainConfig
from fedlora.lazy import torch
from fedlora.methods.dwa import DirectWeightAveraging
from fedlora.training import parameter_groups


class FedFTGCodeCompat(DirectWeightAveraging):
    name = "fedftg_code_compat"
    summary = "FedFTG as released: GaLoreAdamW without group keys, i.e. AdamW + DWA (§4.6)"
    keeps_optimizer_state = True

    def local_optimizer(
        self, params: list[tuple[str, torch.nn.Parameter]], config: TrainConfig
    ) -> torch.optim.Optimizer:
        from galore_torch import GaLoreAdamW  # it loads bitsandbytes: only when training

        return GaLoreAdamW(
            parameter_groups(params, config),
            lr=config.lr,
            weight_decay=config.weight_decay,
            no_deprecation_warning=True,
        )
