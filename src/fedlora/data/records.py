"""Records of a causal language-model dataset, read in any of its formats into one shape.

Every format becomes a conversation: ``messages``, a list of ``{role, content}`` turns ending
with the assistant's, whose assistant turns are what the model learns to say. Next to it,
``answer`` (the last assistant turn, the reference for generation scoring) and, for multiple
choice, ``choices`` and ``gold`` (the correct choice's index). The formats:

- ``text``: a prompt column and an answer column (fedlora's original causal format).
- ``alpaca``: instruction, optional input, output. The user turn is the instruction, then a
  blank line and the input when there is one.
- ``prompt_completion``: a prompt and its completion, as one user turn and one assistant turn.
- ``messages``: a list of turns, OpenAI style ``{role, content}`` (roles system, user,
  assistant) or ShareGPT style ``{from, value}`` (system, human, gpt). At least one assistant
  turn, and the last turn is the assistant's.
- ``multiple_choice``: a question, a list of choices and the answer (an index from 0 or a
  letter, A for the first choice). Trained as an instruction whose answer is the correct
  choice; the user turn lists the choices under the question unless ``data.list_choices`` is
  off.

A list field of a CSV file (messages, choices) is read as JSON text. A record that does not
fit its format is refused with the file, the row (counted from 1) and the field.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from typing import Any

from datasets import ClassLabel, Dataset

from fedlora.config import ConfigError, DataConfig

ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}


class RecordError(ConfigError):
    """A record that does not fit its format."""


def detect_format(columns: list[str], config: DataConfig) -> str:
    """``data.format``, or for ``auto`` the format the columns show (the first that fits, in
    the order messages, alpaca, multiple_choice, prompt_completion, text)."""
    if config.format != "auto":
        return config.format
    present = set(columns)
    if config.messages_column in present or "conversations" in present:
        return "messages"
    if {config.instruction_column, config.output_column} <= present:
        return "alpaca"
    if {config.question_column, config.choices_column} <= present:
        return "multiple_choice"
    if {config.prompt_column, config.completion_column} <= present:
        return "prompt_completion"
    return "text"


def required_columns(kind: str, columns: list[str], config: DataConfig) -> dict[str, str]:
    """The columns ``kind`` reads, by the setting that names them."""
    if kind == "text":
        return {"text_column": config.text_column, "answer_column": config.answer_column}
    if kind == "alpaca":
        return {
            "instruction_column": config.instruction_column,
            "output_column": config.output_column,
        }
    if kind == "prompt_completion":
        return {
            "prompt_column": config.prompt_column,
            "completion_column": config.completion_column,
        }
    if kind == "multiple_choice":
        return {
            "question_column": config.question_column,
            "choices_column": config.choices_column,
            "answer_column": config.answer_column,
        }
    messages = config.messages_column
    if messages not in columns and "conversations" in columns and config.format == "auto":
        messages = "conversations"  # ShareGPT's own name, found by auto
    return {"messages_column": messages}


def conversations(raw: Dataset, config: DataConfig, where: str) -> tuple[Dataset, str]:
    """``raw`` as conversations (see the module's docstring), labels as text, and the format it
    was read in. ``where`` names the source in errors (``data.dataset train.jsonl``); a file's
    other columns stay, as text, for natural partitions."""
    kind = detect_format(raw.column_names, config)
    columns = required_columns(kind, raw.column_names, config)
    for setting, column in columns.items():
        if column not in raw.column_names:
            raise ConfigError(
                f"{where}: format {kind!r} reads data.{setting} {column!r}, which is not a "
                f"column; its columns are: {', '.join(raw.column_names)}"
            )
    reader = READERS[kind]
    rows: dict[str, list[Any]] = {"messages": [], "answer": []}
    if kind == "multiple_choice":
        rows |= {"choices": [], "gold": []}
    for index, record in enumerate(raw):
        try:
            made = reader(record, columns, config)
        except RecordError as error:
            raise RecordError(f"{where} row {index + 1}: {error}") from None
        for key, value in made.items():
            rows[key].append(value)
    rows["label"] = labels_of(raw, config)
    for column in raw.column_names:
        if column not in columns.values() and column not in rows:
            rows[column] = [str(v) for v in raw[column]]
    return Dataset.from_dict(rows), kind


def labels_of(raw: Dataset, config: DataConfig) -> list[str]:
    """The partition label of each record: ``data.label_column`` where the data has it, else
    one label for all."""
    if config.label_column in raw.column_names:
        feature = raw.features[config.label_column]
        if isinstance(feature, ClassLabel):
            return [feature.int2str(int(v)) for v in raw[config.label_column]]
        return [str(v) for v in raw[config.label_column]]
    return ["all"] * len(raw)


def text_field(record: dict[str, Any], column: str, optional: bool = False) -> str:
    """A string field; missing, null or blank is refused unless ``optional`` (then '')."""
    value = record.get(column)
    if value is None or (isinstance(value, str) and not value.strip()):
        if optional:
            return ""
        raise RecordError(f"field {column!r} is missing or empty")
    if not isinstance(value, str):
        raise RecordError(f"field {column!r} must be a string, not {type(value).__name__}")
    return value


def list_field(record: dict[str, Any], column: str) -> list[Any]:
    """A list field; a string is read as JSON (how a CSV file carries a list)."""
    value = record.get(column)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RecordError(f"field {column!r} must be a list, or a JSON list in text") from None
    if value is None:
        raise RecordError(f"field {column!r} is missing")
    if not isinstance(value, list):
        raise RecordError(f"field {column!r} must be a list, not {type(value).__name__}")
    if not value:
        raise RecordError(f"field {column!r} is an empty list")
    return value


def pair(user: str, answer: str) -> dict[str, Any]:
    turns = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": turns, "answer": answer}


def read_text(record: dict[str, Any], columns: dict[str, str], _: DataConfig) -> dict[str, Any]:
    return pair(
        text_field(record, columns["text_column"]), text_field(record, columns["answer_column"])
    )


def read_alpaca(
    record: dict[str, Any], columns: dict[str, str], config: DataConfig
) -> dict[str, Any]:
    instruction = text_field(record, columns["instruction_column"])
    extra = text_field(record, config.input_column, optional=True)
    user = f"{instruction}\n\n{extra}" if extra else instruction
    return pair(user, text_field(record, columns["output_column"]))


def read_prompt_completion(
    record: dict[str, Any], columns: dict[str, str], _: DataConfig
) -> dict[str, Any]:
    return pair(
        text_field(record, columns["prompt_column"]),
        text_field(record, columns["completion_column"]),
    )


def read_messages(record: dict[str, Any], columns: dict[str, str], _: DataConfig) -> dict[str, Any]:
    column = columns["messages_column"]
    turns = []
    for position, turn in enumerate(list_field(record, column)):
        field = f"{column}[{position}]"
        if not isinstance(turn, dict):
            raise RecordError(f"field {field!r} must be an object with role and content")
        if turn.get("role") is not None:
            role, content, names, key = turn.get("role"), turn.get("content"), ROLES, "role"
        elif turn.get("from") is not None:
            role, content, names, key = turn.get("from"), turn.get("value"), SHAREGPT_ROLES, "from"
        else:
            raise RecordError(f"field {field!r} has neither 'role' (OpenAI) nor 'from' (ShareGPT)")
        if role not in names:
            raise RecordError(f"field {field}.{key} is {role!r}; allowed: {', '.join(names)}")
        if not isinstance(content, str):
            raise RecordError(f"field {field!r}: its content must be a string")
        if names[role] == "assistant" and not content.strip():
            raise RecordError(f"field {field!r}: an assistant turn is empty")
        turns.append({"role": names[role], "content": content})
    speakers = [turn["role"] for turn in turns if turn["role"] != "system"]
    if not speakers or speakers[0] != "user":
        raise RecordError(
            f"field {column!r}: the first turn after any system turn must be the user's"
        )
    if turns[-1]["role"] != "assistant":
        raise RecordError(
            f"field {column!r}: the last turn is the {turns[-1]['role']}'s; it must be the "
            "assistant's (the answer the model learns)"
        )
    return {"messages": turns, "answer": turns[-1]["content"]}


def read_multiple_choice(
    record: dict[str, Any], columns: dict[str, str], config: DataConfig
) -> dict[str, Any]:
    question = text_field(record, columns["question_column"])
    column = columns["choices_column"]
    choices = list_field(record, column)
    if len(choices) < 2 or len(choices) > len(string.ascii_uppercase):
        raise RecordError(f"field {column!r} has {len(choices)} choices; allowed: 2 to 26")
    if not all(isinstance(c, str) and c.strip() for c in choices):
        raise RecordError(f"field {column!r}: every choice must be a non-empty string")
    gold = answer_index(
        record.get(columns["answer_column"]), len(choices), columns["answer_column"]
    )
    user = question
    if config.list_choices:
        listed = "\n".join(f"{string.ascii_uppercase[i]}. {c}" for i, c in enumerate(choices))
        user = f"{question}\n{listed}"
    return {**pair(user, choices[gold]), "choices": choices, "gold": gold}


def answer_index(value: Any, count: int, column: str) -> int:
    """The correct choice's index from an index (0 = first) or a letter (A = first)."""
    if isinstance(value, bool) or value is None:
        raise RecordError(f"field {column!r} must be an index (from 0) or a letter (A, B, ...)")
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, str):
        letter = value.strip().upper()
        if len(letter) != 1 or letter not in string.ascii_uppercase[:count]:
            raise RecordError(
                f"field {column!r} is {value!r}; expected an index from 0 or a letter A-"
                f"{string.ascii_uppercase[count - 1]}"
            )
        value = string.ascii_uppercase.index(letter)
    if not isinstance(value, int):
        raise RecordError(
            f"field {column!r} must be an index or a letter, not {type(value).__name__}"
        )
    if not 0 <= value < count:
        raise RecordError(f"field {column!r} is {value}, out of range for {count} choices")
    return value


Reader = Callable[[dict[str, Any], dict[str, str], DataConfig], dict[str, Any]]
READERS: dict[str, Reader] = {
    "text": read_text,
    "alpaca": read_alpaca,
    "messages": read_messages,
    "prompt_completion": read_prompt_completion,
    "multiple_choice": read_multiple_choice,
}
