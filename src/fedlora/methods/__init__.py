"""Method registry: every ``Method`` subclass with a ``name`` in this package, found by import.

Adding a method is adding one file here; nothing else changes.
"""

from __future__ import annotations

import importlib
import pkgutil

from pydantic import BaseModel, ValidationError

from fedlora.config import ConfigError, MethodConfig, describe_validation_error
from fedlora.methods.base import Method, MethodContext


def _subclasses(cls: type[Method]) -> list[type[Method]]:
    found = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_subclasses(sub))
    return found


def registry() -> dict[str, type[Method]]:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    methods = {cls.name: cls for cls in _subclasses(Method) if "name" in cls.__dict__}
    return dict(sorted(methods.items()))


def method_class(name: str) -> type[Method]:
    methods = registry()
    if name not in methods:
        raise ConfigError(f"method.name {name!r} is not a method; available: {', '.join(methods)}")
    return methods[name]


def method_options(config: MethodConfig) -> BaseModel:
    cls = method_class(config.name)
    try:
        return cls.Options.model_validate(config.options())
    except ValidationError as error:
        lines = describe_validation_error(error).splitlines()
        raise ConfigError("\n".join(f"method.{line}" for line in lines)) from None


def build_method(config: MethodConfig, context: MethodContext) -> Method:
    return method_class(config.name)(context, method_options(config))
