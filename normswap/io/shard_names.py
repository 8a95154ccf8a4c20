"""What a checkpoint's index may name as a shard: a plain file name inside the checkpoint folder.

An index is data from the checkpoint's author. ``../x.safetensors``, ``/etc/passwd`` or ``sub/x.bin`` would
make normswap open files outside SRC, so such names are refused before any shard is opened. Stdlib only:
the early copy checks names before torch is imported.
"""

from __future__ import annotations

_FORBIDDEN_CHARACTERS = ("/", "\\", "\0")


def is_plain_file_name(name: object) -> bool:
    """A name of a file in the folder itself: no folder part, not ``.`` or ``..``, no drive letter."""
    return (isinstance(name, str) and name not in ("", ".", "..")
            and not any(c in name for c in _FORBIDDEN_CHARACTERS) and ":" not in name[:2])


def is_plain_shard_name(name: object, suffix: str) -> bool:
    """A non-hidden plain file name ending in ``suffix`` (``.safetensors`` or ``.bin``)."""
    return (isinstance(name, str) and is_plain_file_name(name) and name.endswith(suffix)
            and len(name) > len(suffix) and not name.startswith("."))
