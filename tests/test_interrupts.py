"""Ctrl-C and SIGTERM inside ``deferred_interrupts``: noted at once, handled only at ``check()`` or on the way out."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_rms_norm import perturbed

from normswap.conversion import streaming
from normswap.conversion.checkpoint import convert_checkpoint
from normswap.interrupts import deferred_interrupts, import_uninterrupted


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


def test_ctrl_c_during_an_import_waits_for_the_module_to_be_whole(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C inside torch's import can land in a pybind11 callback and abort the process (SIGABRT, seen in
    CI); held, it is raised once the module has run to its end."""
    (tmp_path / "interrupted_mid_import.py").write_text(
        "import signal\nsignal.raise_signal(signal.SIGINT)\nreached_the_end = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "interrupted_mid_import", raising=False)
    with pytest.raises(KeyboardInterrupt):
        import_uninterrupted("interrupted_mid_import")
    assert sys.modules["interrupted_mid_import"].reached_the_end
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_conversion_acts_on_sigterm_at_the_next_tensor_and_leaves_nothing(
        sigterm_raises_stop: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The streamed writer defers a signal that arrives while a tensor is computed to the next tensor boundary."""
    perturbed("llama", "LlamaForCausalLM").save_pretrained(tmp_path / "source")
    produce = streaming._produce
    produced = []

    def signalled_on_the_third(*args: Any, **kwargs: Any) -> Any:
        produced.append(args[1].name)
        if len(produced) == 3:
            signal.raise_signal(signal.SIGTERM)
            produced.append("still computing")  # the handler has not run yet
        return produce(*args, **kwargs)

    monkeypatch.setattr(streaming, "_produce", signalled_on_the_third)
    with pytest.raises(StopError):
        convert_checkpoint(tmp_path / "source", tmp_path / "out", placement="post", verify_max_size="0",
                           max_shard_size="10KB")  # the planned layout: every tensor is produced here
    assert len(produced) == 4 and produced[3] == "still computing"  # no fourth tensor was started
    assert signal.getsignal(signal.SIGTERM) is _raise_stop
    assert sorted(path.name for path in tmp_path.iterdir()) == ["source"]
