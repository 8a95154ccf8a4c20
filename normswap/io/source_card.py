"""The source's model card (README.md): its YAML metadata and its text, which DST's card keeps.

A card is Markdown with an optional YAML block at the very top, between two ``---`` lines (the Hub's rule).
The block is read with ``yaml.safe_load`` (PyYAML comes with transformers); a block that is not a YAML mapping
is dropped with a warning and the text kept, so a broken card never stops a conversion.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .support_files import readable_source_file

logger = logging.getLogger("normswap")

CARD_FILE = "README.md"
_MAX_CARD_BYTES = 4 * 2**20  # cards are KBs; a larger README is not read (the conversion does not need it)
_FRONT_MATTER = re.compile(r"\A\ufeff?\s*---[ \t]*\r?\n(?:(.*?)\r?\n)?---[ \t]*(?:\r?\n|\Z)", re.DOTALL)


@dataclass(frozen=True)
class SourceCard:
    """The source card's metadata (read-only) and its Markdown text below the metadata block."""

    metadata: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    text: str = ""


def read_source_card(source: Path) -> SourceCard | None:
    """The card of the checkpoint folder ``source``, or None where it has none (or none that can be read)."""
    path = readable_source_file(source, CARD_FILE)
    if path is None:
        return None
    try:
        if path.stat().st_size > _MAX_CARD_BYTES:
            logger.warning("%s/%s is larger than %d MB: not carried into the new card", source.name, CARD_FILE,
                           _MAX_CARD_BYTES >> 20)
            return None
        content = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return parse_card(content, f"{source.name}/{CARD_FILE}")


def parse_card(content: str, shown: str = CARD_FILE) -> SourceCard:
    """Split ``content`` into metadata and text (see the module docstring)."""
    import yaml

    match = _FRONT_MATTER.match(content)
    if match is None:
        return SourceCard(text=content.lstrip("\ufeff"))
    text = content[match.end():]
    try:
        data = yaml.safe_load(match.group(1) or "")
    except (yaml.YAMLError, RecursionError) as error:
        logger.warning("the metadata of %s is not valid YAML (%s): left out of the new card", shown,
                       str(error).splitlines()[0] if str(error) else type(error).__name__)
        return SourceCard(text=text)
    if data is None:
        data = {}
    if not isinstance(data, dict) or not all(isinstance(key, str) for key in data):
        logger.warning("the metadata of %s is not a YAML mapping: left out of the new card", shown)
        return SourceCard(text=text)
    return SourceCard(MappingProxyType(dict(data)), text)
