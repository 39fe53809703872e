"""lm-evaluation-harness on a run's adapters: ``fedlora evaluate``, and ``eval.lm_eval_tasks``
after a run's last round.

The run's base is rebuilt as the run built it (model, seed, storage dtype, 4-bit quantization,
device: its saved ``config.toml``), the run's PEFT adapter is loaded onto it with
``PeftModel.from_pretrained``, and that model object is handed to lm-eval's Hugging Face class
(``HFLM``), so lm-eval scores it exactly as it scores any Hugging Face causal model. What it
writes into the run directory:

lm_eval/<adapter>.json   lm-eval's per-task metrics, with the tasks, limit, adapter, lm-eval
                         version and date (``global``, or ``client_<k>`` for per-client methods)
summary.md               its section ``## lm-evaluation-harness``: every adapter's metrics

torch, transformers, peft and lm-eval are imported only where needed: a wrong run directory or
``--adapter`` is answered before any of them loads, and a run without lm-eval tasks never
loads lm-eval.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora import hub
from fedlora.config import Config, ConfigError, load_config
from fedlora.extras import require
from fedlora.methods import method_class
from fedlora.methods.base import Method
from fedlora.report import LM_EVAL, LM_EVAL_SECTION, lm_eval_table

if TYPE_CHECKING:
    from datasets import Dataset
    from lm_eval.tasks import TaskManager
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

    from fedlora.compute import Compute
    from fedlora.data.chat import Rendering

GLOBAL, ALL = "global", "all"
CLIENT = re.compile(r"client_\d+")


@dataclass(frozen=True)
class Tasks:
    """What to run: lm-eval task (group, tag) names, items per task, local task YAMLs."""

    names: tuple[str, ...]
    limit: int | None = None
    include_path: Path | None = None


def check_scorable(config: Config) -> None:
    """lm-eval scores causal language models, and the run's exported adapter must be its whole
    trained model: methods that merge their updates into the frozen base (``base_offset``) do
    not export that base, so their adapter alone would be scored on the untrained one."""
    from fedlora.models import model_spec  # transformers: after the cheap checks

    if model_spec(config.model.name).task != "causal":
        raise ConfigError(
            f"lm-evaluation-harness scores causal language models; model {config.model.name!r} "
            "is a sequence classifier (its run is scored by fedlora's own accuracy and F1)"
        )
    name = config.method.name
    if method_class(name).base_offset is not Method.base_offset:
        raise ConfigError(
            f"method {name!r} merges its updates into the frozen base, which the run does not "
            "export: its adapter alone is not the trained model, so lm-eval cannot score it"
        )


def check_run_tasks(config: Config) -> None:
    """A config's ``eval.lm_eval_tasks``, before any training: the model and method can be
    scored, and every task is known to lm-eval (or in ``lm_eval_include_path``) and its data
    loads (offline, a registry task's does not: better said now than after the last round)."""
    tasks = tasks_of(config)
    if tasks.names:
        check_scorable(config)
        check_loadable(tasks)


@functools.cache
def check_loadable(tasks: Tasks) -> None:
    """Once per process (the run's checks are made twice: by the command, then the engine)."""
    load_tasks(check_names(tasks), tasks)


def tasks_of(config: Config) -> Tasks:
    include = config.eval.lm_eval_include_path
    names = tuple(config.eval.lm_eval_tasks)
    return Tasks(names, config.eval.lm_eval_limit, include and Path(include))


# -- tasks ------------------------------------------------------------------------------------
@functools.cache
def task_manager(include_path: Path | None, defaults: bool) -> TaskManager:
    """lm-eval's index of task YAMLs, built once per process: its ~15,000 registry tasks take
    ~8 s to index, an include path alone a moment."""
    from lm_eval.tasks import TaskManager

    quiet_lm_eval()
    return TaskManager(include_path=include_path and str(include_path), include_defaults=defaults)


def manager_for(tasks: Tasks) -> TaskManager:
    """The include path's own index when every name is one of its tasks, else lm-eval's whole
    index (the include path's tasks taking precedence, as in lm-eval): a local group or tag
    may name registry tasks, which only the whole index can build."""
    if tasks.include_path is not None:
        if not tasks.include_path.is_dir():
            raise ConfigError(f"--include-path {tasks.include_path}: no such directory")
        local = task_manager(tasks.include_path, defaults=False)
        if all(name in local.all_subtasks for name in tasks.names):
            return local
    return task_manager(tasks.include_path, defaults=True)


def known(manager: TaskManager, name: str) -> bool:
    """A task, group or tag name of the index, or a task YAML's path (what lm-eval accepts)."""
    path = Path(name)
    return name in manager.all_tasks or (path.suffix in (".yaml", ".yml") and path.is_file())


def check_names(tasks: Tasks) -> TaskManager:
    """The index that knows every name; an unknown name is a ``ConfigError`` naming it."""
    if not tasks.names:
        raise ConfigError("--tasks names no task; give lm-eval task names, comma-separated")
    manager = manager_for(tasks)
    for name in tasks.names:
        if not known(manager, name):
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            where = f" nor in {tasks.include_path}" if tasks.include_path else ""
            raise ConfigError(
                f"lm-eval task {name!r} is not a task, group or tag of lm-eval "
                f"{version('lm_eval')}{where}{hint}"
            )
    return manager


def load_tasks(manager: TaskManager, tasks: Tasks) -> list[Any]:
    """Every named task built (its data loaded) once, one name at a time, so that data that
    cannot be loaded is reported with its task's name."""
    built = []
    for name in tasks.names:
        try:
            if hub_out_of_reach(name, tasks):
                raise ConnectionError(hub.why_unavailable())
            built += roots(manager.load([name]))
        except OSError as error:  # datasets: offline, unreachable, missing files
            raise ConfigError(
                f"lm-eval task {name!r}: its data could not be loaded ({one_line(error)}); "
                "offline, a local task YAML over local files works: --include-path DIR"
            ) from None
    return built


def hub_out_of_reach(name: str, tasks: Tasks) -> bool:
    """A task of lm-eval's registry (its data on the hub; not an include path's YAML) while
    the hub cannot be reached and offline mode is off: ``datasets`` would retry each request
    for ~30 s, printing every retry, where one line can say so at once."""
    local = tasks.include_path and task_manager(tasks.include_path, defaults=False)
    if local and known(local, name):
        return False
    return not hub.offline_mode() and not hub.reachable(hub.endpoint())


def roots(loaded: dict) -> list[Any]:
    """The top of what ``TaskManager.load`` built: groups inside no other group, tasks inside
    no group (a tag's tasks each), so that lm-eval aggregates each group as it would."""
    children = {child for names in loaded["group_map"].values() for child in names}
    grouped = {t.task_name for g in loaded["groups"].values() for t in g.get_all_tasks()}
    groups = [g for name, g in loaded["groups"].items() if name not in children]
    return groups + [t for name, t in loaded["tasks"].items() if name not in grouped]


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def quiet_lm_eval() -> None:
    """lm-eval logs a warning for every in-memory model it is given (the only way we use it)."""
    logging.getLogger("lm_eval").setLevel(logging.ERROR)


# -- the model --------------------------------------------------------------------------------
def run_config(run: Path) -> Config:
    if not run.is_dir():
        raise ConfigError(f"{run}: no such run directory")
    if not (run / "config.toml").is_file():
        raise ConfigError(f"{run} is not a run directory (no config.toml)")
    return load_config(run / "config.toml")


def adapter_dir(run: Path, adapter: str) -> Path:
    return run / "adapter" if adapter == GLOBAL else run / "adapters" / adapter


def client_adapters(run: Path) -> list[str]:
    found = [p.name for p in (run / "adapters").glob("client_*") if CLIENT.fullmatch(p.name)]
    return sorted(found, key=lambda name: int(name.removeprefix("client_")))


def chosen_adapters(run: Path, config: Config, choice: str | None) -> list[str]:
    """``--adapter``: ``global``, ``client_<k>``, ``all``; by default the model(s) the run
    itself evaluated: each client's own for per-client methods, else the global one."""
    if choice is None:
        per_client = method_class(config.method.name).per_client_eval
        choice = ALL if per_client else GLOBAL
    if choice == ALL:
        has_global = (run / "adapter").is_dir()
        adapters = ([GLOBAL] if has_global else []) + client_adapters(run)
        if not adapters:
            raise ConfigError(f"{run} holds no adapter (adapter/ or adapters/client_<k>/)")
        return adapters
    if choice != GLOBAL and not CLIENT.fullmatch(choice):
        raise ConfigError(f"--adapter {choice!r}: use global, client_<k> or all")
    if not adapter_dir(run, choice).is_dir():
        clients = client_adapters(run)
        has = f"it has {', '.join(clients)}" if clients else "it has no per-client adapters"
        raise ConfigError(f"{run} has no {choice} adapter ({adapter_dir(run, choice)}); {has}")
    return [choice]


def load_model(
    run: Path, config: Config, adapter: str
) -> tuple[PeftModel, PreTrainedTokenizerBase, Compute]:
    """The run's base, built as ``fedlora.experiment.build`` builds it, with the adapter."""
    import torch
    from peft import PeftModel

    from fedlora.compute import resolve
    from fedlora.models import load_base_model, load_tokenizer, model_spec, place_base
    from fedlora.nf4 import quantize_nf4

    compute = resolve(config.compute)
    tokenizer = load_tokenizer(config.model.name)
    quantized = config.model.quantize_4bit
    storage = compute.dtype if compute.stores_base_in_dtype and not quantized else torch.float32
    # A causal LM has no label head: the number of labels is not used.
    base = load_base_model(config.model.name, 1, tokenizer, config.experiment.seed, storage)
    if quantized:
        quantize_nf4(base, model_spec(config.model.name).head, compute)
    place_base(base, compute, quantized)
    return PeftModel.from_pretrained(base, adapter_dir(run, adapter)), tokenizer, compute


# -- scoring and files ------------------------------------------------------------------------
def score(
    run: Path, config: Config, adapter: str, tasks: Tasks, manager: TaskManager, batch_size: int
) -> dict:
    """lm-eval's results for one adapter: its Hugging Face class around the in-memory model, in
    the run's compute dtype (autocast, as the run computed), then ``simple_evaluate``. The
    tasks are built first (data that cannot be loaded stops it before the model is built), and
    afresh for each adapter: lm-eval's task objects hold the state of one evaluation."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    quiet_lm_eval()
    built = load_tasks(manager, tasks)
    model, tokenizer, compute = load_model(run, config, adapter)
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        mixed_precision_dtype=compute.dtype if compute.mixed else None,
    )
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=built,
        limit=tasks.limit,
        task_manager=manager,
        log_samples=False,
    )


def record(results: dict, adapter: str, tasks: Tasks, config: Config) -> dict:
    """What ``lm_eval/<adapter>.json`` keeps of lm-eval's results (no per-item samples)."""
    return {
        "adapter": adapter,
        "tasks": list(tasks.names),
        "limit": tasks.limit,
        "include_path": tasks.include_path and str(tasks.include_path),
        "lm_eval_version": version("lm_eval"),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": config.model.name,
        "method": config.method.name,
        "results": results["results"],
        "groups": results.get("groups", {}),
        "n-shot": results["n-shot"],
        "n-samples": results["n-samples"],
        "versions": results["versions"],
        "higher_is_better": results["higher_is_better"],
    }


def write_record(run: Path, entry: dict) -> Path:
    from lm_eval.utils import handle_non_serializable  # numpy scalars, as lm-eval writes them

    path = run / LM_EVAL / f"{entry['adapter']}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(entry, indent=2, default=handle_non_serializable) + "\n")
    return path


def write_summary(run: Path) -> None:
    """summary.md's lm-eval section, from every ``lm_eval/*.json`` of the run: replaced where
    it exists, else appended; the rest of the file is kept."""
    table = lm_eval_table([(run.name, run)])
    body = [
        LM_EVAL_SECTION,
        "",
        "lm-evaluation-harness on the run's base with its PEFT adapter (`fedlora evaluate`, or "
        f"`eval.lm_eval_tasks`); items: documents scored per task; files: `{LM_EVAL}/`.",
        "",
        *(table.splitlines() if table else []),
    ]
    summary = run / "summary.md"
    text = summary.read_text() if summary.is_file() else ""
    summary.write_text(with_section(text, body))


def with_section(text: str, body: list[str]) -> str:
    """``text`` with the section titled ``body[0]`` (up to the next ``## `` heading) replaced
    by ``body``, or ``body`` appended after a blank line."""
    lines = text.splitlines()
    if body[0] in lines:
        start = lines.index(body[0])
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        before, after = lines[:start], lines[end:]
    else:
        before, after = lines, []
    while before and not before[-1].strip():
        before.pop()
    gap = [""] if before else []
    return "\n".join([*before, *gap, *body, *([""] if after else []), *after]) + "\n"


def evaluate_run(
    run: Path, tasks: Tasks, adapter: str | None = None, batch_size: int | None = None
) -> list[Path]:
    """``fedlora evaluate``: every chosen adapter scored on every task; the files written."""
    require("lm_eval", "eval", "fedlora evaluate")
    config = run_config(run)
    adapters = chosen_adapters(run, config, adapter)
    check_scorable(config)
    return score_adapters(run, config, adapters, tasks, batch_size or config.eval.batch_size)


def score_adapters(
    run: Path, config: Config, adapters: list[str], tasks: Tasks, batch_size: int
) -> list[Path]:
    manager = check_names(tasks)
    written = []
    for adapter in adapters:
        results = score(run, config, adapter, tasks, manager, batch_size)
        written.append(write_record(run, record(results, adapter, tasks, config)))
        write_summary(run)
    return written


def after_run(config: Config, run: Path, exported: list[Path]) -> list[Path]:
    """``eval.lm_eval_tasks`` at the end of a run: the adapters this process just exported
    that the run evaluated itself (each client's own, or the global one)."""
    tasks = tasks_of(config)
    if not tasks.names:
        if (run / LM_EVAL).is_dir():  # the rewritten summary.md keeps earlier lm-eval results
            write_summary(run)
        return []
    per_client = method_class(config.method.name).per_client_eval
    names = [GLOBAL if path.name == "adapter" else path.name for path in exported]
    adapters = [name for name in names if (name != GLOBAL) == per_client]
    try:
        return score_adapters(run, config, adapters, tasks, config.eval.batch_size)
    except ConfigError as error:
        raise ConfigError(f"the run is complete in {run}; eval.lm_eval_tasks: {error}") from None


def write_choice_task(
    items: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    rendering: Rendering,
    directory: Path,
    name: str,
) -> Path:
    """Multiple-choice conversations (``fedlora.data.records``) as a local lm-eval task: a
    jsonl of each item's context rendered as fedlora renders it (chat template, generation
    prompt), its choices and its answer, and a YAML that scores the choices right after the
    context (``target_delimiter`` empty), so that lm-eval and fedlora's evaluator score the
    same continuations of the same prompts. Returns the include path."""
    from fedlora.data.chat import messages_of, render

    template = rendering.template(tokenizer)
    directory.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "context": render(tokenizer, template, messages_of(item)[:-1], generation_prompt=True),
            "choices": item["choices"],
            "gold": item["gold"],
        }
        for item in items
    ]
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (directory / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data.resolve()}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: gold\n"
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return directory
