"""The run directory: what a finished run leaves behind.

config.toml            the resolved config (defaults filled in)
metrics.jsonl          one line per round, from round 0 (the initial model, evaluated)
ledger.jsonl           one line per transfer: round, sender, receiver, bytes
checkpoint.safetensors the state after the last completed round (for --resume)
adapter/               the final global adapter in PEFT format (if the method has one)
adapters/client_<i>/   per-client adapters (methods whose clients keep their own model)
rank<k>/               a distributed deployment's rank k: its own checkpoint (and DLoRA's
                       per-step files of its users); rank 0's is checkpoint.safetensors above
flower-status.json     a Flower deployment's end (written by fedlora.flower.server_app)
summary.md             tables: final metrics, bytes, client label histograms (and lm-eval's)
lm_eval/<adapter>.json lm-evaluation-harness results (``eval.lm_eval_tasks``, ``fedlora evaluate``)
<metric>.png           the metric over training from round 0, by round (or examples seen)
                       and by bytes on the wire (``fedlora.report``)
"""

from __future__ import annotations

from pathlib import Path

import tomli_w

from fedlora.channel import human_bytes
from fedlora.checkpoint import FILE as CHECKPOINT
from fedlora.checkpoint import remove_partial
from fedlora.config import Config, ConfigError, load_config
from fedlora.engines.loop import RunResult
from fedlora.experiment import Experiment
from fedlora.harness import after_run
from fedlora.report import RunView, markdown_table, plot_run
from fedlora.tensors import TensorDict


def out_dir(out: Path | None, config: Config) -> Path:
    """``--out``, or ``runs/<experiment.name>`` (the same default on every rank)."""
    return out or Path("runs") / config.experiment.name


def prepare(out: Path, config: Config, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory; choose a directory")
    remove_partial(out)
    has_checkpoint = (out / CHECKPOINT).is_file()
    if resume and not has_checkpoint:
        raise ConfigError(f"--resume: {out} holds no checkpoint to resume from")
    if not resume and has_checkpoint:
        raise ConfigError(
            f"{out} already holds a run; pass --resume to continue it or choose another --out"
        )
    if resume:
        check_same_config(out / "config.toml", config)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(tomli_w.dumps(config.model_dump(exclude_none=True)))


def check_same_config(saved_path: Path, config: Config) -> None:
    """Refuse to resume under a config other than the saved one, naming the keys that differ.

    Both are compared after validation, so a run saved before fedlora gained a setting (whose
    default the saved file therefore lacks) resumes as long as the setting keeps its default."""
    try:
        saved = load_config(saved_path)
    except ConfigError as error:
        raise ConfigError(
            f"--resume: the config saved in {saved_path} is no longer valid: {error}"
        ) from None
    changed = differing_keys(saved.model_dump(), config.model_dump())
    if changed:
        more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
        shown = ", ".join(changed[:5]) + more
        raise ConfigError(
            f"--resume: the config differs from the one saved in {saved_path} in {shown}; "
            "resume with the saved config, or start a new run in another --out"
        )


def differing_keys(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dumps."""
    keys = []
    for key in sorted(saved.keys() | current.keys()):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += differing_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def export_adapters(experiment: Experiment, result: RunResult, out: Path) -> list[Path]:
    method = experiment.method
    written = []
    state = method.global_state()
    if state is not None:
        experiment.slots.export(state, out / "adapter")
        written.append(out / "adapter")
    return written + export_client_adapters(experiment, result.stores, out)


def export_client_adapters(
    experiment: Experiment, stores: dict[int, TensorDict], out: Path
) -> list[Path]:
    """Each client's own adapter (``per_client_eval`` methods) of the ``stores`` given: all of
    them in one process; in a distributed deployment, each rank exports the clients it holds."""
    method, written = experiment.method, []
    if method.per_client_eval:
        for client, store in stores.items():
            for folder, adapter in method.client_exports(client, store).items():
                target = out / "adapters" / f"client_{client}" / folder
                experiment.slots.export(adapter, target)
                written.append(target)
    return written


def summary_markdown(experiment: Experiment, result: RunResult, out: Path) -> str:
    config = experiment.config
    names = experiment.split.label_names
    ledger = result.ledger
    lines = [
        f"# {config.experiment.name}",
        "",
        f"method `{config.method.name}`, model `{config.model.name}`, "
        f"data `{config.data.dataset}`, {len(experiment.clients)} clients "
        f"({config.partition.kind}), {config.experiment.rounds} rounds, "
        f"seed {config.experiment.seed}",
        "",
        split_line(experiment),
        "",
        "## Results",
        "",
        markdown_table([RunView(out, config.method.name, result.metrics)]),
        "",
        "## Communication",
        "",
        f"up (to the server) {human_bytes(ledger.total('up'))}, "
        f"down {human_bytes(ledger.total('down'))}, total {human_bytes(ledger.total())} "
        f"({ledger.total()} bytes measured on the serialized messages)",
        "",
        "## Client data (training examples per label)",
        "",
        "| client | " + " | ".join(names) + " | total |",
        "|" + "---|" * (len(names) + 2),
    ]
    for client, row in enumerate(experiment.histograms):
        lines.append(f"| {client} | " + " | ".join(str(x) for x in row) + f" | {sum(row)} |")
    lines += reliability_lines(result)
    if experiment.privacy is not None:
        lines += experiment.privacy.summary_lines(result.metrics, result.stopped)
    ranks = experiment.method.context.ranks
    lines += [
        "",
        f"## Client LoRA ranks (profile `{config.ranks.profile}`, slot rank {config.lora.rank})",
        "",
        ", ".join(f"client {c}: r={r}" for c, r in enumerate(ranks)),
    ]
    return "\n".join([*lines, *result.notes]) + "\n"


def split_line(experiment: Experiment) -> str:
    """Where the evaluated rows came from: carved (with their shares) or given files."""
    data, split = experiment.config.data, experiment.split
    test = f"`{data.test_file}`" if data.test_file else f"{data.test_fraction:g} held out"
    parts = [f"{len(split.train)} training examples", f"{len(split.test)} test ({test})"]
    if split.validation is not None:
        given = data.validation_file
        source = f"`{given}`" if given else f"{data.validation_fraction:g} of the training data"
        parts.append(f"{len(split.validation)} validation ({source}, no client trains on it)")
    if split.has_answers:
        parts.append(f"format `{split.format}`")
    dropped = [f"{n} {name}" for name, n in split.dropped.items()]
    if dropped:
        parts.append(
            f"records dropped as too long for model.max_length {experiment.config.model.max_length}"
            f" (data.truncation `{data.truncation}`): {', '.join(dropped)}"
        )
    return "Data: " + ", ".join(parts) + "."


def reliability_lines(result: RunResult) -> list[str]:
    """Missing and refused replies, and skipped rounds, when there were any."""
    absent = [
        (m["round"], c, why) for m in result.metrics for c, why in m.get("absent", {}).items()
    ]
    skipped = [m["round"] for m in result.metrics if m.get("skipped")]
    rejected = result.ledger.rejections()
    left = [(m["round"], c) for m in result.metrics for c in m.get("left_after_masking", [])]
    if not absent and not skipped and not rejected and not left:
        return []
    lines = [
        "",
        "## Reliability",
        "",
        f"{len(rejected)} messages refused by their receiver, {len(absent)} client replies "
        f"missing (dropouts, stragglers, refused messages), {len(skipped)} rounds skipped "
        f"(fewer accepted replies than federation.min_replies, or a secure sum that failed)"
        + (f": rounds {', '.join(map(str, skipped))}" if skipped else ""),
        "",
    ]
    lines += [f"- round {r}: client {c}: {why}" for r, c, why in absent[:50]]
    lines += [
        f"- round {r}: client {c} vanished after its masked input (its input is in the sum, "
        "recovered from the others' shares)"
        for r, c in left[:50]
    ]
    return lines


def finish(experiment: Experiment, result: RunResult, out: Path) -> None:
    """The run's files, then ``eval.lm_eval_tasks`` on the adapters just exported."""
    exported = export_adapters(experiment, result, out)
    config = experiment.config
    label = f"{config.experiment.name} ({config.method.name})"
    dump, tested = config.model_dump(exclude_none=True), len(experiment.split.test)
    plot_run(RunView(out, label, result.metrics, dump, tested), out)
    (out / "summary.md").write_text(summary_markdown(experiment, result, out))
    after_run(config, out, exported)
