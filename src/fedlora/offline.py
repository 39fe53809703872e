"""The environment of a process on a machine without the model hubs (and without tokenizers'
thread pool, which forked processes must not inherit). Set it before transformers, datasets or
tokenizers are imported: they read it at import. ``make`` exports the same for its commands;
scripts started some other way (the benchmarks) call ``use_offline_defaults`` first."""

from __future__ import annotations

import os

OFFLINE_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def use_offline_defaults() -> None:
    """Each variable of ``OFFLINE_DEFAULTS`` that the caller's environment does not set."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
