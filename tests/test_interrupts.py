"""Ctrl-C and SIGTERM inside ``deferred_interrupts``: noted at once, handled only at ``check()`` or on the way out."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator

import pytest

from normswap.interrupts import deferred_interrupts


class StopError(Exception):
    pass


def _raise_stop(signum: int, frame: object) -> None:
    raise StopError(signum)


@pytest.fixture(autouse=True)
def ctrl_c_raises() -> Iterator[None]:
    """Python's own Ctrl-C handler, which a shell's background job (CI) does not get: SIGINT is ignored there."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture()
def sigterm_raises_stop() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, _raise_stop)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_a_signal_waits_for_check_and_meets_its_own_handler(sigterm_raises_stop: None) -> None:
    reached = []
    with deferred_interrupts() as interrupts:
        signal.raise_signal(signal.SIGTERM)
        reached.append("after SIGTERM")  # not interrupted here
        signal.raise_signal(signal.SIGINT)
        reached.append("after Ctrl-C")
        with pytest.raises(StopError):
            interrupts.check()  # both are pending, handled in arrival order: SIGTERM first
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
    assert reached == ["after SIGTERM", "after Ctrl-C"]


def test_ctrl_c_is_handled_by_the_default_handler_at_check() -> None:
    with deferred_interrupts() as interrupts:
        signal.raise_signal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
        interrupts.check()  # handled once: nothing is pending now
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_never_checked_is_handled_on_the_way_out(sigterm_raises_stop: None) -> None:
    with pytest.raises(StopError), deferred_interrupts():
        signal.raise_signal(signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is _raise_stop


def test_handlers_are_restored_after_an_error(sigterm_raises_stop: None) -> None:
    with pytest.raises(ValueError), deferred_interrupts():
        assert signal.getsignal(signal.SIGTERM) is not _raise_stop
        raise ValueError("boom")
    assert signal.getsignal(signal.SIGTERM) is _raise_stop
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_signal_stays_ignored() -> None:
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with deferred_interrupts() as interrupts:
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
            signal.raise_signal(signal.SIGTERM)
            interrupts.check()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_outside_the_main_thread_nothing_changes() -> None:
    seen = []

    def work() -> None:
        with deferred_interrupts() as interrupts:
            seen.append(signal.getsignal(signal.SIGINT))
            interrupts.check()

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen == [signal.default_int_handler]
