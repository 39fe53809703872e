"""lm-evaluation-harness on a run's adapter (issue 29, item 4): ``fedlora evaluate`` and
``eval.lm_eval_tasks``, on a tiny FedIT run of the random tiny LLaMA and a local multiple-choice
task YAML over a jsonl this module writes (offline). lm-eval's accuracy is checked against an
independent loop: one forward per (item, choice) of the same base and adapter built with peft,
the choice's log-probability summed over its tokens."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from fedlora.config import load_config
from fedlora.data.chat import Rendering
from fedlora.data.sources import load_split
from fedlora.harness import write_choice_task
from fedlora.models import load_base_model, load_tokenizer
from tests.conftest import ONE, TINY, run_cli

# Two short choices and a long one per item: the long one's summed log-likelihood is far
# lower, its per-character one is not, so acc and acc_norm choose differently on some items.
ITEMS = [
    ("What colour is the sky?", ["blue", "red", "green as the grass in spring"], 0),
    ("How many legs has a cat?", ["four", "six", "two and a tail that is long"], 0),
    ("Which is a fruit?", ["carrot", "apple", "a potato from the garden"], 1),
    ("What is frozen water?", ["ice", "steam", "rain falling from the clouds"], 0),
    ("Which animal barks?", ["cow", "dog", "a fish swimming in the sea"], 1),
    ("What do bees make?", ["milk", "honey", "silk for the finest of dresses"], 1),
    ("Which is the largest?", ["mouse", "elephant", "an ant carrying a leaf home"], 1),
    ("What is the opposite of hot?", ["cold", "warm", "wet like a day full of rain"], 0),
]
TASK = "fedlora_tiny_mc"
HOOK_LIMIT, CLI_LIMIT = 5, 6  # the run's eval.lm_eval_limit, and `fedlora evaluate --limit`


def context(question: str) -> str:
    """The task's doc_to_text (below); lm-eval puts its target_delimiter " " before a choice."""
    return f"Question: {question}\nAnswer:"


def write_task(directory: Path, answers: list[int]) -> Path:
    """A local lm-eval task: the YAML and its jsonl, in ``directory`` (the include path)."""
    directory.mkdir(parents=True)
    items = directory / "items.jsonl"
    rows = [
        {"question": q, "choices": c, "answer": a}
        for (q, c, _), a in zip(ITEMS, answers, strict=True)
    ]
    items.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (directory / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {items}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "  - metric: acc_norm\n"
    )
    return directory


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """The tiny causal FedIT run, listing the local task in ``eval.lm_eval_tasks``: (run
    directory, include path, the ``lm_eval/global.json`` the run itself wrote at its end)."""
    root = tmp_path_factory.mktemp("harness")
    tasks = write_task(root / "tasks", [answer for _, _, answer in ITEMS])
    out = root / "run"
    code, output = run_cli(
        "run", str(TINY / "causal" / "fedit.toml"), "--out", str(out), "--quiet", *ONE,
        "--set", "train.lr=0.02",  # an adapter that changes some choices (see the first test)
        "--set", "eval.max_generate=0", "--set", "data.max_test_examples=8",
        "--set", f"eval.lm_eval_tasks=['{TASK}']", "--set", f"eval.lm_eval_limit={HOOK_LIMIT}",
        "--set", f"eval.lm_eval_include_path='{tasks}'",
    )  # fmt: skip
    assert code == 0, output
    return out, tasks, json.loads((out / "lm_eval" / "global.json").read_text())


def build_model(run: Path, adapter: bool, directory: str = "adapter") -> torch.nn.Module:
    """The run's base rebuilt from its config (the tiny LLaMA is random from the run's seed),
    with the run's adapter (in ``directory``) loaded by peft, or without it."""
    config = load_config(run / "config.toml")
    tokenizer = load_tokenizer(config.model.name)
    base = load_base_model(config.model.name, 1, tokenizer, config.experiment.seed)
    model = PeftModel.from_pretrained(base, run / directory) if adapter else base
    return model.eval()


def log_likelihoods(model: torch.nn.Module, count: int) -> list[list[float]]:
    """Per item and choice: log P(" " + choice | context), one forward each. As lm-eval does
    for causal models, context + continuation are tokenized together and split at the
    context's own token count."""
    tokenizer = load_tokenizer("tiny-llama")
    scores = []
    for question, choices, _ in ITEMS[:count]:
        row = []
        for choice in choices:
            whole = tokenizer.encode(context(question) + " " + choice)
            start = len(tokenizer.encode(context(question)))
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([whole])).logits[0]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            row.append(sum(float(logprobs[start + i - 1, t]) for i, t in enumerate(whole[start:])))
        scores.append(row)
    return scores


def choices_of(scores: list[list[float]]) -> list[int]:
    """Each item's choice: the argmax of its log-likelihoods."""
    return [max(range(len(row)), key=row.__getitem__) for row in scores]


def accuracies(scores: list[list[float]], answers: list[int]) -> tuple[float, float]:
    """acc (the argmax of the log-likelihoods is the answer) and acc_norm (the argmax of the
    log-likelihoods divided by the choices' lengths in characters, lm-eval's definition)."""
    per_char = [
        [s / len(c) for s, c in zip(row, choices, strict=True)]
        for row, (_, choices, _) in zip(scores, ITEMS, strict=False)
    ]
    hits = [a == b for a, b in zip(choices_of(scores), answers, strict=False)]
    norm_hits = [a == b for a, b in zip(choices_of(per_char), answers, strict=False)]
    return sum(hits) / len(scores), sum(norm_hits) / len(scores)


ANSWERS = [answer for _, _, answer in ITEMS]


def evaluate(*args: str) -> tuple[int, str]:
    return run_cli("evaluate", *args)


def test_the_runs_adapter_is_trained_and_changes_the_choices(lm_run) -> None:
    """What makes the comparison below able to fail: the adapter is not its initialisation
    (B = 0), and without it the same items score differently, down to the choices made."""
    run, _, _ = lm_run
    state = load_file(run / "adapter" / "adapter_model.safetensors")
    assert all(float(v.abs().max()) > 0 for k, v in state.items() if "lora_B" in k)
    with_adapter = log_likelihoods(build_model(run, adapter=True), CLI_LIMIT)
    without = log_likelihoods(build_model(run, adapter=False), CLI_LIMIT)
    assert (torch.tensor(with_adapter) - torch.tensor(without)).abs().max() > 1e-3
    assert choices_of(with_adapter) != choices_of(without)


def test_lm_eval_accuracy_equals_a_naive_loop_over_the_same_items(lm_run, tmp_path: Path) -> None:
    """The answer key is the naive loop's own choices with the adapter: lm-eval's acc is 1
    exactly when it chooses as the loop does on every item (the base alone, which chooses
    otherwise on some, would score less), and its acc_norm is the loop's per-character one."""
    run, _, _ = lm_run
    scores = log_likelihoods(build_model(run, adapter=True), len(ITEMS))
    key = choices_of(scores)
    tasks = write_task(tmp_path / "tasks", key)
    code, output = evaluate(
        str(run), "--tasks", TASK, "--limit", str(CLI_LIMIT), "--include-path", str(tasks)
    )
    assert code == 0, output
    entry = json.loads((run / "lm_eval" / "global.json").read_text())
    metrics = entry["results"][TASK]
    assert entry["n-samples"][TASK]["effective"] == CLI_LIMIT
    acc, acc_norm = accuracies(scores[:CLI_LIMIT], key)
    assert acc == 1.0 and acc_norm < 1.0  # per character, some choices change
    assert metrics["acc,none"] == pytest.approx(acc, abs=1e-12)
    assert metrics["acc_norm,none"] == pytest.approx(acc_norm, abs=1e-12)


def test_a_config_listing_tasks_scores_the_final_adapter_at_the_end_of_the_run(lm_run) -> None:
    run, _, entry = lm_run
    assert (entry["adapter"], entry["tasks"], entry["limit"]) == ("global", [TASK], HOOK_LIMIT)
    assert entry["n-samples"][TASK]["effective"] == HOOK_LIMIT
    scores = log_likelihoods(build_model(run, adapter=True), HOOK_LIMIT)
    acc, acc_norm = accuracies(scores, ANSWERS)
    assert entry["results"][TASK]["acc,none"] == pytest.approx(acc, abs=1e-12)
    assert entry["results"][TASK]["acc_norm,none"] == pytest.approx(acc_norm, abs=1e-12)


def test_results_file_summary_section_and_report(lm_run, tmp_path: Path) -> None:
    """The JSON record, summary.md's section (replaced on a second evaluation, the rest of the
    file kept) and ``fedlora report``'s table."""
    run, tasks, _ = lm_run
    code, output = evaluate(str(run), "--tasks", TASK, "--include-path", str(tasks))
    assert code == 0, output
    entry = json.loads((run / "lm_eval" / "global.json").read_text())
    assert entry["limit"] is None and entry["lm_eval_version"] == "0.4.13"
    assert entry["date"] and entry["model"] == "tiny-llama" and entry["method"] == "fedit"
    acc = entry["results"][TASK]["acc,none"]
    summary = (run / "summary.md").read_text()
    assert summary.count("## lm-evaluation-harness") == 1  # the run's section was replaced
    assert "## Results" in summary and "## Communication" in summary
    section = summary.split("## lm-evaluation-harness")[1]
    assert f"| global | {TASK} | acc | {acc:.4f} |" in section
    assert f"| {len(ITEMS)} |" in section
    code, output = run_cli("report", str(run), "--out", str(tmp_path / "report"))
    assert code == 0, output
    for text in (output, (tmp_path / "report" / "comparison.md").read_text()):
        assert "lm-evaluation-harness" in text and f"| global | {TASK} | acc | {acc:.4f} |" in text


def test_each_clients_own_adapter_is_scored_for_a_per_client_method(lm_run, tmp_path) -> None:
    """FedSA keeps an adapter per client: by default each is scored, into its own file, and
    each file's accuracy is that of the loop with that client's adapter."""
    _, tasks, _ = lm_run
    run = tmp_path / "fedsa"
    code, output = run_cli(
        "run", str(TINY / "causal" / "fedit.toml"), "--out", str(run), "--quiet", *ONE,
        "--set", "method.name=fedsa", "--set", "partition.num_clients=2",
        "--set", "experiment.rounds=1", "--set", "eval.max_generate=0",
        "--set", "data.max_test_examples=8",
    )  # fmt: skip
    assert code == 0, output
    code, output = evaluate(str(run), "--tasks", TASK, "--include-path", str(tasks))
    assert code == 0, output
    assert sorted(p.name for p in (run / "lm_eval").iterdir()) == ["client_0.json", "client_1.json"]
    section = (run / "summary.md").read_text().split("## lm-evaluation-harness")[1]
    for client in (0, 1):
        entry = json.loads((run / "lm_eval" / f"client_{client}.json").read_text())
        model = build_model(run, adapter=True, directory=f"adapters/client_{client}")
        acc, _ = accuracies(log_likelihoods(model, len(ITEMS)), ANSWERS)
        assert entry["adapter"] == f"client_{client}"
        assert entry["results"][TASK]["acc,none"] == pytest.approx(acc, abs=1e-12)
        assert f"| client_{client} | {TASK} | acc | {acc:.4f} |" in section


def one_line_error(code: int, output: str) -> str:
    assert code == 2, output
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    return lines[0]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--tasks", TASK], "no such run directory"),
        (["--tasks", TASK, "--adapter", "client_7"], "has no client_7 adapter"),
        (["--tasks", "no_such_task_xyz"], "lm-eval task 'no_such_task_xyz' is not a task"),
        (["--tasks", "arc_easy"], "lm-eval task 'arc_easy': its data could not be loaded"),
    ],
    ids=["missing-run", "missing-client", "unknown-task", "registry-task-offline"],
)
def test_bad_input_is_one_line_and_exit_code_2(
    lm_run, args: list[str], fragment: str, tmp_path: Path
) -> None:
    run, _, _ = lm_run
    target = tmp_path / "nowhere" if fragment == "no such run directory" else run
    line = one_line_error(*evaluate(str(target), *args))
    assert fragment in line
    if "arc_easy" in fragment:
        assert "--include-path" in line


def test_a_registry_task_with_the_hub_out_of_reach_is_one_line(
    lm_run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Offline mode off and no hub (here a closed local port): one line saying so, at once,
    instead of datasets' retries (this process's datasets is in offline mode: without the
    check, its own error would be reported)."""
    run, _, _ = lm_run
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    line = one_line_error(*evaluate(str(run), "--tasks", "arc_easy"))
    assert "'arc_easy': its data could not be loaded" in line
    assert "cannot be reached" in line and "HF_HUB_OFFLINE=1" in line


def test_a_classification_run_is_refused(fedit_run: Path) -> None:
    line = one_line_error(*evaluate(str(fedit_run), "--tasks", TASK))
    assert "scores causal language models" in line and "tiny-bert" in line


@pytest.mark.parametrize(
    ("config", "task", "fragment"),
    [
        ("fedit.toml", TASK, "scores causal language models"),
        ("causal/fedit.toml", "no_such_task_xyz", "'no_such_task_xyz' is not a task"),
        ("causal/fedit.toml", "arc_easy", "'arc_easy': its data could not be loaded"),
    ],
    ids=["classifier", "unknown-task", "registry-task-offline"],
)
def test_a_config_listing_tasks_that_cannot_run_is_refused_before_training(
    config: str, task: str, fragment: str, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    listed = f"eval.lm_eval_tasks=['{task}']"
    code, output = run_cli("run", str(TINY / config), "--out", str(out), "--set", listed)
    assert fragment in one_line_error(code, output)
    assert not (out / "metrics.jsonl").exists()


def test_lm_eval_accuracy_equals_fedloras_evaluator_on_the_same_items(tmp_path: Path) -> None:
    """The same multiple-choice items, rendered as fedlora renders them (chat template),
    scored by fedlora's evaluator during the run and by lm-eval on the run's adapter: the same
    accuracy. (Not acc_norm: lm-eval moves the prompt's trailing newline into every choice, a
    term equal across an item's choices, which leaves acc alone but, divided by the choices'
    lengths, reorders acc_norm where it is large, as on this random model.)"""
    rows = [
        {"question": question, "choices": choices, "answer": answer}
        for question, choices, answer in ITEMS
    ]
    items, train = tmp_path / "items.jsonl", tmp_path / "train.jsonl"
    items.write_text("".join(json.dumps(row) + "\n" for row in rows))
    train.write_text("".join(json.dumps(row) + "\n" for row in rows * 4))
    out = tmp_path / "run"
    code, output = run_cli(
        "run", str(TINY / "causal" / "fedit.toml"), "--out", str(out), "--quiet", *ONE,
        "--set", "train.lr=0.02", "--set", f"data.dataset='{train}'",
        "--set", "partition.kind='iid'", "--set", f"data.test_file='{items}'",
        "--set", "model.max_length=96",
    )  # fmt: skip
    assert code == 0, output
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    config = load_config(out / "config.toml")
    split = load_split(config.data, needs_answers=True)
    tasks = write_choice_task(
        split.test, load_tokenizer("tiny-llama"), Rendering(), tmp_path / "tasks", "same_items"
    )
    code, output = evaluate(str(out), "--tasks", "same_items", "--include-path", str(tasks))
    assert code == 0, output
    scored = json.loads((out / "lm_eval" / "global.json").read_text())
    metrics = scored["results"]["same_items"]
    assert len(split.test) == len(ITEMS)
    assert metrics["acc,none"] == pytest.approx(final["mc_accuracy"])
