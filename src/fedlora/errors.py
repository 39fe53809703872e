"""The one exception type a user of fedlora meets, from the CLI or from Python.

``FedloraError`` carries the message the CLI prints after "error:". ``ConfigError``
(``fedlora.config``) is a mistake in a config, an override or a file, found before training
(the CLI exits 2); ``RunError`` is a run that could not go on: a party's message refused, a
worker process or a rank that died (the CLI exits 1).
"""

from __future__ import annotations


class FedloraError(Exception):
    """A user-facing failure: shown as its message, never as a traceback."""


class RunError(FedloraError, RuntimeError):
    """A run that started but could not go on."""
