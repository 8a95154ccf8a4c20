"""Scratch folders beside DST (the output being assembled, the early copy, offloaded weights, the heal's
intermediate conversion): named after DST and the process, marked as normswap's, and swept when their
process is gone.

A SIGKILL or a power cut leaves them behind, hundreds of MB each. Every scratch folder holds a marker file
saying which process made it, for which DST, on which host and boot. The next normswap run writing the same
DST removes the leftovers whose process is gone, and says so. A folder without a valid marker is never
touched, nor one whose process may still run (same host and boot, the PID alive with its start time), nor
one made on another host sharing the disk (its PIDs say nothing here).

Stdlib only: the CLI uses this before importing torch.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("normswap")

MARKER = ".normswap-scratch.json"
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@dataclass(frozen=True)
class ScratchOwner:
    """The process a scratch folder belongs to, as written in its marker."""

    pid: int
    host: str
    boot_id: str | None
    started: str | None  # the process's start time in clock ticks since boot (Linux), to tell a reused PID
    destination: str  # the resolved DST the folder was made for

    def to_json(self) -> str:
        return json.dumps({"pid": self.pid, "host": self.host, "boot_id": self.boot_id, "started": self.started,
                           "destination": self.destination})


def scratch_path(destination: Path, kind: str) -> Path:
    """``.DST.normswap-<kind>-<pid>`` beside the resolved DST: same file system, so renames move no bytes."""
    destination = destination.resolve()
    return destination.parent / f".{destination.name}.normswap-{kind}-{os.getpid()}"


def make_scratch(destination: Path, kind: str) -> Path:
    """Create a fresh, marked scratch folder for this process (an old one of this PID is swept first)."""
    folder = scratch_path(destination, kind)
    if folder.exists() or folder.is_symlink():
        if _owner_of(folder) is None:
            raise FileExistsError(errno.EEXIST, "exists and is not a marked normswap scratch folder; remove it "
                                  "or choose another DST", str(folder))
        remove_scratch(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    # made marked, under a staging name, then renamed: a kill between mkdir and the marker cannot leave an
    # unmarked folder under the scratch name, which no later run would dare to remove
    staging = folder.with_name(folder.name.replace(".normswap-", ".normswap-staging-", 1))
    if _owner_of(staging) is not None:
        remove_scratch(staging)
    staging.mkdir()
    mark(staging, destination)
    staging.rename(folder)
    return folder


def mark(folder: Path, destination: Path) -> None:
    """Write the marker: from now on a leftover ``folder`` is recognised as this process's."""
    (folder / MARKER).write_text(_current_owner(destination).to_json(), encoding="utf-8")


def unmark(folder: Path) -> None:
    """Drop the marker of a folder about to become DST (DST must not carry it)."""
    with contextlib.suppress(FileNotFoundError):
        (folder / MARKER).unlink()


def remove_scratch(folder: Path) -> None:
    """Remove a scratch folder, its marker last: a kill midway leaves a folder that is still recognised."""
    if not folder.is_dir() or folder.is_symlink():
        return
    for entry in folder.iterdir():
        if entry.name == MARKER:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
    with contextlib.suppress(FileNotFoundError):
        (folder / MARKER).unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()


def sweep_leftovers(destination: Path) -> list[Path]:
    """Remove the scratch folders for ``destination`` whose process is gone; returns what was removed."""
    destination = destination.resolve()
    parent = destination.parent
    try:
        entries = list(parent.iterdir())
    except OSError:
        return []  # an unreadable parent is reported by the destination check
    removed = []
    for entry in entries:
        if not _looks_like_scratch(entry.name, destination.name):
            continue
        owner = _owner_of(entry)
        if owner is None and ".normswap-staging-" in entry.name:
            with contextlib.suppress(OSError):
                entry.rmdir()  # killed between mkdir and its marker: removed only while empty
            continue
        if owner is None or not _is_for(owner, destination) or _may_be_running(owner):
            continue
        size = _folder_bytes(entry)
        remove_scratch(entry)
        if not entry.exists():
            removed.append(entry)
            logger.warning("removed %s (%s), left by normswap process %d, which is no longer running",
                           entry, size_text(size), owner.pid)
    return removed


def _looks_like_scratch(name: str, destination_name: str) -> bool:
    """``.DST.normswap-*``, or the scratch of a heal's intermediate conversion, ``..DST.normswap-*``."""
    return name.startswith((f".{destination_name}.normswap-", f"..{destination_name}.normswap-"))


def _is_for(owner: ScratchOwner, destination: Path) -> bool:
    """Made for this DST, or for one of this DST's own scratch folders (a heal's intermediate conversion)."""
    made_for = Path(owner.destination)
    return made_for == destination or (made_for.parent == destination.parent
                                       and made_for.name.startswith(f".{destination.name}.normswap-"))


def _owner_of(folder: Path) -> ScratchOwner | None:
    """The marker's owner, or None where there is no valid marker (then the folder is not normswap's)."""
    if folder.is_symlink() or not folder.is_dir():
        return None
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8")[:4096])
        owner = ScratchOwner(int(data["pid"]), str(data["host"]), data.get("boot_id"), data.get("started"),
                             str(data["destination"]))
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    return owner if owner.pid > 0 else None


def _may_be_running(owner: ScratchOwner) -> bool:
    if owner.host != socket.gethostname():
        return True  # another machine's process: its PID cannot be checked here
    boot = _boot_id()
    if boot is not None and owner.boot_id is not None and owner.boot_id != boot:
        return False  # made before a reboot: every process of that boot is gone
    if owner.pid == os.getpid():
        return True  # this process's own scratch (the early copy runs while DST is checked)
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    started = _process_start(owner.pid)
    return owner.started is None or started is None or started == owner.started


def _current_owner(destination: Path) -> ScratchOwner:
    return ScratchOwner(os.getpid(), socket.gethostname(), _boot_id(), _process_start(os.getpid()),
                        str(destination.resolve()))


def _boot_id() -> str | None:
    try:
        return _BOOT_ID.read_text(encoding="ascii").strip() or None
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in ticks since boot): a reused PID has another."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def size_text(size: int) -> str:
    """Bytes as GB from 0.1 GB up, else MB."""
    return f"{size / 1e9:.2f} GB" if size >= 10**8 else f"{size / 1e6:.1f} MB"
