"""The configuration reference, rendered from the schema that validates every config.

The documentation site's configuration page (``docs/configuration.md``) gets its tables from
``config_reference_markdown`` when the site is built (the mkdocs hook
``docs/hooks/config_reference.py``). Every key, type, default and description comes from the
pydantic models in ``fedlora.config`` and from each method's ``Options`` model, so a key that is
added, removed or re-described there is in the next build: the reference cannot drift from the
code the way a hand-written table does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from annotated_types import Ge, Gt, Le, Lt, MinLen
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from fedlora.config import Config
from fedlora.methods import registry

HEADER = "| key | type | default | description |\n|---|---|---|---|"


def config_reference_markdown() -> str:
    """Markdown for every ``[section]`` of ``Config`` (a level-3 heading, the section's docstring
    and a table of its keys), then every method's own ``[method]`` options (a level-4 heading per
    method); the page that includes it supplies the level-2 heading above."""
    parts = [section_markdown(name, model) for name, model in config_sections()]
    parts.append(method_options_markdown())
    return "\n\n".join(parts) + "\n"


def config_sections() -> list[tuple[str, type[BaseModel]]]:
    """``Config``'s sections in their schema order: (TOML table name, its model)."""
    sections = []
    for name, field in Config.model_fields.items():
        model = field.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel), name
        sections.append((name, model))
    return sections


def section_markdown(section: str, model: type[BaseModel]) -> str:
    lines = [f"### `[{section}]`"]
    doc = own_docstring(model)
    if doc:
        lines += ["", doc]
    lines += ["", fields_table(section, model.model_fields.items())]
    return "\n".join(lines)


def method_options_markdown() -> str:
    """A table per method that has options of its own (validated by its ``Options`` model),
    headed by the method's one-line summary; the methods without any are named together."""
    lines = [
        "### Method options",
        "",
        "Each method validates its own keys in `[method]`, next to `name`, with its `Options` "
        "model (in its file in `src/fedlora/methods/`).",
    ]
    without = []
    for name, method in registry().items():
        fields = method.Options.model_fields
        if not fields:
            without.append(f"`{name}`")
            continue
        summary = cell_text(method.summary)
        lines += ["", f"#### `{name}`", "", f"{summary[:1].upper()}{summary[1:]}.", ""]
        lines.append(fields_table("method", fields.items()))
    lines += ["", f"Methods without options of their own: {', '.join(without)}."]
    return "\n".join(lines)


def fields_table(section: str, fields: Iterable[tuple[str, FieldInfo]]) -> str:
    rows = [
        f"| `{section}.{key}` | `{type_text(field.annotation, field.metadata)}` "
        f"| {default_text(field)} | {cell_text(field.description or '')} |"
        for key, field in fields
    ]
    return "\n".join([HEADER, *rows])


def own_docstring(model: type[BaseModel]) -> str:
    """The model's own docstring (not one inherited from pydantic) on one line, with the
    reStructuredText literals of the source as Markdown code."""
    doc = model.__dict__.get("__doc__") or ""
    return cell_text(" ".join(doc.split()).replace("``", "`"))


def type_text(annotation: Any, constraints: Iterable[Any] = ()) -> str:
    """A readable type: ``int ≥ 1``, ``0 < float < 1``, ``"a" | "b"``, ``list[str]``,
    ``float | None``. ``constraints`` are pydantic's field metadata (bounds, lengths, a
    pattern); an ``Annotated`` part of the type carries its own."""
    origin = get_origin(annotation)
    args = get_args(annotation)
    if origin is Annotated:
        base, *extra = args
        return type_text(base, [item for info in extra for item in metadata_of(info)])
    if origin in (Union, UnionType):
        return " | ".join(type_text(arg, () if arg is NoneType else constraints) for arg in args)
    if origin is Literal:
        return " | ".join(toml_literal(arg) for arg in args)
    if annotation is NoneType:
        return "None"
    if origin in (list, tuple):
        name = f"{origin.__name__}[{', '.join(type_text(arg) for arg in args)}]"
    else:
        name = annotation.__name__
    return constrained(name, list(constraints))


def metadata_of(info: Any) -> list[Any]:
    """The constraints an ``Annotated`` entry stands for: a ``Field(...)`` holds a list."""
    return list(info.metadata) if isinstance(info, FieldInfo) else [info]


def constrained(name: str, constraints: list[Any]) -> str:
    """``name`` with its bounds around it (``8 ≤ int ≤ 4096``, ``float > 0``) and its length or
    pattern in words."""
    lower = upper = None  # (sign, value), each read from left to right: value sign name sign value
    for constraint in constraints:
        if isinstance(constraint, Ge):
            lower = ("≤", constraint.ge)
        elif isinstance(constraint, Gt):
            lower = ("<", constraint.gt)
        elif isinstance(constraint, Le):
            upper = ("≤", constraint.le)
        elif isinstance(constraint, Lt):
            upper = ("<", constraint.lt)
    text = name
    if lower and upper:
        text = f"{toml_literal(lower[1])} {lower[0]} {name} {upper[0]} {toml_literal(upper[1])}"
    elif lower:
        text = f"{name} {lower[0].translate(MIRRORED)} {toml_literal(lower[1])}"
    elif upper:
        text = f"{name} {upper[0]} {toml_literal(upper[1])}"
    for constraint in constraints:
        if isinstance(constraint, MinLen) and constraint.min_length == 1:
            text = f"non-empty {text}"
        elif isinstance(constraint, MinLen):
            text = f"{text}, length ≥ {constraint.min_length}"
        elif getattr(constraint, "pattern", None):
            text = f"{text} matching {constraint.pattern}"
    return text


MIRRORED = str.maketrans("≤<", "≥>")


def default_text(field: FieldInfo) -> str:
    """The default as it would be written in TOML; ``None`` (the key left unset) as itself."""
    if field.default is None:
        return "`None`"
    return f"`{toml_literal(field.default)}`"


def toml_literal(value: Any) -> str:
    """A string, number, boolean or list as TOML writes it (JSON's spelling of these values
    is TOML's too)."""
    return json.dumps(value, ensure_ascii=False)


CODE_SPAN = re.compile(r"(`[^`]*`)")


def cell_text(text: str) -> str:
    """Text that stays inside one table cell and is not read as HTML: outside code spans a
    ``|`` is escaped and ``<`` written as an entity (code spans keep both as they are)."""
    pieces = CODE_SPAN.split(" ".join(text.split()))
    return "".join(
        piece if piece.startswith("`") else piece.replace("|", r"\|").replace("<", "&lt;")
        for piece in pieces
    )
