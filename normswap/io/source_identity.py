"""How an output names its source: never by an absolute path of the user's machine.

config.json and the model card travel (to a colleague, to the Hub), so the source is named by its Hub id when
that is certain (a snapshot folder of the Hugging Face cache, ``.../models--owner--name/snapshots/<rev>``, or a
Hub id given as such), else as the user gave it when that was a relative path, else by its folder name.

config.json's ``_name_or_path`` is not used: transformers 5 no longer writes it, and where an older version did,
it names the checkpoint the source was *loaded from* before it was trained and saved (all-MiniLM-L6-v2 says
``nreimers/MiniLM-L6-H384-uncased``, its parent), not the source itself.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath

# Hub ids: "name" or "owner/name", letters, digits, "-", "_", "."; never "--" or ".." (the Hub refuses both)
_HUB_PART = r"(?!.*(?:--|\.\.))[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_HUB_ID = re.compile(rf"(?:{_HUB_PART}/)?{_HUB_PART}")


@dataclass(frozen=True)
class SourceIdentity:
    """``name`` for config.json and the card; ``hub_id`` (for the card's ``base_model``) only when certain."""

    name: str
    hub_id: str | None = None


def identify_source(given: str | os.PathLike[str]) -> SourceIdentity:
    """The identity of the source the user named ``given`` (a folder, or a Hub id for a model in memory)."""
    text = os.fspath(given)
    cached = _cache_repository(text)
    if cached is not None:
        return SourceIdentity(cached, cached)
    if _is_absolute(text):
        return SourceIdentity(_last_part(text))
    if not Path(text).exists() and _HUB_ID.fullmatch(text):
        return SourceIdentity(text, text)  # a model loaded from the Hub in memory: its id, as given
    relative = os.path.normpath(text)
    if relative.split(os.sep)[-1] in (".", ".."):  # "." names nothing: the folder it stands for does
        return SourceIdentity(Path(text).resolve().name or "checkpoint")
    return SourceIdentity(relative)


def source_name(given: str | os.PathLike[str] | None) -> str | None:
    """``identify_source(given).name``, None for no source; safe on names already made safe."""
    if given is None or os.fspath(given) == "":
        return None
    return identify_source(given).name


def _cache_repository(text: str) -> str | None:
    """``owner/name`` for a folder ``models--owner--name/snapshots/<revision>`` (as given, or resolved)."""
    candidates = [PurePath(os.path.abspath(os.path.expanduser(text)))]
    with contextlib.suppress(OSError, RuntimeError):  # a link loop: the path as given is all there is
        candidates.append(Path(text).expanduser().resolve())
    for path in candidates:
        parts = path.parts
        if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
            repository = parts[-3].removeprefix("models--").replace("--", "/")
            if _HUB_ID.fullmatch(repository):
                return repository
    return None


def _is_absolute(text: str) -> bool:
    return (text.startswith("~") or PurePosixPath(text).is_absolute() or PureWindowsPath(text).is_absolute()
            or bool(PureWindowsPath(text).drive))


def _last_part(text: str) -> str:
    parts = [part for part in re.split(r"[\\/]+", text) if part not in ("", "~")]
    return parts[-1] if parts else "checkpoint"
