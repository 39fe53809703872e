"""Local training of the adapter slots on one client's rows.

Randomness (batch order, dropout, DP-SGD's samples and noise) is drawn from generators seeded by
(run seed, round, client), so a round replays identically after a resume without any saved RNG
state. With ``privacy.mechanism = "dp_sgd"`` each step's gradient is DP-SGD's
(``fedlora.privacy.dp_sgd``) instead of the batch's plain one; the optimizer step is the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from fedlora.compute import Compute, on_cpu
from fedlora.config import TrainConfig
from fedlora.lazy import torch
from fedlora.privacy.dp_sgd import DpSgd, PerExampleGradients, clip_per_example, private_batches
from fedlora.privacy.noise import generator, noisy_mean
from fedlora.tensors import TensorDict, is_head

if TYPE_CHECKING:  # the trainer's collaborators, imported only by those who build them
    from fedlora.adapters import AdapterSlots
    from fedlora.data.tokenized import TokenizedSet


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch cut on the CPU, moved to where the model computes."""
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers; different tuples give independent streams."""
    return int(
        np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0]
        >> 1
    )


def batch_stream(rows: list[int], batch_size: int, seed: int):
    """Endless batches over ``rows``: a fresh seeded permutation per pass; a batch may span
    two passes."""
    rng = np.random.default_rng(seed)
    size = min(batch_size, len(rows))
    order: list[int] = []
    while True:
        while len(order) < size:
            order.extend(int(rows[i]) for i in rng.permutation(len(rows)))
        yield order[:size]
        order = order[size:]


def steps_per_round(config: TrainConfig, num_rows: int) -> int:
    if config.local_steps is not None:
        return config.local_steps
    per_step = min(config.batch_size, num_rows) * config.grad_accum
    return max(1, math.ceil(config.local_epochs * num_rows / per_step))


def deadline_steps(config: TrainConfig, num_rows: int, deadline: int | None) -> int:
    """The steps a client runs in a round: its round's steps, cut at a deadline if set."""
    steps = steps_per_round(config, num_rows)
    return min(steps, deadline) if deadline is not None else steps


def learning_rate(config: TrainConfig, step: int, total: int) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, total - config.warmup_steps)
    if config.scheduler == "linear":
        return config.lr * max(0.0, 1.0 - progress)
    if config.scheduler == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.lr


def parameter_groups(
    params: list[tuple[str, torch.nn.Parameter]], config: TrainConfig
) -> list[dict]:
    """One group at ``train.lr``; with ``train.head_lr`` set, the head's tensors in a second
    group at that rate (schedules scale both alike, see ``set_learning_rate``)."""
    if config.head_lr is None:
        return [{"params": [p for _, p in params]}]
    body = [p for name, p in params if not is_head(name)]
    head = [p for name, p in params if is_head(name)]
    return [
        group
        for group in ({"params": body}, {"params": head, "lr": config.head_lr})
        if group["params"]
    ]


def standard_optimizer(
    params: list[tuple[str, torch.nn.Parameter]], config: TrainConfig
) -> torch.optim.Optimizer:
    groups = parameter_groups(params, config)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def set_learning_rate(
    optimizer: torch.optim.Optimizer, config: TrainConfig, step: int, total: int
) -> None:
    """The schedule's rate at ``step``; a group built with its own rate (the head's) keeps its
    ratio to ``train.lr``."""
    factor = learning_rate(config, step, total) / config.lr
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor


def optimizer_tensors(
    optimizer: torch.optim.Optimizer, compute: Compute | None = None
) -> TensorDict:
    """The optimizer's per-parameter state as a flat tensor dict (checkpointable as safetensors),
    where ``compute`` keeps it while its client waits (CPU memory unless states_on_device)."""
    compute = compute or on_cpu()
    flat: TensorDict = {}
    for index, entry in optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(float(value))
            flat[f"{index}.{key}"] = compute.idle(tensor)
    return flat


def restore_optimizer(optimizer: torch.optim.Optimizer, flat: TensorDict) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in flat.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = tensor.clone()
    optimizer.load_state_dict(
        {"state": state, "param_groups": optimizer.state_dict()["param_groups"]}
    )


OptimizerFactory = Callable[
    [list[tuple[str, "torch.nn.Parameter"]], TrainConfig], "torch.optim.Optimizer"
]


@dataclass
class LocalResult:
    state: TensorDict
    optimizer_state: TensorDict
    steps: int
    loss: float
    examples: int


WITHHELD = ("train_loss", "examples")  # what a round's record lacks when clients withhold them


def withheld(result: LocalResult) -> LocalResult:
    """What a client under DP reports of its local work: its state and step count (a function
    of the config), not its loss nor how many examples its samples drew, which ε does not
    cover (``privacy.client_stats`` opts in)."""
    return LocalResult(result.state, result.optimizer_state, result.steps, float("nan"), 0)


class LocalTrainer:
    """Runs a client's local steps on the shared model's adapter slots."""

    def __init__(
        self,
        slots: AdapterSlots,
        data: TokenizedSet,
        config: TrainConfig,
        seed: int,
        rounds: int,
        make_optimizer: OptimizerFactory = standard_optimizer,
        compute: Compute | None = None,
        dp: DpSgd | None = None,
    ):
        self.make_optimizer = make_optimizer  # the method's ``local_optimizer``
        self.compute = compute or on_cpu()
        self.dp = dp
        self.slots = slots
        self.data = data
        self.config = config
        self.seed = seed
        self.rounds = rounds

    def train(
        self,
        start: TensorDict,
        rows: list[int],
        round_index: int,
        client: int,
        trainable: Callable[[str], bool],
        optimizer_state: TensorDict | None = None,
        regularizer: Callable[[dict[str, torch.nn.Parameter]], torch.Tensor] | None = None,
        max_steps: int | None = None,
        phase: int = 0,
    ) -> LocalResult:
        """``regularizer``, if given, is a penalty on the named trainable tensors added to the
        loss once per optimizer step (HetLoRA's self-pruning term); the reported loss excludes
        it. ``max_steps`` cuts the round short (a straggler at its deadline); the schedule
        still counts the full round's steps. ``phase`` > 0 names a further training of the
        same client in the same round (FedDPA's personal adapter) and gives it batches,
        dropout and noise of its own; phase 0 draws what a single-phase round always drew."""
        config = self.config
        self.slots.load(start)
        params = self.slots.parameters(trainable)
        optimizer = self.make_optimizer(params, config)
        if optimizer_state:
            restore_optimizer(optimizer, optimizer_state)
        model = self.slots.model
        model.train()
        steps = steps_per_round(config, len(rows))
        total = steps * self.rounds
        schedule_steps = steps
        steps = min(steps, max_steps) if max_steps is not None else steps
        stream = (round_index, client) if phase == 0 else (round_index, client, phase)
        torch.manual_seed(derived_seed(self.seed, *stream, 1))  # dropout
        scaler = self.compute.grad_scaler()  # float16 only; a fresh one per client turn
        step_gradient = self._gradients(params, rows, stream, scaler)
        losses = []
        examples = 0
        for step in range(steps):
            set_learning_rate(optimizer, config, round_index * schedule_steps + step, total)
            optimizer.zero_grad(set_to_none=True)
            step_losses, used = step_gradient()
            losses += step_losses
            examples += used
            if regularizer is not None:
                penalty = regularizer(dict(params))
                (penalty if scaler is None else scaler.scale(penalty)).backward()
            if scaler is not None:
                scaler.unscale_(optimizer)
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for _, p in params], config.max_grad_norm)
            if scaler is None:
                optimizer.step()
            else:
                scaler.step(optimizer)  # skipped when the scaled gradients overflowed
                scaler.update()
        model.eval()
        return LocalResult(
            state=self.slots.read(),
            optimizer_state=optimizer_tensors(optimizer, self.compute),
            steps=steps,
            loss=float(np.mean(losses)) if losses else float("nan"),
            examples=examples,
        )

    def _gradients(
        self,
        params: list[tuple[str, torch.nn.Parameter]],
        rows: list[int],
        stream: tuple[int, ...],
        scaler: torch.amp.GradScaler | None,
    ) -> Callable[[], tuple[list[float], int]]:
        """What puts one step's gradient into ``.grad``: the plain batch gradient, or DP-SGD's
        over samples of ``rows`` with the client's noise stream (``stream``: round, client and
        phase, if any)."""
        samples_seed = derived_seed(self.seed, *stream, 2)
        if self.dp is None:
            return partial(
                self._plain_gradient,
                batch_stream(rows, self.config.batch_size, samples_seed),
                scaler,
            )
        logical = self.config.batch_size * self.config.grad_accum
        seeds = self.dp.seeds  # derived from the run seed, or secret (privacy.noise_source)
        return partial(
            self._private_gradient,
            PerExampleGradients(self.slots.model, params, self.dp.causal_attention),
            private_batches(self.dp.sampling, rows, logical, seeds.seed(*stream, 2)),
            min(logical, len(rows)),
            generator(seeds.seed(*stream, 3)),
        )

    def _plain_gradient(
        self, batches: Iterator[list[int]], scaler: torch.amp.GradScaler | None
    ) -> tuple[list[float], int]:
        """The batch-mean gradient of ``grad_accum`` batches into ``.grad``; (their losses,
        examples used)."""
        config, compute, model = self.config, self.compute, self.slots.model
        losses, examples = [], 0
        for _ in range(config.grad_accum):
            batch_rows = next(batches)
            batch = to_device(self.data.batch(batch_rows), compute.device)
            with compute.autocast():
                loss = model(**batch).loss / config.grad_accum
            (loss if scaler is None else scaler.scale(loss)).backward()
            losses.append(loss.item() * config.grad_accum)
            examples += len(batch_rows)
        return losses, examples

    def _private_gradient(
        self,
        gradients: PerExampleGradients,
        samples: Iterator[list[int]],
        denominator: int,
        noise: torch.Generator,
    ) -> tuple[list[float], int]:
        """DP-SGD's gradient of one sample into ``.grad``: per-example gradients in chunks of
        ``train.batch_size``, each clipped, summed, noised, divided by the expected batch size
        (``fedlora.privacy.dp_sgd``); (the mean per-example loss, or none for an empty sample;
        examples used)."""
        assert self.dp is not None
        compute, chunk, rows = self.compute, self.config.batch_size, next(samples)
        sums = [torch.zeros_like(p) for p in gradients.params]
        losses: list[float] = []
        for start in range(0, len(rows), chunk):
            batch = to_device(self.data.batch(rows[start : start + chunk]), compute.device)
            with compute.autocast():
                grads, example_losses = gradients(batch)
            for total, clipped in zip(
                sums, clip_per_example(grads, self.dp.clip_norm), strict=True
            ):
                total.add_(clipped.sum(0))
            losses += example_losses.float().tolist()
        private = noisy_mean(sums, self.dp.clip_norm, self.dp.noise_multiplier, denominator, noise)
        for p, grad in zip(gradients.params, private, strict=True):
            p.grad = grad
        return ([float(np.mean(losses))] if losses else []), len(rows)
