"""A folder's content digest, to show a run left its source untouched."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def checksum(folder: Path) -> str:
    """Names, link targets, file modes and bytes of everything under ``folder``, links not followed (a loop
    in the folder cannot make it run away, and a link retargeted shows)."""
    sha = hashlib.sha256()
    for root, folders, files in os.walk(folder, followlinks=False):
        folders.sort()
        for name in sorted(files + [f for f in folders if os.path.islink(os.path.join(root, f))]):
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder).encode("utf-8", "surrogateescape")
            if os.path.islink(path):
                sha.update(b"L" + relative + os.fsencode(os.readlink(path)))
            elif os.path.isfile(path):
                sha.update(b"F" + relative + oct(os.stat(path).st_mode).encode())
                try:
                    with open(path, "rb") as handle:
                        sha.update(handle.read())
                except PermissionError:  # run without root's override: the mode says it is unreadable
                    sha.update(b"unreadable")
    return sha.hexdigest()
