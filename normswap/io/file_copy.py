"""Positional writes and kernel copies in bounded pieces, shared by the shard writer and the early copy.

Stdlib only: the early copy (``mirror``) runs before torch is imported.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import NormswapError

PIECE = 64 * 2**20  # one kernel copy or write; small enough to share a large tensor between threads


def write_at(descriptor: int, payload: memoryview, offset: int) -> None:
    """Write all of ``payload`` at ``offset``, in pieces of at most ``PIECE`` bytes."""
    view = payload.cast("B") if payload.ndim != 1 or payload.format != "B" else payload
    while view.nbytes:
        done = os.pwrite(descriptor, view[:PIECE], offset)
        view, offset = view[done:], offset + done


def copy_range(file: Path, offset: int, descriptor: int, destination: int, length: int) -> None:
    """Copy ``length`` bytes of ``file`` from ``offset`` to ``destination`` in ``descriptor``: by the kernel
    (``copy_file_range``), or by plain reads and writes where it is missing."""
    source = os.open(file, os.O_RDONLY)
    try:
        while length:
            try:
                done = os.copy_file_range(source, descriptor, length, offset, destination)
            except OSError:  # file systems or kernels without it: plain reads and writes
                done = 0
            if done == 0:
                _copy_plainly(file, source, offset, descriptor, destination, length)
                return
            offset, destination, length = offset + done, destination + done, length - done
    finally:
        os.close(source)


def _copy_plainly(file: Path, source: int, offset: int, descriptor: int, destination: int, length: int) -> None:
    while length:
        chunk = os.pread(source, min(length, PIECE), offset)
        if not chunk:
            raise NormswapError(f"{file} ended before its tensor did; the file is truncated")
        write_at(descriptor, memoryview(chunk), destination)
        offset, destination, length = offset + len(chunk), destination + len(chunk), length - len(chunk)
