"""``normswap heal ORIGINAL CONVERTED DST``: heal a converted checkpoint and write it like a conversion.

The healed model keeps the converted checkpoint's realisation (stock family or normswap-generated code,
shipped again beside the weights), its carried norms and support files; the weights go through the same
shard writer, into a temporary sibling that becomes DST only when complete.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..conversion.checkpoint import CARRIED_FILE, REPORT_FILE, load_model, load_tokenizer
from ..conversion.finite import NonFiniteError, finite_for_json, first_nonfinite
from ..detect.source import load_config
from ..errors import SourceError
from ..io.destination import atomic_output, check_destination, require_space
from ..io.model_card import heal_card
from ..io.scratch import make_scratch, remove_scratch
from ..io.shard_writer import parse_size, save_state_dict
from ..io.source_card import read_source_card
from ..io.source_identity import identify_source, source_name
from ..io.support_files import copy_support_files
from ..io.tokenizer_files import pin_tokenizer_class
from . import budget, distributed
from .api import heal
from .plot import PLOT_FILE, plot_drift, require_matplotlib
from .report import HealReport
from .stages import heal_in_stages


def heal_checkpoint(original: str | Path, converted: str | Path, destination: str | Path, *,
                    overwrite: bool = False, trust_remote_code: bool = False, max_shard_size: str = "5GB",
                    plot: bool = False, trust_converted_code: bool | None = None, started: float | None = None,
                    **options: Any) -> HealReport:
    """Load both checkpoints, heal the converted one toward the original, write it to ``destination``
    (with ``plot``, also a PNG of per-sublayer drift before and after).

    ``stages`` (in ``options``): remove a ``--norm none`` conversion's norms group by group, healing after each
    (``stages.heal_in_stages``). ``max_time`` (in ``options``) bounds all of it, the loading and the save
    included, counted from ``started`` (a ``budget.now()`` reading; default: now): the save's time is estimated
    from the converted checkpoint's size and kept free. Trainer checkpoints are written only to a ``work_dir``
    the caller names.

    ``trust_remote_code`` allows the custom code of the original and of both tokenizers (the converted
    checkpoint's tokenizer files are the original's); ``trust_converted_code`` (default: the same) allows
    the converted checkpoint's modeling code, which ``convert --heal`` sets for the code it just generated.

    Under a launcher (``torchrun``, ``accelerate launch``: ``distributed``), every process loads and trains,
    and rank 0 alone checks DST, keeps the scratch folder and writes DST; the others wait until it is written.
    """
    started = budget.now() if started is None else started
    trust_converted = trust_remote_code if trust_converted_code is None else trust_converted_code
    original_path, converted_path, destination_path = Path(original), Path(converted), Path(destination)
    for path in (original_path, converted_path):
        if not path.is_dir():
            raise SourceError(f"{path} is not a checkpoint folder; heal takes ORIGINAL and CONVERTED folders")
    main = distributed.is_main()  # under a launcher, only rank 0 looks at, or writes in, DST's folder
    if main:
        check_destination((original_path, converted_path), destination_path, overwrite)
    if plot:
        require_matplotlib()
    teacher = load_model(original_path, load_config(original_path, trust_remote_code), trust_remote_code)
    _refuse_if_spent(started, options.get("max_time"))
    student = load_model(converted_path, load_config(converted_path, trust_converted), trust_converted)
    _refuse_if_spent(started, options.get("max_time"))
    for path, model in ((original_path, teacher), (converted_path, student)):
        found = first_nonfinite(model.state_dict().items())
        if found is not None:
            raise NonFiniteError(f"{path}: tensor {found[0]!r} has {found[1]} NaN/Inf value(s), and healing would "
                                 "train on NaN; fix the checkpoint (re-convert it from a finite source)")
    tokenizer = (load_tokenizer(converted_path, trust_remote_code)
                 or load_tokenizer(original_path, trust_remote_code))
    # Trainer checkpoints (hundreds of MB) go to a marked scratch folder beside DST unless the user keeps them:
    # after a SIGKILL the next run to DST finds and removes it, where a folder in /tmp would stay
    scratch = None if options.get("work_dir") or not main else make_scratch(destination_path, "heal")
    try:
        reserve = budget.save_seconds(sum(t.numel() * t.element_size() for t in student.state_dict().values()))
        stages = options.pop("stages", None)
        heal_options = {"checkpoints": bool(options.get("work_dir")), **options,
                        "work_dir": options.get("work_dir") or scratch}
        if stages:  # a staged removal of a --norm none conversion's norms (stages.py)
            student, report = heal_in_stages(teacher, student, stages, tokenizer=tokenizer, started=started,
                                             reserve=reserve, **heal_options)
        else:
            student, report = heal(teacher, student, tokenizer=tokenizer, started=started, reserve=reserve,
                                   **heal_options)
    finally:
        if scratch is not None:
            remove_scratch(scratch)
    if main:
        _write(student, report, original_path, converted_path, destination_path, overwrite, max_shard_size, plot)
    distributed.barrier()  # every process ends when DST is written (or fails when rank 0 fails to write it)
    ended = budget.now()
    return replace(report, command_seconds=ended - started,
                   timings={**report.timings, "saving": ended - started - report.seconds})


def _write(student: Any, report: HealReport, original_path: Path, converted_path: Path, destination_path: Path,
           overwrite: bool, max_shard_size: str, plot: bool) -> None:
    """DST, atomically: the healed weights, config, code, support files, report, card and plot."""
    state = student.state_dict()
    require_space(destination_path, sum(t.numel() * t.element_size() for t in state.values()))
    with atomic_output(destination_path, overwrite) as folder:
        save_state_dict(folder, state, parse_size(max_shard_size))
        provenance = dict(getattr(student.config, "normswap", None) or {})
        provenance["source"] = source_name(provenance.get("source"))  # older outputs held an absolute path
        provenance["healed"] = {"from": source_name(converted_path), "teacher": source_name(original_path),
                                "steps": report.steps, "pooled_cosine": report.after["pooled_cosine"],
                                "output_cosine": report.after["output_cosine"]}
        student.config.normswap = provenance
        student.config.save_pretrained(folder)
        for code in converted_path.glob("modeling_normswap_*.py"):
            shutil.copy2(code, folder / code.name)
        if (converted_path / CARRIED_FILE).is_file():
            shutil.copy2(converted_path / CARRIED_FILE, folder / CARRIED_FILE)
        copy_support_files(converted_path, folder)
        pin_tokenizer_class(original_path, folder)
        conversion = _previous_report(converted_path)
        (folder / REPORT_FILE).write_text(json.dumps(finite_for_json(
            {**conversion, "normswap": provenance, "heal": report.to_dict()}), indent=2, allow_nan=False))
        (folder / "README.md").write_text(heal_card(
            destination_path.name, provenance, report.summary(), not list(folder.glob("modeling_normswap_*.py")),
            read_source_card(original_path), identify_source(original_path).hub_id), encoding="utf-8")
        if plot:
            plot_drift(report, folder / PLOT_FILE)


def _refuse_if_spent(started: float, max_time: float | None) -> None:
    """A budget that loading alone has spent is refused at once, not after loading the rest."""
    elapsed = budget.now() - started
    if max_time is not None and elapsed >= max_time:
        raise budget.BudgetError(f"--max-time {max_time:g} s was spent on loading alone ({elapsed:.1f} s so far); "
                                 "give a larger --max-time")


def _previous_report(converted: Path) -> dict[str, Any]:
    try:
        return json.loads((converted / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
