"""The cloud-edge split's round (methods with ``engine = "split"``: DLoRA, algorithms.md §3).

Users share one cloud (the frozen base, loaded once) and each trains its own adapter on its
own device, step by step, through ``fedlora.dlora.split``. Kill-and-Revive decides each step's
active modules. A round is a block of ``train.local_steps`` steps per user, so the run loop's
checkpoints, resume, metrics and evaluation carry over; each user's device state,
Kill-and-Revive state, schedule and per-step accounting live in its ``store`` and so are
checkpointed with it. The round is written once; where the cloud and the devices live is its
``links``: ``LocalLinks`` (here, one process) or ``fedlora.engines.distributed_split``'s
``RankLinks``, which cuts each user's link at the process boundary.

Besides the usual run files this round writes ``schedule.json`` and ``schedule_client<i>.png``
(active modules per step), ``steps.csv`` (per step: loss, active modules, traffic, device
FLOPs and their all-modules-active reference), ``traffic.csv`` (per step and module: floats
and bytes each way) and ``accounting.json`` (totals and reductions).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress, TaskID

from fedlora.channel import Channel, Transfer, human_bytes
from fedlora.dlora.flops import lora_backward_flops, lora_forward_flops
from fedlora.dlora.kill_revive import KillRevive
from fedlora.dlora.schedule import plot_schedule, write_schedule
from fedlora.dlora.split import CloudEdgeLink, CloudModel, EdgeAdapters, split_step
from fedlora.engines.client import ClientRuntime, client_name
from fedlora.engines.loop import summarize_clients, work_record
from fedlora.experiment import Experiment
from fedlora.methods.dlora import EDGE, DLoRA
from fedlora.tensors import TensorDict
from fedlora.training import (
    batch_stream,
    derived_seed,
    optimizer_tensors,
    restore_optimizer,
    set_learning_rate,
    standard_optimizer,
    steps_per_round,
    to_device,
)

KR = "kr."
SCHEDULE = "schedule"  # store key: steps x modules active mask
ACCOUNT = "account"  # store key: steps x len(FIELDS) accounting rows
FIELDS = (
    "step",
    "round",
    "loss",
    "active",
    "bytes_up",
    "bytes_down",
    "module_values",
    "module_values_all_active",
    "module_bytes",
    "factor_bytes",
    "module_flops",
    "module_flops_all_active",
    "head_flops",
)
# The FIELDS a round's record sums over its steps (integers: exact in any order).
SUMMED = (
    "active",
    "module_values",
    "module_values_all_active",
    "module_flops",
    "module_flops_all_active",
    "head_flops",
)
TRAFFIC_FIELDS = (
    "client",
    "round",
    "step",
    "module",
    "values_down",
    "values_up",
    "bytes_down",
    "bytes_up",
)


@dataclass
class User:
    index: int
    rows: list[int]
    link: CloudEdgeLink
    kr: KillRevive
    optimizer: torch.optim.Optimizer
    schedule: list[torch.Tensor] = field(default_factory=list)
    account: list[list[float]] = field(default_factory=list)


def round_sums(rows: list[list[float]]) -> dict[str, float]:
    """The SUMMED columns of some steps' accounting rows, and how many steps they are."""
    column = {name: i for i, name in enumerate(FIELDS)}
    sums = {name: float(sum(r[column[name]] for r in rows)) for name in SUMMED}
    return sums | {"rows": len(rows)}


class LocalLinks:
    """The cloud and every user's device in this process: a split round's default placement.
    Every hook receives the round (``SplitRound``); ``RankLinks`` is the other placement."""

    # Whether this process writes the users' per-step files (steps.csv, traffic.csv, schedules,
    # accounting.json): the one process here; across processes, whichever holds the users' rows.
    user_files = True

    def user_indices(self, split: SplitRound) -> list[int]:
        """The users this process trains (all of them here)."""
        return list(range(split.method.user_count))

    def link(self, split: SplitRound, index: int, edge: EdgeAdapters) -> CloudEdgeLink:
        """The wire between the cloud and user ``index``'s device (both in this process here)."""
        opts = split.method.opts
        device = split.exp.compute.device
        return CloudEdgeLink(client_name(index), edge, split.wire, opts.killed_forward, device)

    def open(self, split: SplitRound, start_round: int, run_dir: Path) -> None:
        """Nothing to start: the cloud and the devices are here."""

    def close(self, split: SplitRound) -> list[str]:
        return []

    def initial(self, split: SplitRound) -> None:
        """Nothing before round 0 beyond the evaluation."""

    def begin_block(self, split: SplitRound, user: User) -> None:
        """Before a user's block of steps: nothing to announce here."""

    def step(
        self, split: SplitRound, link: CloudEdgeLink, batch: dict[str, torch.Tensor], weight: float
    ) -> float:
        """One forward/backward of one user through the cloud; returns the loss."""
        return split_step(split.cloud, link, batch, split.method.opts.head_on, weight)

    def train_users(
        self, split: SplitRound, round_index: int, progress: Progress, task: TaskID
    ) -> tuple[dict[int, list[float]], int, int]:
        return split.train_here(round_index, progress, task)

    def round_sums(self, split: SplitRound, round_index: int) -> dict[str, float]:
        return split.sums_here(round_index)

    def train_loss(self) -> float | None:
        """The round's train_loss when it is not the mean of the steps' losses here."""
        return None

    def evaluate(self, split: SplitRound) -> dict[str, float]:
        return split.evaluate_here()

    def restore_user(self, split: SplitRound, user: User) -> None:
        split.restore_here(user)


class SplitRound:
    """One round of the split for every user, written once; ``links`` says where the cloud and
    the devices are (``LocalLinks``: here)."""

    def __init__(
        self,
        experiment: Experiment,
        runtime: ClientRuntime,
        run_dir: Path,
        links: LocalLinks | None = None,
    ) -> None:
        if not isinstance(experiment.method, DLoRA):
            raise TypeError(f"split rounds run DLoRA, not {type(experiment.method).__name__}")
        self.exp = experiment
        self.runtime = runtime
        self.run_dir = run_dir
        self.channel = Channel()  # the run's ledger: one row per (sender, receiver) and round
        self.method: DLoRA = experiment.method
        self.links = links or LocalLinks()
        slots = experiment.slots
        self.cloud = CloudModel(
            slots.model.get_base_model(),
            experiment.spec,
            slots.modules,
            plain=slots.model.disable_adapter,
            compute=experiment.compute,
        )
        self.keys = [m.key for m in slots.modules]
        self.wire = Channel()  # per-message ledger of the current round, folded into self.channel
        self.traffic_rows: list[list] = []
        self.users = [self._new_user(u) for u in self.links.user_indices(self)]

    @property
    def user_files(self) -> bool:
        return self.links.user_files

    def _new_user(self, index: int) -> User:
        edge = self.cloud.edge(self.method.context.initial, self.exp.config.lora.dropout)
        link = self.links.link(self, index, edge)
        kr = KillRevive(len(self.keys), self.method.rule(index))
        kr.start([edge.flat(k) for k in self.keys])
        optimizer = standard_optimizer(list(edge.params.items()), self.exp.config.train)
        return User(index, self.exp.clients[index], link, kr, optimizer)

    # -- state in the stores (checkpointed by the simulation engine) --------------------------
    @property
    def stores(self) -> dict[int, TensorDict]:
        return self.runtime.stores

    @property
    def optimizers(self) -> dict[int, TensorDict]:
        return self.runtime.optimizers

    def _keeps_optimizer(self) -> bool:
        return self.runtime.keeps_optimizer()

    # -- the run around the rounds ----------------------------------------------------------
    def open(self, start_round: int, run_dir: Path) -> None:
        self.links.open(self, start_round, run_dir)

    def close(self) -> list[str]:
        return self.links.close(self)

    def initial(self) -> None:
        self.links.initial(self)

    def scheduled(self, round_index: int) -> dict[int, int]:
        """Every user trains every round, its round's steps."""
        train = self.exp.config.train
        return {
            u: steps_per_round(train, len(self.exp.clients[u]))
            for u in range(len(self.exp.clients))
        }

    def _save_user(self, user: User) -> None:
        store: TensorDict = {EDGE + k: v for k, v in user.link.edge.state().items()}
        store.update({KR + k: v.to("cpu") for k, v in user.kr.state_dict().items()})
        store[SCHEDULE] = torch.stack(user.schedule).to(torch.uint8)
        store[ACCOUNT] = torch.tensor(user.account, dtype=torch.float64)
        self.stores[user.index] = store
        self.optimizers[user.index] = optimizer_tensors(user.optimizer)

    def restored(self, start: int) -> None:
        """After ``start`` rounds: each user from its store, and traffic.csv without the rows
        of a round that did not complete."""
        for user in self.users if start else []:
            self.links.restore_user(self, user)
        traffic = self.run_dir / "traffic.csv"
        if start and self.user_files and traffic.is_file():
            with traffic.open() as handle:
                rows = list(csv.reader(handle))[1:]
            self.traffic_rows = []
            self._write_traffic([r for r in rows if int(r[1]) < start], mode="w")

    def restore_here(self, user: User) -> None:
        """A user's device, Kill-and-Revive state, optimizer and records from its store."""
        store = self.stores[user.index]
        user.link.edge.load({k[len(EDGE) :]: v for k, v in store.items() if k.startswith(EDGE)})
        user.kr.load_state_dict({k[len(KR) :]: v for k, v in store.items() if k.startswith(KR)})
        user.link.restore({self.keys[i] for i in user.kr.active_indices()})
        restore_optimizer(user.optimizer, self.optimizers[user.index])
        user.schedule = list(store[SCHEDULE].to(torch.bool))
        # every field is a count but the loss: as the steps wrote them (steps.csv reads the same)
        loss = FIELDS.index("loss")
        rows = store[ACCOUNT].tolist()
        user.account = [[v if i == loss else int(v) for i, v in enumerate(row)] for row in rows]

    # -- evaluation: each user's own adapter ---------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        return self.links.evaluate(self)

    def evaluate_here(self) -> dict[str, float]:
        return summarize_clients([self.runtime.metrics(u.index) for u in self.users])

    # -- one block of steps per user -----------------------------------------------------------
    def _train_block(self, user: User, round_index: int) -> tuple[list[float], int, int]:
        self.links.begin_block(self, user)
        config = self.exp.config
        train, seed, rounds = config.train, config.experiment.seed, config.experiment.rounds
        link, kr, edge = user.link, user.kr, user.link.edge
        modules = self.exp.slots.modules
        steps = steps_per_round(train, len(user.rows))
        self.seed_dropout(user.index, round_index)
        batches = batch_stream(
            user.rows, train.batch_size, derived_seed(seed, round_index, user.index, 2)
        )
        if not self._keeps_optimizer():  # train.keep_optimizer_state = false: fresh AdamW moments
            user.optimizer.state.clear()
        model = self.cloud.model
        model.train()
        losses, examples = [], 0
        for s in range(steps):
            step = round_index * steps + s + 1
            link.begin_step(step, round_index)
            set_learning_rate(user.optimizer, train, step - 1, steps * rounds)
            user.optimizer.zero_grad(set_to_none=True)
            mask = kr.active.clone()
            tokens, step_losses = 0, []
            for _ in range(train.grad_accum):
                batch = to_device(self.exp.train_set.batch(next(batches)), edge.device)
                step_losses.append(self.links.step(self, link, batch, 1 / train.grad_accum))
                tokens += batch["input_ids"].numel()
                examples += len(batch["input_ids"])
            if train.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(list(edge.params.values()), train.max_grad_norm)
            user.optimizer.step()
            if kr.due(step):
                decision = kr.check(step, [edge.flat(k) for k in self.keys])
                for i in decision.killed:
                    link.kill(self.keys[i])
                for i in decision.revived:
                    link.revive(self.keys[i])
            all_flops = sum(
                lora_forward_flops(m, tokens) + lora_backward_flops(m, tokens) for m in modules
            )
            all_values = tokens * sum(2 * (m.d_in + m.d_out) for m in modules)
            user.account.append(
                self._account(
                    user,
                    step,
                    round_index,
                    mask,
                    float(np.mean(step_losses)),
                    all_values,
                    all_flops,
                )
            )
            user.schedule.append(mask)
            losses.extend(step_losses)
            link.log.clear()
        model.eval()
        return losses, steps, examples

    def seed_dropout(self, user: int, round_index: int) -> None:
        """One generator for a user's block of steps: the base's and the adapters' dropout."""
        torch.manual_seed(derived_seed(self.exp.config.experiment.seed, round_index, user, 1))

    def _account(
        self,
        user: User,
        step: int,
        round_index: int,
        mask: torch.Tensor,
        loss: float,
        all_values: int,
        all_flops: int,
    ) -> list[float]:
        """One step's row of FIELDS from the link's log, and its (step, module) traffic rows."""
        log, flops = user.link.log, user.link.flops
        per_module: dict[str, list[int]] = {}
        for t in log:
            if t.module and t.kind != "factors":
                row = per_module.setdefault(t.module, [0, 0, 0, 0])
                up = t.direction == "up"
                row[int(up)] += t.values
                row[2 + int(up)] += t.bytes
        self.traffic_rows.extend(
            [user.index, round_index, step, module, *row] for module, row in per_module.items()
        )
        return [
            step,
            round_index,
            loss,
            int(mask.sum()),
            sum(t.bytes for t in log if t.direction == "up"),
            sum(t.bytes for t in log if t.direction == "down"),
            sum(r[0] + r[1] for r in per_module.values()),
            all_values,
            sum(r[2] + r[3] for r in per_module.values()),
            sum(t.bytes for t in log if t.kind == "factors"),
            flops["modules"],
            all_flops,
            flops["head"],
        ]

    def fold_ledger(self, round_index: int) -> None:
        """The round's messages into the run ledger, one row per (sender, receiver): a DLoRA
        round has hundreds of messages per step; per-message detail is in traffic.csv."""
        totals: dict[tuple[str, str], list[int]] = {}
        for r in self.wire.ledger.records:
            entry = totals.setdefault((r.sender, r.receiver), [0, 0])
            entry[0] += r.bytes
            entry[1] += r.tensors
        for (sender, receiver), (count, tensors) in sorted(totals.items()):
            self.channel.ledger.add(Transfer(round_index, sender, receiver, count, tensors))
        self.wire.ledger.records.clear()

    def train_here(
        self, round_index: int, progress: Progress, task: TaskID
    ) -> tuple[dict[int, list[float]], int, int]:
        """Every user of this process's block of steps, into the stores and the ledger: (each
        user's step losses, steps, examples)."""
        losses: dict[int, list[float]] = {}
        steps, examples = 0, 0
        for user in self.users:
            losses[user.index], user_steps, user_examples = self._train_block(user, round_index)
            steps += user_steps
            examples += user_examples
            self._save_user(user)
            status = f"loss {np.mean([v for u in losses.values() for v in u]):.4f}"
            progress.update(task, advance=1, status=status)
        self.fold_ledger(round_index)
        return losses, steps, examples

    def sums_here(self, round_index: int) -> dict[str, float]:
        return round_sums([r for u in self.users for r in u.account if int(r[1]) == round_index])

    def run(self, round_index: int, progress: Progress, task: TaskID) -> dict:
        progress.update(task, total=len(self.users))
        losses, steps, examples = self.links.train_users(self, round_index, progress, task)
        sums = self.links.round_sums(self, round_index)
        clients = list(range(self.method.user_count))
        in_order = [value for user in sorted(losses) for value in losses[user]]
        ledger = self.channel.ledger
        record = work_record(self.exp, ledger, round_index, clients, in_order, steps, examples)
        if (loss := self.links.train_loss()) is not None:  # the edges' sums, not the steps'
            record["train_loss"] = loss
        record |= {
            "active_fraction": sums["active"] / (sums["rows"] * len(self.keys)),
            "module_values": sums["module_values"],
            "module_values_all_active": sums["module_values_all_active"],
            "device_flops": sums["module_flops"] + sums["head_flops"],
            "device_flops_all_active": sums["module_flops_all_active"] + sums["head_flops"],
        }
        return record

    # -- files ---------------------------------------------------------------------------------
    def _write_traffic(self, rows: list[list], mode: str = "a") -> None:
        path = self.run_dir / "traffic.csv"
        fresh = mode == "w" or not path.is_file()
        with path.open("w" if fresh else "a", newline="") as handle:
            writer = csv.writer(handle)
            if fresh:
                writer.writerow(TRAFFIC_FIELDS)
            writer.writerows(rows)

    def write_round_files(self, run_dir: Path) -> None:
        if self.user_files:
            self.write_user_files()

    def write_user_files(self) -> None:
        """The users' per-step records so far: traffic.csv (appended), steps.csv, schedule."""
        self._write_traffic(self.traffic_rows)
        self.traffic_rows = []
        with (self.run_dir / "steps.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(("client", *FIELDS))
            for user in self.users:
                writer.writerows([user.index, *row] for row in user.account)
        write_schedule(
            self.run_dir / "schedule.json",
            self.keys,
            {u.index: torch.stack(u.schedule) for u in self.users},
        )

    def accounting(self) -> dict:
        """Run totals and the reductions relative to every module active at every step."""
        column = {name: i for i, name in enumerate(FIELDS)}
        rows = [r for u in self.users for r in u.account]

        def total(name: str) -> float:
            return float(sum(r[column[name]] for r in rows))

        def reduction(actual: float, reference: float) -> float:
            return 1.0 - actual / reference if reference else 0.0

        flops, flops_all = (
            total("module_flops") + total("head_flops"),
            total("module_flops_all_active") + total("head_flops"),
        )
        return {
            "steps": len(rows),
            "mean_active_modules": total("active") / max(1, len(rows)),
            "modules": len(self.keys),
            "module_traffic_values": total("module_values"),
            "module_traffic_values_all_active": total("module_values_all_active"),
            "module_traffic_reduction": reduction(
                total("module_values"), total("module_values_all_active")
            ),
            "module_traffic_bytes_measured": total("module_bytes"),
            "factor_upload_bytes": total("factor_bytes"),
            "total_bytes_measured": self.channel.ledger.total(),
            "module_flops": total("module_flops"),
            "module_flops_all_active": total("module_flops_all_active"),
            "module_flops_reduction": reduction(
                total("module_flops"), total("module_flops_all_active")
            ),
            "device_flops": flops,
            "device_flops_all_active": flops_all,
            "device_flops_reduction": reduction(flops, flops_all),
        }

    def finish(self, run_dir: Path, metrics: list[dict]) -> list[str]:
        return self.summary_lines(self.write_run_files()) if self.user_files else []

    def write_run_files(self) -> dict:
        """The end of the run: each user's schedule plot and accounting.json; the totals."""
        for user in self.users:
            plot_schedule(
                self.run_dir / f"schedule_client{user.index}.png",
                self.keys,
                torch.stack(user.schedule),
                f"user {user.index}",
            )
        totals = self.accounting()
        (self.run_dir / "accounting.json").write_text(json.dumps(totals, indent=2) + "\n")
        return totals

    def summary_lines(self, totals: dict) -> list[str]:
        o, t = self.method.opts, totals
        rule = f"threshold δ={o.threshold}" if o.threshold is not None else f"budget ρ={o.budget}"

        def row(label: str, key: str, unit: float = 1.0) -> str:
            return (
                f"| {label} | {t[key] / unit:.4g} | {t[key + '_all_active'] / unit:.4g} | "
                f"{t[key.removesuffix('_values') + '_reduction']:.1%} |"
            )

        return [
            "",
            "## DLoRA split execution and Kill-and-Revive",
            "",
            f"{len(self.users)} user(s) sharing one cloud model; {t['modules']} LoRA modules; "
            f"KR every τ={o.tau} steps, {rule}, {o.norm} change, revive {o.revive} "
            f"({o.revive_policy}), killed modules' forward: {o.killed_forward}; head and loss "
            f"on the {o.head_on}. Mean active modules per step: {t['mean_active_modules']:.2f}.",
            "",
            "| quantity | this run | all modules active | reduction |",
            "|---|---|---|---|",
            row("module activation traffic (floats, §1.4)", "module_traffic_values"),
            row("device LoRA GFLOPs", "module_flops", 1e9),
            row("device GFLOPs incl. head", "device_flops", 1e9),
            "",
            f"Measured: module messages {human_bytes(t['module_traffic_bytes_measured'])}, "
            f"factor uploads of killed modules {human_bytes(t['factor_upload_bytes'])}, all "
            f"messages {human_bytes(t['total_bytes_measured'])} (steps.csv, traffic.csv, "
            "accounting.json).",
            "",
            *[f"![schedule](schedule_client{u.index}.png)" for u in self.users],
        ]
