"""Where a converted checkpoint goes: checked before any work, written atomically.

Nothing is lost: the output is assembled in a hidden sibling folder and renamed into place
only when complete; an error or an interrupt removes it and leaves no DST; an existing DST is
replaced only with ``overwrite``; SRC is never written to.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import NormswapError


class DestinationError(NormswapError):
    """DST cannot be written as asked."""


def check_destination(source: Path | None, destination: Path, overwrite: bool) -> None:
    """Refuse DST inside SRC, DST that is a file, an existing DST without ``overwrite``, an unwritable parent."""
    destination = destination.resolve()
    if source is not None:
        source = source.resolve()
        source_folder = source if source.is_dir() else source.parent
        if destination == source_folder or source_folder in destination.parents:
            raise DestinationError(f"{destination} is inside the source checkpoint {source_folder}; "
                                   "choose an output folder outside it")
    if destination.is_file():
        raise DestinationError(f"{destination} is an existing file; choose a folder path for the output")
    if destination.exists() and not overwrite:
        raise DestinationError(f"{destination} already exists; pass --overwrite to replace it")
    parent = _existing_ancestor(destination.parent)
    try:  # a real attempt: permission bits say nothing for root, nor about read-only mounts
        probe = tempfile.mkdtemp(prefix=".normswap-probe-", dir=parent)
    except OSError as error:
        raise DestinationError(f"cannot write in {parent} ({error.strerror}); choose an output folder you can "
                               "write to") from None
    os.rmdir(probe)


@contextlib.contextmanager
def atomic_output(destination: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it becomes ``destination``, on failure it is removed."""
    destination = destination.resolve()
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.parent / f".{destination.name}.normswap-tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if destination.exists():
        if not overwrite:  # appeared while we worked
            shutil.rmtree(temporary, ignore_errors=True)
            raise DestinationError(f"{destination} appeared while converting; pass --overwrite to replace it")
        previous = destination.parent / f".{destination.name}.normswap-old-{os.getpid()}"
        destination.rename(previous)
        temporary.rename(destination)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        temporary.rename(destination)


def require_space(destination: Path, needed: int) -> None:
    """Refuse up front when the output will not fit: a full disk halfway through helps no one."""
    folder = _existing_ancestor(destination.resolve().parent)
    free = shutil.disk_usage(folder).free
    margin = 16 * 2**20  # config, code, report, card
    if needed + margin > free:
        raise DestinationError(f"the output needs {_gb(needed + margin)} but {folder} has only {_gb(free)} free; "
                               "free some space or choose a DST on another disk")


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 10**8 else f"{size / 1e6:.1f} MB"


def _existing_ancestor(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path
