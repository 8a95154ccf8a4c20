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
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import NormswapError
from ..failures import printable_path
from .scratch import make_scratch, mark, remove_scratch, scratch_path, size_text, sweep_leftovers, unmark


class DestinationError(NormswapError):
    """DST cannot be written as asked."""


def check_destination(sources: Path | Sequence[Path] | None, destination: Path, overwrite: bool) -> None:
    """Refuse a DST that would lose data or cannot be written, before any work.

    Refused: DST inside a source, DST that is a source or contains one (``--overwrite`` would delete it),
    an existing DST holding files a source links to, DST that is a file, an existing DST without
    ``overwrite``, an existing non-empty DST that is not a checkpoint folder (``--overwrite`` replaces an
    earlier output, not an arbitrary folder), and an unwritable parent. Paths are compared resolved (``.``,
    ``..``, trailing slashes, symlinks) and by inode (bind mounts).
    """
    require_utf8_path(destination, "DST")
    destination = destination.resolve()
    listed = [] if sources is None else [sources] if isinstance(sources, Path) else list(sources)
    for source in listed:
        require_utf8_path(source, "SRC")
        _refuse_overlap(source.resolve(), destination)
    if destination.is_file():
        raise DestinationError(f"{destination} is an existing file; choose a folder path for the output")
    if destination.exists():
        if not overwrite:
            raise DestinationError(f"{destination} already exists; pass --overwrite to replace it")
        _refuse_replacing_other_data(destination, listed)
    parent = _existing_ancestor(destination.parent)
    try:  # a real attempt: permission bits say nothing for root, nor about read-only mounts
        probe = tempfile.mkdtemp(prefix=".normswap-probe-", dir=parent)
    except OSError as error:
        raise DestinationError(f"cannot write in {parent} ({error.strerror}); choose an output folder you can "
                               "write to") from None
    os.rmdir(probe)
    sweep_leftovers(destination)


def require_utf8_path(path: Path, role: str) -> None:
    """transformers and safetensors take paths as text: a name that is not UTF-8 cannot reach them."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = printable_path(path)
        raise DestinationError(f"the {role} path {shown} holds bytes that are not UTF-8; rename it (or link to "
                               "it under a UTF-8 name) and pass that name") from None


def _refuse_overlap(source: Path, destination: Path) -> None:
    source_folder = source if source.is_dir() else source.parent
    if destination == source_folder or _same_folder(destination, source_folder):
        raise DestinationError(f"{destination} is the source checkpoint; choose another output folder (the source "
                               "is never written to)")
    if source_folder in destination.parents:
        raise DestinationError(f"{destination} is inside the source checkpoint {source_folder}; "
                               "choose an output folder outside it")
    if destination in source_folder.parents or _is_ancestor_by_inode(destination, source_folder):
        raise DestinationError(f"{destination} contains the source checkpoint {source_folder}; replacing it would "
                               "delete the source: choose an output folder that does not contain the source")


def _refuse_replacing_other_data(destination: Path, sources: list[Path]) -> None:
    """``--overwrite`` replaces an earlier output: a folder with a config.json, or an empty one."""
    for source in sources:
        folder = source.resolve() if source.is_dir() else source.resolve().parent
        for entry in _entries(folder):
            target = _resolved(entry)
            if target is not None and (target == destination or destination in target.parents):
                raise DestinationError(f"{entry} links to {target}, inside {destination}; replacing {destination} "
                                       "would delete the source's data: choose another output folder")
    names = sorted(entry.name for entry in _entries(destination))
    if names and "config.json" not in names:
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise DestinationError(f"{destination} is not a checkpoint folder (it holds {shown}); --overwrite replaces "
                               "only an earlier output (a folder with a config.json) or an empty folder: choose "
                               "another DST, or empty it yourself")


def _entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def _resolved(path: Path) -> Path | None:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop: RuntimeError before Python 3.13
        return None


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _is_ancestor_by_inode(candidate: Path, folder: Path) -> bool:
    """``candidate`` is one of ``folder``'s ancestors by device and inode (a bind mount of it, say)."""
    try:
        wanted = os.stat(candidate)
    except OSError:
        return False
    for ancestor in folder.parents:
        try:
            found = os.stat(ancestor)
        except OSError:
            continue
        if (found.st_dev, found.st_ino) == (wanted.st_dev, wanted.st_ino):
            return True
    return False


@contextlib.contextmanager
def atomic_output(destination: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it becomes ``destination``, on failure it is removed.

    The temporary folder and the replaced DST are marked scratch folders (``scratch``), so a kill at any
    point leaves nothing that the next run to this DST does not recognise and remove; DST itself carries
    no marker.
    """
    destination = destination.resolve()
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = make_scratch(destination, "tmp")
    try:
        yield temporary
    except BaseException:
        remove_scratch(temporary)
        raise
    if destination.exists() and not overwrite:  # appeared while we worked
        remove_scratch(temporary)
        raise DestinationError(f"{destination} appeared while converting; pass --overwrite to replace it")
    unmark(temporary)
    if destination.exists():
        previous = scratch_path(destination, "old")
        destination.rename(previous)
        temporary.rename(destination)
        mark(previous, destination)  # only now: until the new DST is in place, the old one is the only copy
        remove_scratch(previous)
    else:
        temporary.rename(destination)


def require_space(destination: Path, needed: int) -> None:
    """Refuse up front when the output will not fit: a full disk halfway through helps no one."""
    folder = _existing_ancestor(destination.resolve().parent)
    free = shutil.disk_usage(folder).free
    margin = 16 * 2**20  # config, code, report, card
    if needed + margin > free:
        raise DestinationError(f"the output needs {size_text(needed + margin)} but {folder} has only "
                               f"{size_text(free)} free; "
                               "free some space or choose a DST on another disk")


def _existing_ancestor(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path
