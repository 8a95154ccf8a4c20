"""Copy the source shards' bytes to the output while the conversion is still being planned.

Most conversions copy almost every byte unchanged (a Post <-> Pre conversion moves only norm vectors), but
planning needs torch, transformers and the model's code, which take seconds to import and trace. So the
copy starts first, in a thread (the kernel's ``copy_file_range`` releases the GIL): each source shard's data
goes to a file of the same name, at the same place after a header region reserved larger than the source's.
Once the plan is known, ``mirror_layout`` decides whether the output can keep this layout (every source
tensor's bytes either reused as they are or overwritten by an output tensor of the same size) and the
shard writer then writes only what changed, and the headers. If not, the copy is thrown away and the output
is written in the planned layout, as without a mirror.

Stdlib only: the CLI starts it before importing torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import NormswapError
from ..failures import describe_os_error
from .destination import check_destination, require_space
from .file_copy import PIECE, copy_range
from .scratch import make_scratch, remove_scratch, scratch_path
from .shard_names import is_plain_shard_name

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_ALIGNMENT = 8


@dataclass(frozen=True)
class MirroredFile:
    """One source shard and where its data goes in the output file of the same name."""

    name: str
    source: Path
    source_data_start: int  # 8 + the source's header length
    data_bytes: int
    data_start: int  # 8 + the reserved header length: where the data begins in the output

    @property
    def header_room(self) -> int:
        return self.data_start - 8


class SourceMirror:
    """The copy in flight. ``wait`` returns the files once copied (raising what the copy raised);
    ``discard`` stops it and removes what it wrote; ``move_into`` hands the files to the output folder."""

    def __init__(self, files: list[MirroredFile], destination: Path) -> None:
        self.files = files
        self.destination = destination
        self.folder = scratch_path(destination, "mirror")
        self._made = False  # whether this process made ``folder`` (only then is it removed)
        self._cancelled = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._copy_all, name="normswap-mirror", daemon=True)

    @property
    def data_bytes(self) -> int:
        return sum(file.data_bytes for file in self.files)

    def try_start(self) -> bool:
        """Create the scratch folder and start copying; False (nothing left behind) where the folder cannot be
        made: the conversion then writes without a mirror."""
        try:
            self.folder = make_scratch(self.destination, "mirror")
        except OSError:
            return False
        self._made = True
        self._thread.start()
        return True

    def wait(self) -> list[MirroredFile]:
        self._thread.join()
        if self._error is not None:
            if isinstance(self._error, OSError):
                raise NormswapError(f"copying the source shards failed: {describe_os_error(self._error)}"
                                    ) from self._error
            raise NormswapError(f"copying the source shards failed ({self._error}); check the disk, then run "
                                "again") from self._error
        return self.files

    def discard(self) -> None:
        self._cancelled.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._made:
            remove_scratch(self.folder)

    def move_into(self, folder: Path) -> None:
        """The copied files become the output's (same file system: renames, no bytes move)."""
        self.wait()
        for file in self.files:
            os.replace(self.folder / file.name, folder / file.name)
        remove_scratch(self.folder)

    def _copy_all(self) -> None:
        try:
            for file in self.files:
                self._copy(file)
        except BaseException as error:  # noqa: BLE001 - handed to the waiting thread, which raises it
            self._error = error

    def _copy(self, file: MirroredFile) -> None:
        target = os.open(self.folder / file.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for done in range(0, file.data_bytes, PIECE):
                if self._cancelled.is_set():
                    return
                copy_range(file.source, file.source_data_start + done, target, file.data_start + done,
                           min(PIECE, file.data_bytes - done))
        except OSError as error:  # a write on a descriptor names no file: name the one being written
            if error.filename is not None:
                raise
            raise OSError(error.errno, error.strerror or str(error), str(self.folder / file.name)) from error
        finally:
            os.close(target)


@contextlib.contextmanager
def early_copy(source: Path, destination: Path, overwrite: bool, norm: str | None, exact: bool, dtype: str | None,
               given: SourceMirror | None = None) -> Iterator[SourceMirror | None]:
    """The caller's mirror (``given``), or one started here where it can help, and discarded on the way out,
    used or not: nothing of it stays beside DST."""
    if given is not None or not source.is_dir() or not mirror_helps(norm, exact, dtype):
        yield given
        return
    check_destination(source, destination, overwrite)
    own = planned_mirror(source, destination)
    try:  # started inside: a signal that lands while the thread starts still finds the mirror to discard
        if own is not None and not own.try_start():
            own = None
        yield own
    finally:
        if own is not None:
            own.discard()


def mirror_helps(norm: str | None, exact: bool, dtype: str | None) -> bool:
    """Conversions that keep most tensors' bytes: not a new dtype, not the one-dimension-wider LayerNorm."""
    return dtype in (None, "auto") and not (norm == "layernorm" and exact)


def planned_mirror(source: Path, destination: Path) -> SourceMirror | None:
    """A copy of ``source``'s safetensors shards beside ``destination``, not yet started, or None where it
    cannot help (legacy .bin weights, unreadable files: the conversion then reports those as usual). Refuses
    a disk without room for the copy (``require_space``), as the conversion would."""
    files = _mirrored_files(source)
    if not files or not hasattr(os, "copy_file_range"):
        return None
    mirror = SourceMirror(files, destination.resolve())
    require_space(destination, mirror.data_bytes)
    return mirror


def _mirrored_files(source: Path) -> list[MirroredFile]:
    names = _shard_names(source)
    files = []
    for name in names:
        path = source / name
        try:
            size = path.stat().st_size
            with path.open("rb") as handle:
                prefix = handle.read(8)
        except OSError:
            return []
        if len(prefix) < 8:
            return []
        (length,) = struct.unpack("<Q", prefix)
        if length > size - 8:
            return []
        room = 2 * length + 4096  # renamed and added tensors need more header than the source had
        room += -room % _ALIGNMENT
        files.append(MirroredFile(name, path, 8 + length, size - 8 - length, 8 + room))
    return files


def _shard_names(source: Path) -> list[str]:
    index = source / _INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            return []
        if not isinstance(weight_map, dict):
            return []
        names = sorted({str(name) for name in weight_map.values()})
        return names if all(is_plain_shard_name(name, ".safetensors") for name in names) else []
    return [_SINGLE] if (source / _SINGLE).is_file() else []
