"""The documentation: the site builds without a broken link or anchor, the configuration reference
covers the whole schema, and the README stays a short front door whose links resolve."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel

from fedlora.config import Config
from fedlora.config_reference import config_reference_markdown
from fedlora.methods import registry

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 250


def schema_sections() -> dict[str, type[BaseModel]]:
    sections = {}
    for name, field in Config.model_fields.items():
        model = field.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel), name
        sections[name] = model
    return sections


def test_site_builds_strictly_with_the_generated_reference(tmp_path: Path) -> None:
    mkdocs = Path(sys.executable).parent / "mkdocs"
    build = subprocess.run(
        [str(mkdocs), "build", "--strict", "-d", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    page = (tmp_path / "configuration" / "index.html").read_text()
    for section, model in schema_sections().items():
        for key in model.model_fields:
            assert f"<code>{section}.{key}</code>" in page, f"the site lacks {section}.{key}"


def test_reference_lists_every_key_with_its_description() -> None:
    reference = config_reference_markdown()
    for section, model in schema_sections().items():
        for key, field in model.model_fields.items():
            assert f"`{section}.{key}`" in reference, f"the reference lacks {section}.{key}"
            assert field.description and field.description.strip(), f"{section}.{key}"


def test_reference_lists_every_method_option_with_its_description() -> None:
    reference = config_reference_markdown()
    for name, method in registry().items():
        options = method.Options.model_fields
        if not options:
            continue
        heading = f"#### `{name}`\n"
        assert heading in reference, f"the reference lacks method {name}"
        table = reference.split(heading, 1)[1].split("\n#", 1)[0]
        for key, field in options.items():
            assert f"`method.{key}`" in table, f"the reference lacks {name}'s option {key}"
            assert field.description and field.description.strip(), f"{name}: {key}"


def test_readme_is_a_short_front_door_whose_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    relative = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert relative, "the README links to no documentation page"
    for link in relative:
        path, _, anchor = link.partition("#")
        target = ROOT / path if path else ROOT / "README.md"
        assert target.exists(), f"README links to {link}, which does not exist"
        if anchor:
            assert anchor in github_anchors(target.read_text()), f"README: no anchor in {link}"


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings (outside code blocks): lower case,
    punctuation other than ``-`` and ``_`` dropped, each space a ``-``."""
    text = re.sub(r"(?ms)^```.*?^```", "", markdown)
    headings = re.findall(r"(?m)^#{1,6} +(.+?) *$", text)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}
