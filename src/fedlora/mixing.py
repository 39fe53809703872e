"""Two LoRA adapters in one forward: the slots' own and others added as branches (FedDPA).

The shared model's adapter slots hold one adapter. A method that mixes a second one into the
forward (FedDPA trains its local adapter with the global adapter's output added, detached, and
evaluates each test instance under its own mix of the two) adds it here, as a forward hook on
every LoRA layer: the layer's output gains w·s·B(A·dropout(x)) per branch, where s is the
module's LoRA scale and w a number or one weight per batch row.

Per-row weights follow the rows through every forward the evaluator makes (classification,
the reference forward, multiple-choice continuations against a cached prompt, each generation
step): the evaluator says which data rows a forward holds (``RowWeights.select``).

Instance-wise weights (``instance_weights``): w(x) = λ · mean_s cos(e(x), e(x_s)) over ``k``
of the client's own training examples x_s drawn per test example, where e is the last layer's
hidden state at the last token of the example's query (its prompt; the whole text for a
classifier) under the local adapter alone, as FedDPA's official inference computes it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from fedlora.lazy import torch
from fedlora.tensors import ADAPTER, TensorDict, is_head, wire_name
from fedlora.training import derived_seed

if TYPE_CHECKING:
    from fedlora.adapters import AdapterSlots
    from fedlora.data.tokenized import TokenizedSet
    from fedlora.experiment import Experiment

STREAM = 0xD9A  # the seeded draw of the training examples each test example is compared to


@dataclass
class RowWeights:
    """One weight per row of every split evaluated; ``select`` names the rows of the next
    forwards."""

    by_split: dict[int, torch.Tensor]  # id(TokenizedSet) -> weight per row
    current: torch.Tensor | None = None

    def select(self, data: TokenizedSet, rows: list[int]) -> None:
        self.current = self.by_split[id(data)][rows]


@dataclass(frozen=True)
class PerRow:
    """A branch's weight per batch row: the selected rows' weights w, or 1 − w."""

    weights: RowWeights
    complement: bool = False

    def column(self, like: torch.Tensor) -> torch.Tensor:
        """The weights as a column that broadcasts over ``like``'s tokens and features."""
        current = self.weights.current
        if current is None:
            raise RuntimeError("per-row weights used before the evaluator selected rows")
        column = current.to(like.device, like.dtype).reshape((-1,) + (1,) * (like.dim() - 1))
        return 1.0 - column if self.complement else column


@dataclass(frozen=True)
class Branch:
    """An adapter's LoRA factors (wire names, ``...lora_A.weight``/``...lora_B.weight``) added
    to the slots' output with ``weight``; ``detach``: no gradient flows through it (FedDPA's
    local phase adds the global adapter's output as a constant)."""

    adapter: TensorDict
    weight: float | PerRow
    detach: bool = False


@contextmanager
def branches(slots: AdapterSlots, added: list[Branch]) -> Iterator[None]:
    """The slots' LoRA layers output their own result plus every branch, until the block ends."""
    handles = []
    scales = {m.key: m.scale for m in slots.modules}
    for name, layer in slots.model.named_modules():
        key = wire_name(name)
        if key not in scales:
            continue
        factors = [
            (branch, branch.adapter[f"{key}.lora_A.weight"], branch.adapter[f"{key}.lora_B.weight"])
            for branch in added
        ]
        handles.append(layer.register_forward_hook(_adds(factors, scales[key])))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _adds(factors: list[tuple[Branch, torch.Tensor, torch.Tensor]], scale: float):
    def hook(layer, args, output):
        x = args[0]
        for branch, a, b in factors:
            a, b = a.to(x.device, x.dtype), b.to(x.device, x.dtype)
            extra = (layer.lora_dropout[ADAPTER](x) @ a.T) @ b.T * scale
            if branch.detach:
                extra = extra.detach()
            weight = branch.weight
            output = output + extra * (
                weight.column(extra) if isinstance(weight, PerRow) else weight
            )
        return output

    return hook


def lora_only(state: TensorDict) -> TensorDict:
    return {k: v for k, v in state.items() if not is_head(k)}


def silenced(state: TensorDict) -> TensorDict:
    """``state`` with every LoRA B zero: the slots' own branch adds nothing (the head stays)."""
    return {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in state.items()}


# -- instance-wise weights -----------------------------------------------------------------------


def query_ids(data: TokenizedSet, row: int) -> list[int]:
    """What an example asks, without its answer: the prompt (instruction data), the context
    (multiple choice), or the whole text (a classifier's input)."""
    if data.prompts is not None:
        return data.prompts[row]
    if data.contexts is not None:
        return data.contexts[row]
    return data.input_ids[row]


def last_token_embeddings(
    slots: AdapterSlots, data: TokenizedSet, rows: list[int], batch_size: int
) -> torch.Tensor:
    """e(x) per row (rows × hidden, float32): the last layer's hidden state at the query's last
    token, under the adapter state loaded in the slots."""
    from fedlora.scoring import right_padded  # transformers: only once a model is evaluated

    model, device = slots.model, next(slots.model.parameters()).device
    out = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            ids, mask = right_padded([query_ids(data, r) for r in chunk], data.pad_id)
            hidden = model(
                input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True
            ).hidden_states[-1]
            last = mask.sum(1) - 1
            out.append(hidden[torch.arange(len(chunk)), last.to(device)].float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def similarity_weights(
    queries: torch.Tensor, references: torch.Tensor, draws: np.ndarray, scale: float
) -> torch.Tensor:
    """w_i = scale · mean_j cos(queries[i], references[draws[i, j]])."""
    cosines = torch.nn.functional.cosine_similarity(
        queries.unsqueeze(1), references[torch.as_tensor(draws)], dim=-1
    )
    return scale * cosines.mean(1)


def draw_references(count: int, pool: int, k: int, seed: int) -> np.ndarray:
    """For each of ``count`` examples, ``min(k, pool)`` distinct indices into the pool."""
    rng = np.random.default_rng(seed)
    k = min(k, pool)
    return np.stack([rng.choice(pool, size=k, replace=False) for _ in range(count)]).reshape(
        count, k
    )


@dataclass(frozen=True)
class Mixture:
    """A client's model of two adapters mixed per test example (FedDPA): ``local`` and
    ``shared`` are full adapter states (the head is ``shared``'s); the weight w(x) of
    ``instance_weights`` goes to ``weighted`` and 1 − w(x) to the other."""

    local: TensorDict
    shared: TensorDict
    scale: float  # λ
    instances: int  # k training examples per test example
    weighted: Literal["local", "shared"]


def instance_weights(
    exp: Experiment, client: int, mixture: Mixture, own: TokenizedSet | None = None
) -> RowWeights:
    """w(x) for every row of the evaluator's splits (and the client's ``own`` test share),
    from ``client``'s own training examples."""
    slots, evaluator = exp.slots, exp.evaluator
    with torch.no_grad():
        slots.load({**mixture.shared, **lora_only(mixture.local)})
        slots.model.eval()
        mine = exp.clients[client]  # the client's training rows
        splits = evaluator.splits(own)
        seed = exp.config.experiment.seed
        draws = {
            id(data): draw_references(
                len(data), len(mine), mixture.instances, derived_seed(seed, client, tag, STREAM)
            )
            for tag, data in enumerate(splits)
        }
        needed = sorted({int(i) for d in draws.values() for i in d.flatten()})
        embedded = last_token_embeddings(
            slots, exp.train_set, [mine[i] for i in needed], evaluator.batch_size
        )
        pool = embedded.new_zeros(len(mine), embedded.shape[1])  # rows never drawn stay 0
        pool[needed] = embedded
        by_split = {
            id(data): similarity_weights(
                last_token_embeddings(slots, data, list(range(len(data))), evaluator.batch_size),
                pool,
                draws[id(data)],
                mixture.scale,
            )
            for data in splits
        }
    return RowWeights(by_split)


def mixture_metrics(
    exp: Experiment, client: int, mixture: Mixture, own: TokenizedSet | None = None
) -> dict[str, float]:
    """The metrics of ``client``'s mixed model: each test (validation, own test share)
    example under its own weights w(x) on the two adapters."""
    weights = instance_weights(exp, client, mixture, own)
    on_shared = mixture.weighted == "shared"
    added = [
        Branch(lora_only(mixture.local), PerRow(weights, complement=on_shared)),
        Branch(lora_only(mixture.shared), PerRow(weights, complement=not on_shared)),
    ]
    with branches(exp.slots, added):
        return exp.evaluator.evaluate(silenced(mixture.shared), weights.select, own)
