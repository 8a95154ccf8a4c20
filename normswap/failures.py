"""Every way the command line can fail, as one line on stderr and an exit code; never a traceback.

``NormswapError`` carries its own message. Failures of the machine (a full disk, a file-size limit, a file
that cannot be read, memory) name the file and the fix. An interrupt is an interrupt even when it surfaces
wrapped in another exception (Python 3.11 wraps a Ctrl-C that lands inside a class body during an import
in ``RuntimeError: Error calling __set_name__``). A module that is not installed (a model's code importing an
optional package) is named with its install. Anything else is a normswap bug: one line that says so and asks for
``--debug``, which prints the traceback first.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import traceback

from .errors import NormswapError

EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
EXIT_BROKEN_PIPE = 141  # as if killed by SIGPIPE, like other tools whose reader went away


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` and cleanup runs."""


class SignalsSeen:
    """SIGINT and SIGTERM handlers that raise as usual and remember that the user asked to stop.

    A library may catch the interrupt and raise something else in its place (transformers' lazy import turns
    a Ctrl-C that lands while a model module imports into ``ModuleNotFoundError``, with the interrupt lost);
    whatever a run fails with after the user asked it to stop is reported as the stop.
    """

    def __init__(self) -> None:
        self.first: KeyboardInterrupt | None = None

    def interrupt(self, signum: int, frame: object) -> None:
        self.first = self.first or KeyboardInterrupt()
        raise KeyboardInterrupt

    def terminate(self, signum: int, frame: object) -> None:
        self.first = self.first or Terminated()
        raise Terminated


def report_failure(error: BaseException, debug: bool, signals: SignalsSeen | None = None,
                   activity: str = "") -> int:
    """Print the one line for ``error`` (after the traceback with ``debug``) and return the exit code.

    ``activity`` (``"converting SRC"``) says, for a normswap bug, what the command was doing."""
    interrupt = _interrupt_in_chain(error) or (signals.first if signals is not None else None)
    if isinstance(error, BrokenPipeError) and interrupt is None:
        _silence_stdout()  # the reader (``| head``) has all it wanted; nothing more can be said there
        return EXIT_BROKEN_PIPE
    if debug:
        traceback.print_exception(error)
    if interrupt is not None:
        name = "SIGTERM" if isinstance(interrupt, Terminated) else "interrupt"
        _say(f"Stopped by {name}: nothing was written (the temporary output was removed)")
        return EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED
    _say(f"Error: {describe(error, activity)}")
    return EXIT_FAILURE


def describe(error: BaseException, activity: str = "") -> str:
    """The one-line message for any exception; ``activity`` is what was being done, for a bug's message."""
    if isinstance(error, NormswapError):
        return _one_line(str(error))
    if isinstance(error, OSError):
        return describe_os_error(error)
    if isinstance(error, MemoryError):
        return ("ran out of memory; close other programs, or use a machine with more memory (streamed conversions "
                "need only a few tensors at a time: see --verify-max-size)")
    if isinstance(error, RecursionError):
        return ("an input is nested too deeply to read (a JSON file or header built to exhaust the parser?); "
                "check the checkpoint's files")
    missing = _missing_package(error)
    if missing:
        during = f" (needed while {activity})" if activity else ""
        return (f"the Python package '{missing}' is not installed in this environment{during}; install the package "
                f"that provides it (often pip install {missing}) and run again")
    first = _one_line(str(error)) or "no message"
    during = f" while {activity}" if activity else ""
    return (f"internal error ({type(error).__name__}: {first[:200]}){during}; this is a normswap bug: rerun with "
            "--debug for the traceback, and please report it")


def _missing_package(error: BaseException) -> str:
    """The top-level package a ``ModuleNotFoundError`` names, unless it is normswap's own (which is a bug)."""
    if not isinstance(error, ModuleNotFoundError) or not error.name:
        return ""
    package = error.name.partition(".")[0]
    return "" if package == "normswap" else package


_FIXES = {
    errno.ENOSPC: "free some space, or choose a DST on another disk",
    errno.EDQUOT: "free some space within your quota, or choose a DST on another disk",
    errno.EFBIG: "the file-size limit (ulimit -f) is lower than the output: raise it, or pass a smaller "
                 "--max-shard-size",
    errno.EACCES: "make it readable (or its folder writable) for this user, or run as a user who can",
    errno.EPERM: "make it readable (or its folder writable) for this user, or run as a user who can",
    errno.EROFS: "the file system is read-only: choose a DST on a writable disk",
    errno.ELOOP: "a symbolic link loops back on itself: remove or fix the link",
    errno.ENAMETOOLONG: "shorten the path",
    errno.EIO: "the disk reported an I/O error: check it, or copy the checkpoint elsewhere",
    errno.EMFILE: "too many files are open: raise the limit (ulimit -n)",
    errno.ENOENT: "the file was removed while normswap ran, or a link points nowhere: check the path",
    errno.ENOTDIR: "a folder was expected there: check the path",
    errno.EISDIR: "a file was expected there, not a folder: check the path",
}


def describe_os_error(error: OSError) -> str:
    """``<what went wrong>: <file>; <fix>``, from the errno."""
    reason = error.strerror or (str(error) or type(error).__name__)
    where = " and ".join(printable_path(name) for name in (error.filename, error.filename2) if name is not None)
    fix = _FIXES.get(error.errno or -1, "check the file and the disk, then run again")
    return f"{reason[:1].lower()}{reason[1:]}{': ' + where if where else ''}; {fix}"


def printable_path(name: object) -> str:
    """A path as text, with bytes that are not UTF-8 escaped (printing them would fail)."""
    if isinstance(name, bytes):
        return name.decode("utf-8", errors="backslashreplace")
    return os.fsencode(str(name)).decode("utf-8", errors="backslashreplace")


def _interrupt_in_chain(error: BaseException) -> KeyboardInterrupt | None:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


def _say(line: str) -> None:
    with contextlib.suppress(OSError, ValueError):  # stderr closed: the exit code still tells
        print(line.encode("utf-8", errors="backslashreplace").decode("utf-8"), file=sys.stderr)


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
