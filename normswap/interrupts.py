"""Ctrl-C and SIGTERM while writer threads run: noted at once, raised only where it is safe.

Python raises a signal handler's exception in the main thread between any two bytecodes, including inside a
pure-Python ``__enter__`` that has just taken a lock, such as a ``Future``'s ``Condition``. The ``with`` then
never releases it. A writer thread finishing that future waits for the lock forever, and the main thread, on
its way out, waits for the writer forever. ``deferred_interrupts`` swaps the handlers for ones that only note
the signal; the shard writer calls ``check`` as each ``write`` begins, where no lock is held, and the signal
is handled there by the handler it would have met, as if it had just arrived.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

_DEFERRED = (signal.SIGINT, signal.SIGTERM)


class PendingInterrupts:
    """The signals noted while deferred, and the handlers they would have met."""

    def __init__(self, handlers: dict[int, Any]) -> None:
        self.handlers = handlers
        self.pending: list[int] = []

    def note(self, signum: int, frame: FrameType | None) -> None:
        if signum not in self.pending:
            self.pending.append(signum)

    def check(self) -> None:
        """Hand every noted signal to its own handler now (which usually raises)."""
        while self.pending:
            signum = self.pending.pop(0)
            handler = self.handlers[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[PendingInterrupts]:
    """Within: SIGINT and SIGTERM are noted, and handled at ``check()`` or, at the latest, on the way out.

    Outside the main thread no signal arrives, and nothing is changed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield PendingInterrupts({})
        return
    previous = {signum: signal.getsignal(signum) for signum in _DEFERRED}
    pending = PendingInterrupts(previous)
    swapped = [signum for signum, handler in previous.items()  # ignored, or not set from Python: left alone
               if handler is not None and handler != signal.SIG_IGN]
    for signum in swapped:
        signal.signal(signum, pending.note)
    try:
        yield pending
    finally:
        for signum in swapped:
            signal.signal(signum, previous[signum])
        pending.check()


def import_uninterrupted(*module_names: str) -> None:
    """Import ``module_names`` with Ctrl-C and SIGTERM held until the imports end.

    torch's import runs Python from C++ (pybind11 callbacks). An interrupt raised inside one becomes a C++
    exception nothing catches, and the process aborts (``terminate called after throwing an instance of
    'pybind11::error_already_set'``, SIGABRT) instead of stopping with one line. Held, it is raised a moment
    later, once the import is whole.
    """
    import importlib

    with deferred_interrupts():
        for name in module_names:
            importlib.import_module(name)
