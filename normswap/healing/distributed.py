"""Healing on several processes (``torchrun``, ``accelerate launch``): who writes, what is agreed, and how a
failure on one process ends them all with one line.

The Trainer runs DDP by itself once the process group exists; normswap adds what a command needs on top:

- **One writer.** Only rank 0 touches DST's folder (the destination checks, the scratch folder, the atomic
  output); the others never create, write or delete anything there, and wait at a barrier until rank 0 has
  written DST, so that every process ends together.
- **Agreed decisions.** Anything that depends on a clock (stopping at the time budget, dropping a check or a
  checkpoint that would not fit, the learning rate's decay over the time budget) or on a measurement (the
  target cosine) is decided by rank 0 and broadcast, or the processes would disagree on when to stop and hang.
- **Failing together.** A process that fails hands its one-line message to rank 0 through the launcher's
  key-value store and exits quietly; its exit ends the others (torchrun stops the rest of the group, and a
  collective in flight fails once a peer is gone), and rank 0, which prints, prints the peer's message instead
  of its own "stopped" or broken-connection error. So a failure on any rank is one line, from rank 0.

Stdlib at import (the CLI asks ``launched()`` before importing torch).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, TypeVar

T = TypeVar("T")

FAILURE_KEY = "normswap/failure/"  # + the failing rank
PEER_WAIT_SECONDS = 2.0  # how long rank 0 looks for a peer's message when its own failure may be the echo


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def launched() -> bool:
    """Started by a launcher with more than one process."""
    return world_size() > 1


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def is_main() -> bool:
    return rank() == 0


def use_cpu() -> bool:
    """Train on the CPU: ``accelerate launch --cpu`` says so (``ACCELERATE_USE_CPU``), and so does a launch with
    no GPU (accelerate would otherwise set up no DDP at all for a plain ``torchrun`` on a CPU-only machine)."""
    from accelerate.utils import parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_CPU"):
        return True
    if not launched():
        return False
    import torch

    return not torch.cuda.is_available()


def start() -> None:
    """Join the process group now (gloo on the CPU), as the Trainer would later: a failure from here on can
    be handed to rank 0 (``report``). Quiets the other ranks' progress bars and warnings."""
    if not launched():
        return
    import torch.distributed
    from accelerate import PartialState
    from transformers.utils import logging as transformers_logging

    if not torch.distributed.is_initialized():
        PartialState(cpu=use_cpu())
    if not is_main():  # rank 0 speaks for all: the same bars and warnings would come once per process
        transformers_logging.disable_progress_bar()
        logging.getLogger("normswap").setLevel(logging.ERROR)


def _group_ready() -> bool:
    if not launched():
        return False
    import torch.distributed

    return torch.distributed.is_available() and torch.distributed.is_initialized()


def broadcast(value: T) -> T:
    """Rank 0's ``value`` on every rank (the value itself with one process)."""
    if not _group_ready():
        return value
    import torch.distributed

    holder = [value]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def barrier() -> None:
    if _group_ready():
        import torch.distributed

        torch.distributed.barrier()


def _store() -> Any:
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def hand_over(message: str) -> bool:
    """On a rank other than 0: leave ``message`` for rank 0 to print; False when it cannot be left (no group
    yet), and this rank must print it itself."""
    if not _group_ready() or is_main():
        return False
    try:
        _store().set(f"{FAILURE_KEY}{rank()}", message)
    except Exception:  # noqa: BLE001 - the store is gone (the launcher ended): say it here instead
        return False
    return True


def peer_failure(wait: float = 0.0) -> str | None:
    """On rank 0: the message a failed peer left (the lowest rank's), waiting up to ``wait`` seconds."""
    if not _group_ready() or not is_main():
        return None
    keys = [f"{FAILURE_KEY}{peer}" for peer in range(1, world_size())]
    ends = time.monotonic() + wait
    try:
        store = _store()
        while True:
            for key in keys:
                if store.check([key]):
                    return store.get(key).decode("utf-8", errors="replace")
            if time.monotonic() >= ends:
                return None
            time.sleep(0.1)
    except Exception:  # noqa: BLE001 - no store to ask: rank 0 reports its own failure
        return None


def per_process_batch(batch_size: int) -> int:
    """``--batch-size`` is texts per step, all processes together: each process takes an equal share."""
    from ..errors import NormswapError

    processes = world_size()
    if batch_size % processes:
        raise NormswapError(f"--batch-size {batch_size} does not split evenly over {processes} processes (each "
                            f"takes an equal share of a step's texts); give a multiple of {processes}")
    return batch_size // processes


def report(error: BaseException, *, debug: bool, signals: Any, activity: str) -> int:
    """``failures.report_failure`` for a launched command: one line in all, printed by rank 0.

    Another rank hands its message over and stays quiet (with ``debug``, it prints its traceback too); it
    prints its line itself only when no process group exists yet to hand it to. Rank 0 prints a peer's
    message in place of its own when its own failure is not a known one (a stop sent by the launcher as the
    group ends, or a collective that broke when the peer left)."""
    import contextlib
    import io

    from ..errors import NormswapError
    from ..failures import describe, report_failure

    if not launched():
        return report_failure(error, debug=debug, signals=signals, activity=activity)
    if not is_main():
        stopped = isinstance(error, KeyboardInterrupt) or getattr(signals, "first", None) is not None
        if stopped or hand_over(describe(error, activity)):
            with contextlib.redirect_stderr(io.StringIO()):
                code = report_failure(error, debug=False, signals=signals, activity=activity)
            if debug:
                import traceback

                traceback.print_exception(error)
            return code
        return report_failure(error, debug=debug, signals=signals, activity=activity)
    peer = None if isinstance(error, NormswapError) else peer_failure(wait=PEER_WAIT_SECONDS)
    if peer is None:
        return report_failure(error, debug=debug, signals=signals, activity=activity)
    if debug:
        import traceback

        traceback.print_exception(error)
    from ..failures import EXIT_FAILURE, _say

    _say(f"Error: {peer}")
    return EXIT_FAILURE
