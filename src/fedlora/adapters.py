"""The one shared PEFT model of a process and the adapter slots clients take turns in.

A client never owns a model: its state is a ``TensorDict`` keyed exactly like PEFT's adapter
state dict (``base_model.model.<module>.lora_A.weight``, ``...classifier.weight``), which is also
the wire format. Switching clients is copying those tensors into the slots.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LNTuningConfig, PeftModel, TaskType, get_peft_model
from peft import LoraConfig as PeftLoraConfig
from peft.tuners.lora import LoraLayer
from transformers import PreTrainedModel

from fedlora.config import ConfigError, LoraConfig
from fedlora.models import ModelSpec
from fedlora.tensors import ADAPTER, FULL_COPY, LoraModule, TensorDict, wire_name


class AdapterSlots:
    """The PEFT-wrapped shared base and typed access to its trainable tensors.

    ``full_weights`` replaces LoRA by trainable copies of the target modules' whole weight
    matrices (direct weight averaging, FedFTG, §4.2). PEFT's LN-tuning adapter is exactly such a
    copy for any module type, so the run still exports a standard PEFT adapter; the copies'
    biases stay frozen and off the wire (the methods average weight matrices only).
    """

    def __init__(
        self,
        base: PreTrainedModel,
        spec: ModelSpec,
        config: LoraConfig,
        init_seed: int,
        full_weights: bool = False,
    ):
        targets = list(config.target_modules or spec.default_targets)
        head = [spec.head] if (spec.head and config.train_head) else None
        task = TaskType.SEQ_CLS if spec.task == "classification" else TaskType.CAUSAL_LM
        peft_config = (
            LNTuningConfig(target_modules=targets, modules_to_save=head, task_type=task)
            if full_weights
            else PeftLoraConfig(
                r=config.rank,
                lora_alpha=config.alpha,
                lora_dropout=config.dropout,
                use_rslora=config.rslora,
                target_modules=targets,
                modules_to_save=head,
                task_type=task,
            )
        )
        torch.manual_seed(init_seed)  # the common A init every client shares
        try:
            self.model: PeftModel = get_peft_model(base, peft_config)
        except ValueError as error:
            raise ConfigError(f"lora.target_modules {targets}: {error}") from None
        self.task = spec.task
        self._pristine: TensorDict = {}  # frozen base weights before any merge_into_base
        self.matrices: list[str] = []  # full_weights: wire names of the trained weight copies
        if full_weights:
            for name, p in self.model.named_parameters():
                if f".{FULL_COPY}." in name:
                    p.requires_grad_(name.endswith(".weight") and p.dim() == 2)
                    if p.requires_grad:
                        self.matrices.append(wire_name(name))
        self._params: dict[str, torch.nn.Parameter] = {
            wire_name(name): p for name, p in self.model.named_parameters() if p.requires_grad
        }
        for p in self._params.values():  # float32 master copies over a half-precision base
            p.data = p.data.float()
        self.modules: list[LoraModule] = []
        for name, module in self.model.named_modules():
            if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
                a = module.lora_A[ADAPTER].weight
                b = module.lora_B[ADAPTER].weight
                self.modules.append(
                    LoraModule(
                        wire_name(name),
                        b.shape[0],
                        a.shape[1],
                        a.shape[0],
                        float(module.scaling[ADAPTER]),
                    )
                )
        logging.getLogger(__name__).debug("%d adapted modules", len(self.modules))

    @property
    def names(self) -> list[str]:
        return list(self._params)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(p.shape) for name, p in self._params.items()}

    def read(self) -> TensorDict:
        """The trained tensors as a party keeps them between turns: float32, in CPU memory."""
        return {name: p.detach().to("cpu", copy=True) for name, p in self._params.items()}

    def load(self, state: TensorDict) -> None:
        missing = set(self._params) - set(state)
        extra = set(state) - set(self._params)
        if missing or extra:
            raise ValueError(
                f"adapter state does not fit the model: missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(extra)[:3]}"
            )
        with torch.no_grad():
            for name, p in self._params.items():
                p.copy_(state[name])

    def parameters(self, include: Callable[[str], bool]) -> list[tuple[str, torch.nn.Parameter]]:
        """Trainable parameters the predicate selects; the others are frozen for this step."""
        chosen = []
        for name, p in self._params.items():
            keep = include(name)
            p.requires_grad_(keep)
            if keep:
                chosen.append((name, p))
        return chosen

    def set_scales(self, scales: dict[str, float]) -> None:
        """Per-module LoRA scale s (methods with per-client ranks compensate s, §1.1)."""
        by_key = {
            wire_name(name): m for name, m in self.model.named_modules() if isinstance(m, LoraLayer)
        }
        for key, scale in scales.items():
            by_key[key].scaling[ADAPTER] = scale

    @contextmanager
    def scaled(self, scales: dict[str, float] | None) -> Iterator[None]:
        """Per-module scales for one client's work, then the slots' own scales again."""
        if scales:
            self.set_scales(scales)
        try:
            yield
        finally:
            if scales:
                self.set_scales({m.key: m.scale for m in self.modules})

    def merge_into_base(self, offsets: TensorDict) -> None:
        """Set each named module's frozen base weight to W0 + offset (module key -> d_out x d_in).

        The pristine W0 is kept on first use, so the result depends only on the offset given and
        not on earlier calls: a resumed run rebuilds the same base bit for bit (FLoRA, §6.6)."""
        by_key = {
            wire_name(name): m for name, m in self.model.named_modules() if isinstance(m, LoraLayer)
        }
        with torch.no_grad():
            for key, offset in offsets.items():
                weight = by_key[key].get_base_layer().weight
                pristine = self._pristine.setdefault(key, weight.detach().clone())
                weight.copy_(pristine + offset.to(weight.device, weight.dtype))

    def restore_base(self) -> None:
        """Every merged module's frozen base weight back to W0 (a process that serves several
        runs of one experiment starts each from the pristine base)."""
        self.merge_into_base({key: torch.zeros_like(w) for key, w in self._pristine.items()})

    def export(self, state: TensorDict, directory: Path) -> None:
        """Write ``state`` as a standard PEFT adapter (``PeftModel.from_pretrained`` loads it)."""
        self.load(state)
        self.model.save_pretrained(directory)
