"""mkdocs hook: the configuration page's reference tables, generated from the schema.

``docs/configuration.md`` holds the marker below where the tables go; at build time this hook
replaces it with ``fedlora.config_reference.config_reference_markdown()``, so the site always
lists the keys, types, defaults and descriptions of the code it was built from. A page that has
lost its marker fails the build instead of silently publishing no reference.
"""

from __future__ import annotations

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import Files
from mkdocs.structure.pages import Page

from fedlora.config_reference import config_reference_markdown

PAGE = "configuration.md"
MARKER = "<!-- config-reference -->"


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise PluginError(f"docs/{PAGE} has no {MARKER} marker for the generated reference")
    return markdown.replace(MARKER, config_reference_markdown())
