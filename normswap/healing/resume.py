"""Which Trainer checkpoint ``--resume`` continues from: the newest one that was saved to the end.

The Trainer writes ``checkpoint-N`` in place (no temporary folder): the weights, the optimiser and scheduler
states, the RNG states, and ``trainer_state.json`` last. A heal killed while saving leaves a checkpoint cut
short, and resuming from it fails in torch or safetensors with a traceback, or worse resumes from a
half-written state. A checkpoint counts as complete when its ``trainer_state.json`` parses and names its own
step, and every weight and state file in it is whole (a safetensors file as long as its header says, a
``torch.save`` zip with its central directory, which is written last). The newest complete one is used and a
warning names the ones skipped; with none complete, one line says what to remove.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import zipfile
from pathlib import Path

from ..errors import NormswapError

logger = logging.getLogger("normswap")

_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_STATES = ("optimizer.pt", "scheduler.pt")


def last_complete_checkpoint(work_dir: str | Path) -> str | None:
    """The newest complete ``checkpoint-N`` in ``work_dir``; None when it holds none at all."""
    folder = Path(work_dir)
    if not folder.is_dir():
        return None
    found = sorted((int(match.group(1)), child) for child in folder.iterdir()
                   if (match := _CHECKPOINT.fullmatch(child.name)) and child.is_dir())
    cut_short: list[str] = []
    for step, checkpoint in reversed(found):
        if is_complete(checkpoint, step):
            if cut_short:
                logger.warning(f"{', '.join(cut_short)} in {folder} {'is' if len(cut_short) == 1 else 'are'} "
                               f"incomplete (killed while saving?); resuming from {checkpoint.name}")
            return str(checkpoint)
        cut_short.append(checkpoint.name)
    if cut_short:
        raise NormswapError(f"--resume: {folder} holds no complete checkpoint ({', '.join(cut_short)} "
                            f"{'was' if len(cut_short) == 1 else 'were'} cut short, killed while saving?); remove "
                            "it to start from step 0, or pass another --work-dir")
    return None


def is_complete(checkpoint: Path, step: int) -> bool:
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(state, dict) or state.get("global_step") != step:
        return False
    if not all((checkpoint / name).is_file() for name in _STATES):
        return False
    weights = sorted(checkpoint.glob("*.safetensors"))
    pickled = sorted(checkpoint.glob("*.pt")) + sorted(checkpoint.glob("*.pth")) + sorted(checkpoint.glob("*.bin"))
    if not weights and not (checkpoint / "pytorch_model.bin").is_file():
        return False
    return all(_whole_safetensors(path) for path in weights) and all(_whole_zip(path) for path in pickled)


def _whole_safetensors(path: Path) -> bool:
    """As long as its header says: 8 bytes of header length, the header, then every tensor's bytes."""
    try:
        with path.open("rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(length))
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
        return path.stat().st_size >= 8 + length + max(ends, default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return False


def _whole_zip(path: Path) -> bool:
    """``torch.save`` writes a zip whose central directory comes last: a cut file has none. An old-style
    pickle (not a zip) is taken as it is."""
    try:
        if not zipfile.is_zipfile(path):
            with path.open("rb") as file:
                return file.read(2) == b"\x80\x02"  # torch's legacy format starts as a protocol-2 pickle
        with zipfile.ZipFile(path):
            return True
    except (OSError, zipfile.BadZipFile):
        return False
