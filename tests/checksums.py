"""A folder's content digest, to show a run left its source untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path


def checksum(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(folder.rglob("*")):
        if file.is_file():
            digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()
