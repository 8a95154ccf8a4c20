"""Leave the command-line process without tearing the interpreter down.

Once torch and transformers are imported, Python's normal shutdown (clearing every module, collecting
every object) takes about 0.9 s on a 2-core machine: an eighth of a 4.8 GB conversion. Everything the
command wrote is closed by the time ``main`` returns, so the process can end as soon as its output is
flushed and the ``atexit`` handlers have run. mypy's ``hard_exit`` skips the teardown with ``os._exit``
for the same reason (it does not run the ``atexit`` handlers; this does).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading

_FLUSH_FAILED = 120  # what CPython exits with when flushing stdout fails at shutdown


def exit_without_teardown(code: int) -> None:
    """Run the ``atexit`` handlers, flush, and end the process with ``code``; falls back to ``sys.exit``
    while a non-daemon thread still runs (a normal shutdown would wait for it)."""
    if any(thread.is_alive() and not thread.daemon for thread in threading.enumerate()
           if thread is not threading.main_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()  # first: what they print is flushed below
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # closed pipe, closed or missing stream
            code = code or _FLUSH_FAILED
    os._exit(code)
