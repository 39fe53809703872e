"""torch, loaded at its first use instead of at import.

``import torch`` costs about two seconds here. The config checks and ``fedlora methods`` import
every method module (the registry finds methods by importing them), so if those modules imported
torch eagerly every answer to a config mistake would wait for it. The modules on that path write
``from fedlora.lazy import torch`` instead: the stdlib's ``importlib.util.LazyLoader`` registers
the real module under ``sys.modules["torch"]`` and runs it when an attribute is first read (or
when anything else imports torch, which reads ``torch.__spec__``), so every user of torch gets
the same module. Those modules must not read ``torch.*`` at import time: type aliases name it in
strings. tests/test_fast_answers.py checks that torch stays unloaded through the checks.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy_module(name: str) -> ModuleType:
    """``name``'s module, executed at its first attribute access (already loaded: as is)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


torch = lazy_module("torch")
