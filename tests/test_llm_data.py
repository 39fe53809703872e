"""Language-model data: the record formats, the chat template's loss mask, truncation, the
built-in multiple-choice set, hub ids and the errors for bad records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from datasets import Dataset

from fedlora.config import ConfigError, DataConfig
from fedlora.data.chat import IGNORE, PLAIN_TEMPLATE, Rendering
from fedlora.data.records import conversations
from fedlora.data.sources import bbc_news, load_split
from fedlora.data.token_cache import tokenize_cached
from fedlora.data.tokenized import tokenize
from fedlora.models import load_tokenizer
from tests.conftest import TINY, run_cli

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny-llama")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def encoded(tokenizer, rows: list[dict], max_length: int = 256, **data: object):
    table, kind = conversations(Dataset.from_list(rows), DataConfig(**data), "rows")
    rendering = Rendering(
        data.get("chat_template", "auto"),  # type: ignore[arg-type]
        data.get("truncation", "left"),  # type: ignore[arg-type]
    )
    return tokenize(table, tokenizer, max_length, causal=True, rendering=rendering), kind


def loss_text(tokenizer, ids: list[int], targets: list[int]) -> str:
    return tokenizer.decode([t for t in targets if t != IGNORE])


# -- the loss mask -------------------------------------------------------------------------------
def test_two_turn_messages_carry_loss_on_exactly_the_assistant_turns(tokenizer) -> None:
    """Checked token by token against a construction of our own: the ChatML pieces written
    out by hand, each tokenized alone (ChatML's boundaries are special tokens), loss on the
    assistant pieces only."""
    turns = [
        {"role": "user", "content": "Name a prime number."},
        {"role": "assistant", "content": "Seven is prime."},
        {"role": "user", "content": "And an even one?"},
        {"role": "assistant", "content": "Two, the only even prime."},
    ]
    data, kind = encoded(tokenizer, [{"messages": turns}])
    assert kind == "messages"
    pieces = [
        (f"{SYSTEM}<|im_end|>\n<|im_start|>user\nName a prime number.<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False),
        ("Seven is prime.<|im_end|>\n", True),
        ("<|im_start|>user\nAnd an even one?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Two, the only even prime.<|im_end|>\n", True),
    ]
    rendered = tokenizer.apply_chat_template(turns, tokenize=False)
    assert rendered == "".join(text for text, _ in pieces)
    ids, targets = [], []
    for text, learned in pieces:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        targets += piece if learned else [IGNORE] * len(piece)
    assert data.input_ids[0] == ids
    assert data.labels[0] == targets
    # Generation starts from the conversation before the last answer.
    assert tokenizer.decode(data.prompts[0]) == "".join(text for text, _ in pieces[:4])
    assert data.answers == ["Two, the only even prime."]


def test_sharegpt_turns_and_a_system_turn(tokenizer) -> None:
    rows = [
        {
            "conversations": [
                {"from": "system", "value": "Be brief."},
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello."},
            ]
        }
    ]
    data, kind = encoded(tokenizer, rows)
    assert kind == "messages"
    assert tokenizer.decode(data.input_ids[0]).startswith("<|im_start|>system\nBe brief.")
    assert loss_text(tokenizer, data.input_ids[0], data.labels[0]) == "Hello.<|im_end|>\n"


@pytest.mark.parametrize(
    ("row", "kind", "user"),
    [
        (
            {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
            "alpaca",
            "Translate to French.\n\ncat",
        ),
        ({"instruction": "Say hi.", "input": "", "output": "hi"}, "alpaca", "Say hi."),
        ({"prompt": "Capital of Italy?", "completion": "Rome"}, "prompt_completion", None),
        ({"text": "Capital of Spain?", "answer": "Madrid"}, "text", None),
    ],
)
def test_instruction_formats_learn_only_the_answer(tokenizer, row, kind, user) -> None:
    data, detected = encoded(tokenizer, [row])
    assert detected == kind
    answer = row.get("output") or row.get("completion") or row.get("answer")
    assert loss_text(tokenizer, data.input_ids[0], data.labels[0]) == f"{answer}<|im_end|>\n"
    prompt = tokenizer.decode(data.prompts[0])
    assert prompt.endswith("<|im_start|>assistant\n")
    if user is not None:
        assert f"<|im_start|>user\n{user}<|im_end|>" in prompt


def test_plain_template_without_chat_template(tokenizer) -> None:
    row = {"prompt": "Capital of Italy?", "completion": "Rome"}
    data, _ = encoded(tokenizer, [row], chat_template="none")
    text = tokenizer.decode(data.input_ids[0])
    assert text == "User:\nCapital of Italy?\n\nAssistant:\nRome<|im_end|>\n\n"
    assert loss_text(tokenizer, data.input_ids[0], data.labels[0]) == "Rome<|im_end|>\n\n"
    assert "Assistant" in PLAIN_TEMPLATE


# -- truncation ----------------------------------------------------------------------------------
def test_long_prompts_are_cut_from_the_left_and_answers_never(tokenizer) -> None:
    long_prompt = " ".join(f"word{i}" for i in range(200))
    rows = [
        {"prompt": long_prompt, "completion": "The answer."},  # cut from the left
        {"prompt": "Short?", "completion": " ".join(["long"] * 200)},  # answer cannot fit
    ]
    data, _ = encoded(tokenizer, rows, max_length=64)
    ids, targets = data.input_ids[0], data.labels[0]
    assert len(ids) == 64 and targets[0] == IGNORE
    assert loss_text(tokenizer, ids, targets) == "The answer.<|im_end|>\n"
    assert tokenizer.decode(ids).endswith(
        "word199<|im_end|>\n<|im_start|>assistant\nThe answer.<|im_end|>\n"
    )
    assert data.unfit_rows() == [1]
    dropped, _ = encoded(tokenizer, rows, max_length=64, truncation="drop")
    assert dropped.unfit_rows() == [0, 1]


def test_a_run_drops_and_reports_records_that_cannot_fit(tmp_path: Path) -> None:
    rows = [
        {"prompt": f"Question {i}?", "completion": ("a long answer " * 30 if i % 5 == 0 else "ok")}
        for i in range(40)
    ]
    path = write_jsonl(tmp_path / "pc.jsonl", rows)
    out = tmp_path / "run"
    code, output = run_cli(
        "run",
        str(TINY / "causal" / "fedit.toml"),
        "--out",
        str(out),
        "--quiet",
        "--set",
        f"data.dataset='{path}'",
        "--set",
        "model.max_length=64",
        "--set",
        "experiment.rounds=1",
    )
    assert code == 0, output
    summary = (out / "summary.md").read_text()
    assert "format `prompt_completion`" in summary
    assert "records dropped as too long for model.max_length 64" in summary
    assert "train" in summary.split("records dropped")[1]


# -- multiple choice -----------------------------------------------------------------------------
def test_multiple_choice_records_train_on_the_correct_choice(tokenizer) -> None:
    rows = [
        {"question": "Best pet?", "choices": ["rock", "dog", "tax"], "answer": 1},
        {"question": "Colour?", "choices": ["red", "run"], "answer": 0},
    ]
    data, kind = encoded(tokenizer, rows)
    assert kind == "multiple_choice"
    assert data.gold == [1, 0]
    assert loss_text(tokenizer, data.input_ids[0], data.labels[0]) == "dog<|im_end|>\n"
    assert "Best pet?\nA. rock\nB. dog\nC. tax" in tokenizer.decode(data.prompts[0])
    assert data.choice_chars == [[4, 3, 3], [3, 3]]
    hidden, _ = encoded(tokenizer, rows, list_choices=False)
    assert "A. rock" not in tokenizer.decode(hidden.prompts[0])
    letters = [{**row, "answer": letter} for row, letter in zip(rows, ["b", " C "], strict=True)]
    assert encoded(tokenizer, letters[:1])[0].gold == [1]
    assert encoded(tokenizer, [{**rows[0], "answer": " C "}])[0].gold == [2]


def test_bbc_news_mc_is_built_in(tmp_path: Path) -> None:
    split = load_split(DataConfig(dataset="bbc-news-mc", test_fraction=0.2), needs_answers=True)
    assert split.format == "multiple_choice"
    assert len(split.train) + len(split.test) == len(bbc_news())
    names = split.label_names
    assert names == ["business", "entertainment", "politics", "sports", "tech"]
    for item in split.test.select(range(20)):
        assert item["choices"] == names and names[item["gold"]] == item["answer"]
        assert item["label"] == item["gold"]  # the section is also the partition label
        assert item["messages"][0]["content"].count(" ") < 60
    with pytest.raises(ConfigError, match="a classifier uses bbc-news"):
        load_split(DataConfig(dataset="bbc-news-mc"), needs_answers=False)


def test_multiple_choice_tokens_are_cached(tokenizer, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("FEDLORA_TOKEN_CACHE", str(tmp_path))
    rows = [{"question": f"Q{i}?", "choices": ["yes", "no way"], "answer": i % 2} for i in range(6)]
    table, _ = conversations(Dataset.from_list(rows), DataConfig(), "rows")
    first = tokenize_cached(table, tokenizer, 64, True, Rendering())
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    second = tokenize_cached(table, tokenizer, 64, True, Rendering())
    assert second.continuations == first.continuations and second.contexts == first.contexts
    assert second.gold == first.gold and second.input_ids == first.input_ids
    tokenize_cached(table, tokenizer, 64, True, Rendering(chat_template="none"))
    assert len(list(tmp_path.glob("*.safetensors"))) == 2  # another template, another entry


# -- files in every format, and their errors ------------------------------------------------------
def test_formats_are_read_from_csv_parquet_and_json(tmp_path: Path) -> None:
    rows = [
        {
            "question": f"Q{i}?",
            "choices": json.dumps(["a", "b", "c"]),
            "answer": "C",
            "label": i % 2,
        }
        for i in range(20)
    ]
    Dataset.from_list(rows).to_csv(tmp_path / "mc.csv", index=False)
    Dataset.from_list(rows).to_parquet(tmp_path / "mc.parquet")
    (tmp_path / "mc.json").write_text(json.dumps(rows))
    for name in ("mc.csv", "mc.parquet", "mc.json"):
        split = load_split(DataConfig(dataset=str(tmp_path / name)), needs_answers=True)
        assert split.format == "multiple_choice"
        assert set(split.train["gold"]) == {2}
        assert split.label_names == ["0", "1"]


BAD_RECORDS = [
    ({"messages": []}, "row 2: field 'messages' is an empty list"),
    ({"messages": "hello"}, "row 2: field 'messages' must be a list"),
    (
        {"messages": [{"role": "user", "content": "hi"}]},
        "row 2: field 'messages': the last turn is the user's",
    ),
    (
        {"messages": [{"role": "robot", "content": "hi"}]},
        "row 2: field messages[0].role is 'robot'; allowed: system, user, assistant",
    ),
    (
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},
        "row 2: field 'messages[0]': its content must be a string",
    ),
]


@pytest.mark.parametrize(("bad", "message"), BAD_RECORDS)
def test_bad_messages_records_name_file_row_and_field(tmp_path: Path, bad, message) -> None:
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    rows = [good, bad, good]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(rows))
    with pytest.raises(ConfigError) as caught:
        load_split(DataConfig(dataset=str(path), format="messages"), needs_answers=True)
    assert str(path) in str(caught.value) and message in str(caught.value)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            {"question": "q", "choices": ["a", "b"], "answer": 2},
            "field 'answer' is 2, out of range for 2 choices",
        ),
        (
            {"question": "q", "choices": ["a", "b"], "answer": "E"},
            "field 'answer' is 'E'; expected an index from 0 or a letter A-B",
        ),
        (
            {"question": "q", "choices": ["a"], "answer": 0},
            "field 'choices' has 1 choices; allowed: 2 to 26",
        ),
        (
            {"question": "", "choices": ["a", "b"], "answer": 0},
            "field 'question' is missing or empty",
        ),
        (
            {"question": "q", "choices": ["a", ""], "answer": 0},
            "every choice must be a non-empty string",
        ),
    ],
)
def test_bad_multiple_choice_records(tmp_path: Path, bad, message) -> None:
    good = {"question": "q", "choices": ["a", "b"], "answer": 0}
    path = write_jsonl(tmp_path / "mc.jsonl", [good, good, bad])
    with pytest.raises(ConfigError, match="row 3: ") as caught:
        load_split(DataConfig(dataset=str(path)), needs_answers=True)
    assert message in str(caught.value)


def test_a_bad_record_is_one_line_from_the_cli(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "x", "output": 3}])
    code, output = run_cli(
        "run",
        str(TINY / "causal" / "fedit.toml"),
        "--out",
        str(tmp_path / "r"),
        "--set",
        f"data.dataset='{path}'",
    )
    assert code == 2 and "Traceback" not in output
    assert "row 1: field 'output' must be a string, not int" in " ".join(output.split())


def test_a_format_that_does_not_fit_the_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "a", "completion": "b"}] * 4)
    with pytest.raises(ConfigError, match=r"format 'alpaca' reads data\.instruction_column"):
        load_split(DataConfig(dataset=str(path), format="alpaca"), needs_answers=True)
    with pytest.raises(ConfigError, match="needs a causal language model"):
        load_split(DataConfig(dataset=str(path), format="alpaca"), needs_answers=False)


# -- hub ids -------------------------------------------------------------------------------------
def test_a_hub_dataset_offline_is_one_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConfigError, match="offline mode is on"):
        load_split(DataConfig(dataset="tatsu-lab/alpaca"), needs_answers=True)


def test_a_hub_dataset_without_network_fails_fast(monkeypatch) -> None:
    """Offline mode unset on a machine that cannot reach the hub: one short probe, no
    retries. The endpoint is a local port nothing listens on, so the test never leaves the
    machine."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"the hub \(http://127.0.0.1:9\) cannot be reached"):
        load_split(DataConfig(dataset="tatsu-lab/alpaca"), needs_answers=True)
    assert time.monotonic() - start < 10
    with pytest.raises(ConfigError, match=r"nor an existing \.jsonl/\.json/\.csv/\.parquet file"):
        load_split(DataConfig(dataset="missing/file.jsonl"), needs_answers=True)


AUDIT = """
import sys
calls = []
sys.addaudithook(lambda event, args: calls.append(args) if event in NETWORK else None)
from fedlora.cli import main
sys.argv = ["fedlora", *ARGS]
try:
    main()
except SystemExit as end:
    assert not end.code, end.code
print("network calls:", len(calls), calls[:3])
"""


def test_built_in_names_never_touch_the_network_with_offline_mode_unset(tmp_path: Path) -> None:
    """Importing fedlora no longer switches the hub off, so its built-in model, data and the
    local-file readers must not reach for the network themselves (a process with the offline
    variables removed, every name lookup and connection recorded)."""
    env = {k: v for k, v in os.environ.items() if "OFFLINE" not in k}
    rows = [{"prompt": f"Q{i}?", "completion": f"A{i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "local.jsonl", rows)  # read by datasets' json reader
    args = ["run", str(TINY / "causal" / "fedit.toml"), "--out", str(tmp_path / "r"), "--quiet"]
    args += ["--set", f"data.dataset='{path}'", "--set", "experiment.rounds=1"]
    code = AUDIT.replace("NETWORK", repr({"socket.getaddrinfo", "socket.connect"}))
    code = code.replace("ARGS", repr(args))
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "network calls: 0 []" in done.stdout


def test_a_hub_model_without_network_is_one_line_naming_the_hub(monkeypatch) -> None:
    """A hub model id with offline mode unset and the hub out of reach: read from the local
    cache only (no retries), and the error says the hub cannot be reached."""
    from fedlora.models import model_spec

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"the hub \(http://127.0.0.1:9\) cannot be reached"):
        model_spec("nobody/no-such-model-xyz")
    assert time.monotonic() - start < 10
