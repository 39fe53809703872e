"""The optional parts of fedlora (pyproject's extras) and the one error for a missing one.

A config or command that needs a part which is not installed stops before any training, with a
message naming the pip extra that brings it; nothing is imported to find out (``find_spec``).
"""

from __future__ import annotations

import importlib.util

from fedlora.config import ConfigError

# extra -> the modules it installs that fedlora imports
EXTRAS: dict[str, tuple[str, ...]] = {
    "flower": ("flwr",),
    "privacy": ("dp_accounting",),
    "eval": ("lm_eval",),
    "trackers": ("tensorboard", "mlflow", "wandb"),
    "docs": ("mkdocs", "material"),
}


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a broken __spec__
        return False


def require(module: str, extra: str, what: str) -> None:
    """Raise ConfigError for ``what`` (the setting or command that needs ``module``) when the
    module is missing, naming the extra to install."""
    if module not in EXTRAS[extra]:
        raise ValueError(f"{module!r} is not part of the {extra!r} extra")
    if not installed(module):
        raise ConfigError(
            f"{what} needs {module}, which is not installed: pip install 'fedlora[{extra}]'"
        )
