"""Tokenized splits cached on disk, so a run does not re-tokenize the same data.

Tokenizing BBC News (2,127 articles) takes about 1.5 s of a run's start-up on a 2-core CPU,
every run, for the same tokens; a study of 30 runs pays it 30 times; a hit costs about 0.13 s.
The cache keys a split by everything that decides its tokens: the texts (and labels or
answers), the tokenizer's serialized definition and chat template, the sequence length, the
task, the source of ``fedlora.data.tokenized``, and the versions of ``tokenizers`` and
``transformers``. Any change gives a new key, so a stale entry is never read. A damaged or
foreign file is ignored and rewritten, never trusted.

Where: ``$FEDLORA_TOKEN_CACHE`` if set (``off`` turns the cache off), else ``tokenized/`` in
fedlora's cache (``$FEDLORA_CACHE``, default ``~/.cache/fedlora``). Files are
safetensors (no pickle) written atomically, so parallel runs may share a directory.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path

import tokenizers
import torch
import transformers
from datasets import Dataset
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizerBase

from fedlora import models
from fedlora.data import chat, records, tokenized
from fedlora.data.chat import Rendering
from fedlora.data.tokenized import TokenizedSet, add_choices, tokenize

CACHE_ENV = "FEDLORA_TOKEN_CACHE"
FORMAT = "fedlora-tokenized-v2"


def cache_dir() -> Path | None:
    """The cache directory, or None when the user turned the cache off."""
    value = os.environ.get(CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "off", "none", "0") else Path(value)
    return models.cache_dir() / "tokenized"


@functools.lru_cache(maxsize=8)
def definition_digest(serialized: str) -> bytes:
    """The tokenizer's definition without the truncation/padding state that calling it sets.
    Normalising a large vocabulary's JSON costs ~0.3 s, so it is done once per definition."""
    definition = json.loads(serialized)
    definition.pop("truncation", None)
    definition.pop("padding", None)
    return hashlib.sha256(json.dumps(definition, sort_keys=True).encode()).digest()


def cache_key(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    causal: bool,
    rendering: Rendering | None = None,
) -> str | None:
    """A digest of everything the tokens depend on; None for a tokenizer that cannot be
    fingerprinted (a slow, pure-Python one), which is then never cached."""
    if not tokenizer.is_fast:
        return None
    digest = hashlib.sha256()
    head = (
        f"{FORMAT}|{max_length}|{causal}|{tokenizer.pad_token_id}|{tokenizer.eos_token_id}|"
        f"{tokenizers.__version__}|{transformers.__version__}|{type(tokenizer).__name__}|"
        f"{rendering or Rendering()}\0"
    )
    digest.update(head.encode())
    # The code that makes the tokens (prompt format, truncation): a change to it is a new key.
    for module in (tokenized, chat, records):
        digest.update(Path(module.__file__).read_bytes())
    digest.update(definition_digest(tokenizer.backend_tokenizer.to_str()))
    digest.update(b"\0" + (tokenizer.chat_template or "").encode() + b"\0")
    columns = ("messages", "choices") if causal else ("text", "label")
    for column in (c for c in columns if c in dataset.column_names):
        for value in dataset[column]:
            digest.update(str(value).encode())
            digest.update(b"\0")
    return digest.hexdigest()


def _flatten(rows: list[list[int]], name: str) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    flat = torch.tensor([t for r in rows for t in r], dtype=torch.int64)
    return {f"{name}.values": flat, f"{name}.lengths": lengths}


def _unflatten(tensors: dict[str, torch.Tensor], name: str, rows: int) -> list[list[int]]:
    flat, lengths = tensors[f"{name}.values"], tensors[f"{name}.lengths"]
    if flat.dim() != 1 or lengths.shape != (rows,) or int(lengths.sum()) != flat.numel():
        raise ValueError(f"{name}: lengths do not match the values")
    if bool((lengths < 0).any()):
        raise ValueError(f"{name}: negative length")
    return [chunk.tolist() for chunk in flat.split(lengths.tolist())]


def encode(tokens: TokenizedSet) -> dict[str, torch.Tensor]:
    tensors = _flatten(tokens.input_ids, "input_ids")
    if tokens.causal:
        assert tokens.prompts is not None
        tensors |= _flatten(tokens.labels, "labels")  # type: ignore[arg-type]
        tensors |= _flatten(tokens.prompts, "prompts")
    else:
        tensors["labels"] = torch.tensor(tokens.labels, dtype=torch.int64)
    if tokens.continuations is not None:
        assert tokens.contexts is not None
        tensors |= _flatten(tokens.contexts, "contexts")
        tensors |= _flatten([tail for row in tokens.continuations for tail in row], "choices")
        counts = [len(row) for row in tokens.continuations]
        tensors["choices.counts"] = torch.tensor(counts, dtype=torch.int64)
    return tensors


def decode(
    tensors: dict[str, torch.Tensor], dataset: Dataset, pad_id: int, causal: bool, vocab: int
) -> TokenizedSet:
    """The set back from its tensors; ValueError/KeyError when they do not fit ``dataset``
    or hold a token id outside the vocabulary."""
    rows = len(dataset)
    for name in ("input_ids", "prompts", "contexts", "choices"):
        values = tensors.get(f"{name}.values")
        if (
            values is not None
            and values.numel()
            and not 0 <= int(values.min()) <= int(values.max()) < vocab
        ):
            raise ValueError(f"{name}: a token id outside the vocabulary")
    input_ids = _unflatten(tensors, "input_ids", rows)
    if not causal:
        labels = tensors["labels"]
        if labels.shape != (rows,):
            raise ValueError("labels: wrong shape")
        return TokenizedSet(input_ids, labels.tolist(), pad_id, causal=False)
    targets = _unflatten(tensors, "labels", rows)
    prompts = _unflatten(tensors, "prompts", rows)
    if any(len(t) != len(i) for t, i in zip(targets, input_ids, strict=True)):
        raise ValueError("labels: a row's length differs from its input")
    tokens = TokenizedSet(
        input_ids, targets, pad_id, causal=True, prompts=prompts, answers=list(dataset["answer"])
    )
    if "choices" in dataset.column_names:
        counts = tensors["choices.counts"]
        if counts.shape != (rows,) or bool((counts < 1).any()):
            raise ValueError("choices.counts: wrong shape or value")
        tails = _unflatten(tensors, "choices", int(counts.sum()))
        nested = [
            tails[end - n : end]
            for n, end in zip(counts.tolist(), counts.cumsum(0).tolist(), strict=True)
        ]
        if [len(row) for row in nested] != [len(row) for row in dataset["choices"]]:
            raise ValueError("choices: counts do not match the dataset")
        add_choices(tokens, dataset, _unflatten(tensors, "contexts", rows), nested)
    return tokens


def _read(
    path: Path, key: str, dataset: Dataset, pad_id: int, causal: bool, vocab: int
) -> TokenizedSet | None:
    """The cached set, or None when the file is missing, damaged or not this key's."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT or metadata.get("key") != key:
            return None
        return decode(load_file(str(path)), dataset, pad_id, causal, vocab)
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError):
        return None


def _write(path: Path, key: str, tokens: TokenizedSet) -> None:
    """Atomic (temporary file, then rename); a cache that cannot be written is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    except OSError:
        return
    os.close(handle)
    try:
        save_file(encode(tokens), temporary, metadata={"format": FORMAT, "key": key})
        os.replace(temporary, path)
    except OSError:
        Path(temporary).unlink(missing_ok=True)


def tokenize_cached(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    causal: bool,
    rendering: Rendering | None = None,
) -> TokenizedSet:
    """``tokenize``, read from the cache when this exact split was tokenized before."""
    directory = cache_dir()
    key = (
        cache_key(dataset, tokenizer, max_length, causal, rendering)
        if directory is not None
        else None
    )
    if directory is None or key is None:
        return tokenize(dataset, tokenizer, max_length, causal, rendering)
    path = directory / f"{key}.safetensors"
    pad_id = int(tokenizer.pad_token_id)
    cached = _read(path, key, dataset, pad_id, causal, len(tokenizer))
    if cached is not None:
        return cached
    tokens = tokenize(dataset, tokenizer, max_length, causal, rendering)
    _write(path, key, tokens)
    return tokens
