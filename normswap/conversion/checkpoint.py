"""``normswap convert SRC DST``: load a checkpoint, convert it, verify it, write it atomically."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..corpus import default_corpus, read_corpus
from ..detect.own_code import own_model_class
from ..detect.source import load_config
from ..errors import ExactnessError, NormswapError, SourceError, first_line
from ..failures import printable_path
from ..io.destination import atomic_output, check_destination, require_space
from ..io.mirror import SourceMirror, early_copy
from ..io.mirror_layout import mirror_layout
from ..io.model_card import model_card
from ..io.safetensors_file import read_safetensors_file
from ..io.shard_writer import PlannedTensor, ShardLayout, parse_size
from ..io.source_card import read_source_card
from ..io.source_identity import identify_source
from ..io.source_weights import CheckpointWeights, match_names, tied_keys, transformers_renamings
from ..io.stored_ties import untie_stored_copies
from ..io.support_files import copy_support_files
from ..io.tokenizer_files import pin_tokenizer_class
from ..io.unsaved_keys import unsaved_keys
from .finite import ALLOW_FLAG, finite_for_json, first_nonfinite, nonfinite_error
from .native import meta_instance
from .offload import offload_options, offloaded, require_accelerate
from .program import TensorProgram, shapes_of
from .removed_norm_tensors import with_removed_norm_tensors
from .route import plan_layout
from .setup import ConversionSetup, provenance
from .streaming import byte_copies, planned_outputs, stream_program
from .verify import SkippedVerification, probe_inputs
from .written_layout import as_written

logger = logging.getLogger("normswap")

CARRIED_FILE = "normswap_carried.safetensors"
REPORT_FILE = "normswap_report.json"
DEFAULT_VERIFY_LIMIT = "1GB"


@dataclass(frozen=True)
class ConversionResult:
    """What ``convert_checkpoint`` did: the plan, the report, and where it wrote (None for a no-op)."""

    plan: Any  # ConversionPlan (placement) or NormKindPlan (norm kind)
    report: Any  # DriftReport (inexact) or ExactnessReport (exact); None for a no-op
    destination: Path | None
    note: str = ""
    seconds: dict[str, float] = field(default_factory=dict)  # planning, writing, verification
    reused_bytes: int = 0  # tensor bytes copied while planning and kept in place (the source's shard layout)

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan.to_dict(),
            "report": finite_for_json(self.report.to_dict()) if self.report else None,
            "destination": str(self.destination) if self.destination else None,
            "seconds": {stage: round(value, 3) for stage, value in self.seconds.items()},
            "reused_bytes": self.reused_bytes,
        }


def convert_checkpoint(source: str | Path, destination: str | Path, placement: str | None = None, *,
                       norm: str | None = None, exact: bool = False, untie: bool = False, native: bool = True,
                       overwrite: bool = False, max_shard_size: str = "5GB", calib: str | Path | None = None,
                       trust_remote_code: bool = False, dtype: str | None = None, allow_nonfinite: bool = False,
                       progress: bool = False, verify_max_size: str = DEFAULT_VERIFY_LIMIT,
                       verify_offloaded: bool = False, mirror: SourceMirror | None = None,
                       calibrate: bool = True, keep_stream_size: bool = False,
                       only: tuple[str, ...] = ()) -> ConversionResult:
    """Convert the checkpoint folder ``source`` to ``placement`` or ``norm``, streamed, into ``destination``.

    Planning reads config.json only; the weights are then read one tensor at a time and written to
    shards as they fill, so memory stays at a few tensors. Models up to ``verify_max_size`` of weights
    are then loaded and verified against the original (drift report or exactness check). Larger ones are
    verified with their weights left on disk and read one module at a time (``verify_offloaded``, which
    needs accelerate; slow: every weight is read again for each forward pass), or not at all, and the
    report says so.

    The source shards' bytes are copied to the output while planning (``mirror``; started here unless the
    caller, the CLI, started it before importing torch), and the output keeps the source's shard layout when
    it can, writing only the tensors that change; the caller discards a mirror it passed.

    ``calibrate=False`` starts every norm a conversion removes, adds or rescales at unit scale instead of the
    source's measured one: no forward pass before writing, so a conversion of any size streams without
    ``verify_offloaded`` (the naive start, further from the original). ``keep_stream_size`` and ``only``: as
    ``convert``'s.
    """
    if placement is None and norm is None:
        raise NormswapError("pass --placement, --norm or both")
    started = time.monotonic()
    source_path, destination_path = Path(source), Path(destination)
    with early_copy(source_path, destination_path, overwrite, norm, exact, dtype, given=mirror) as mirror:
        seconds: dict[str, float] = {}
        if source_path.exists() and not source_path.is_dir():  # config.json or a weights file: name the folder
            raise SourceError(f"{source_path} is a file; convert needs the checkpoint folder that holds config.json "
                              f"and the weights: pass {printable_path(source_path.parent)}")
        config = load_config(source_path, trust_remote_code)
        check_destination(source_path, destination_path, overwrite)
        output_dtype = parse_dtype(dtype)
        verify_limit = parse_size(verify_max_size)
        shard_bytes = parse_size(max_shard_size)
        texts = read_corpus(calib) if calib else None
        weights = CheckpointWeights(source_path)
        meta = meta_model(config, trust_remote_code)
        untie_stored_copies(meta, weights)  # T5 v1.1's lm_head, stored apart from shared: loading unties it
        carried_path = source_path / CARRIED_FILE
        if carried_path.is_file():
            meta.normswap_carried = read_safetensors_file(carried_path)
        meta.normswap_source_tensor = weights.read  # a plan may read a vector (return_home.py: a trained beta)

        setup = _plan(meta, placement, norm, exact, untie, native, keep_stream_size, only)
        if setup.noop:
            return ConversionResult(setup.plan, None, None, setup.plan.notes[0])
        above_limit = weights.total_bytes > verify_limit
        if setup.program is None and not calibrate:
            setup = setup.with_calibration(meta, {}, unit=True)
        if setup.program is None:  # calibrated stand-ins: the source runs once before any tensor is planned
            if above_limit and not verify_offloaded:
                raise NormswapError(
                    f"this conversion calibrates its norms on the source's activations, and its "
                    f"{weights.total_bytes / 1e9:.2f} GB of weights are above the in-memory limit (--verify-max-size "
                    f"{verify_limit / 1e9:.2f} GB): pass --verify-offloaded to run it reading one module at a time "
                    "from disk, raise --verify-max-size, or pass --no-calibration to start those norms at unit "
                    "scale without running the source")
            if above_limit:
                require_accelerate()
            setup = _calibrated(setup, source_path, config, texts, trust_remote_code,
                                destination_path if above_limit else None)
        state_shapes = shapes_of(meta.state_dict())
        unsaved = unsaved_keys(meta, state_shapes, weights.tensors)
        names = match_names(weights, {key: shape for key, shape in state_shapes.items() if key not in unsaved},
                            tied_keys(meta), meta.base_model_prefix, transformers_renamings(meta, weights.tensors))
        default_dtype = checkpoint_dtype(config, weights)
        verify = not above_limit or verify_offloaded
        if above_limit and verify_offloaded:
            require_accelerate()
        seconds["planning"] = time.monotonic() - started
        with atomic_output(destination_path, overwrite) as folder:
            while True:
                stage = time.monotonic()
                setup = _without_unsaved(setup, unsaved)
                program, planned = _plan_outputs(setup, weights, names, default_dtype, output_dtype, unsaved)
                layout = None
                if mirror is not None:
                    layout = _adopt_mirror(mirror, program, planned, weights, names, shard_bytes, folder)
                    mirror = None  # used once: a fallback plan writes its own layout
                require_space(destination_path, sum(t.nbytes for t in planned if layout is None or t.name not in
                                                    layout.in_place))
                output = stream_program(program, planned, weights, names, folder, shard_bytes, CARRIED_FILE,
                                        default_dtype, dtype=output_dtype, allow_nonfinite=allow_nonfinite,
                                        progress=progress, layout=layout)
                _write_config(folder, setup, identify_source(source_path).name, planned,
                              getattr(config, "architectures", None))
                seconds["writing"] = seconds.get("writing", 0.0) + time.monotonic() - stage
                if not verify:
                    report: Any = SkippedVerification(
                        f"not verified: {weights.total_bytes / 1e9:.2f} GB of weights is above the verification limit "
                        f"of {verify_limit / 1e9:.2f} GB (--verify-max-size), where verification would load both "
                        "models in memory; pass --verify-offloaded to verify reading one module at a time from disk")
                    break
                stage = time.monotonic()
                if above_limit and progress:
                    print(f"verifying with the weights offloaded to disk: each forward pass reads all "
                          f"{weights.total_bytes / 1e9:.2f} GB again (--verify-offloaded)", file=sys.stderr)
                try:
                    report = _verify(source_path, config, folder, setup, texts, trust_remote_code,
                                     offload_beside=destination_path if above_limit else None,
                                     allow_nonfinite=allow_nonfinite)
                    break
                except ExactnessError as error:
                    replacement = setup.fallback(error) if setup.fallback is not None else None
                    if replacement is None:
                        raise
                    setup = replacement
                    for leftover in folder.iterdir():
                        leftover.unlink()
                finally:
                    seconds["verification"] = seconds.get("verification", 0.0) + time.monotonic() - stage
            _write_extras(folder, destination_path, source_path, setup, report)
        seconds["total"] = time.monotonic() - started
        return ConversionResult(setup.plan, report, destination_path.resolve(), seconds=seconds,
                                reused_bytes=output.reused_bytes)


def _adopt_mirror(mirror: SourceMirror, program: Any, planned: list[PlannedTensor], weights: CheckpointWeights,
                  names: dict[str, str], shard_bytes: int, folder: Path) -> ShardLayout | None:
    """The mirrored files moved into the output with their layout, or (discarded) None where it does not fit."""
    sources, unchanged = byte_copies(program, planned, weights, names)
    layout = mirror_layout(mirror.wait(), planned, weights, sources, unchanged, shard_bytes)
    if layout is None:
        mirror.discard()
        return None
    mirror.move_into(folder)
    return layout


def _plan(meta: nn.Module, placement: str | None, norm: str | None, exact: bool, untie: bool, native: bool,
          keep_stream_size: bool, only: tuple[str, ...]) -> ConversionSetup:
    return plan_layout(meta, placement, norm, exact=exact, untie=untie, native=native,
                       keep_stream_size=keep_stream_size, only=only)


def _calibrated(setup: ConversionSetup, source: Path, config: Any, texts: list[str] | None, trust_remote_code: bool,
                offload_beside: Path | None) -> ConversionSetup:
    """``setup`` with its program, once the source has run on the calibration text (the same text verification
    uses): in memory, or with its weights left on disk and read one module at a time (``offload_beside``)."""
    with offloaded(offload_beside) if offload_beside else contextlib.nullcontext() as offload:
        original = load_model(source, config, trust_remote_code, offload)
        probe = probe_inputs(original, texts or default_corpus(), load_tokenizer(source, trust_remote_code))
        return setup.with_calibration(original, probe)


def _without_unsaved(setup: ConversionSetup, unsaved: frozenset[str]) -> ConversionSetup:
    """``setup`` without the outputs the family rebuilds on load and never saves; one that the conversion must
    change cannot be left to the family, and is refused."""
    program = setup.program
    if not unsaved or program is None:
        return setup
    outputs = {key: step for key, step in program.outputs.items() if key not in unsaved}
    changed = sorted({key for step in (*outputs.values(), *program.carried.values(), *program.checks)
                      for key in step.reads} & unsaved)
    if changed:
        raise NormswapError(f"{changed[0]} is rebuilt when the model loads and not saved in the checkpoint, but this "
                            "conversion has to change it")
    return replace(setup, program=replace(program, outputs=outputs))


def _plan_outputs(setup: ConversionSetup, weights: CheckpointWeights, names: dict[str, str],
                  default_dtype: torch.dtype, dtype: torch.dtype | None,
                  unsaved: frozenset[str] = frozenset()) -> tuple[TensorProgram, list[PlannedTensor]]:
    """The program to stream and the converted checkpoint's tensors in the target's state-dict order; tied copies
    are saved once, tensors the family rebuilds on load (``unsaved``) not at all, and those the target's loading
    re-lays out under their own name in the layout it starts from (``as_written``)."""
    assert setup.program is not None
    target = meta_instance(setup.target_class, setup.target_config)
    program = with_removed_norm_tensors(setup.program, target)
    target_shapes = shapes_of(target.state_dict())
    tied = tied_keys(target)
    position = {key: index for index, key in enumerate(target_shapes)}
    order = [key for key in target_shapes if key not in unsaved
             and not any(position.get(twin, len(position)) < position[key] for twin in tied.get(key, ()))]
    missing = [key for key in order if key not in program.outputs]
    extra = [key for key in program.outputs if key not in target_shapes]
    if missing or extra:
        raise NormswapError(f"internal: the conversion makes {extra[:3]} that the target lacks and lacks "
                            f"{missing[:3]}; please report it")
    program, written_shapes = as_written(program, target, order, target_shapes)
    return program, planned_outputs(program, order, written_shapes, weights, names, default_dtype, dtype)


def _write_config(folder: Path, setup: ConversionSetup, source: str, planned: list[PlannedTensor],
                  architectures: list[str] | None = None) -> None:
    config = setup.target_config
    config.normswap = provenance(setup.plan, setup.conversion, source, architectures)
    floating = [t.dtype for t in planned if t.dtype.is_floating_point]
    if floating:
        config.dtype = max(set(floating), key=floating.count)
    config.save_pretrained(folder)
    if setup.generated is not None:
        (folder / setup.generated.file_name).write_text(setup.generated.source, encoding="utf-8")


def _verify(source: Path, config: Any, folder: Path, setup: ConversionSetup, texts: list[str] | None,
            trust_remote_code: bool, offload_beside: Path | None = None, allow_nonfinite: bool = False) -> Any:
    """Load the original and the written checkpoint and run the conversion's own verification.

    With ``offload_beside`` (DST), both stay on disk and each module's weights are read as it runs
    (``offloaded``); the original is then read in the converted model's dtype, as ``.to`` would make it.
    Either way, the fp32 reference of a low-precision exactness check is the source read again in fp32.
    """
    assert setup.verify is not None
    with offloaded(offload_beside) if offload_beside else contextlib.nullcontext() as offload:
        converted = _load_converted(folder, setup, offload)
        if offload is None:
            original = load_model(source, config, trust_remote_code)
            if converted.dtype != original.dtype:
                original = original.to(converted.dtype)
        else:
            original = load_model(source, config, trust_remote_code, offload, converted.dtype)
        if offload is None:  # every tensor, not only those the conversion read (offloaded: those were checked)
            found = first_nonfinite(original.state_dict().items())
            if found is not None and not allow_nonfinite:
                raise nonfinite_error(f"{source}: tensor {found[0]!r}", found[1])
            if found is not None:
                return SkippedVerification(f"not verified: tensor {found[0]!r} of the source holds {found[1]} NaN/Inf "
                                           f"value(s) ({ALLOW_FLAG}), so drift cannot be measured")
        # an exactness bound in bf16/fp16 compares with the source in fp32: read again, in memory or offloaded
        original.normswap_in_fp32 = lambda: load_model(source, config, trust_remote_code, offload, torch.float32)
        probe = probe_inputs(original, texts or default_corpus(), load_tokenizer(source, trust_remote_code))
        return setup.verify(original, converted, probe)


def _load_converted(folder: Path, setup: ConversionSetup, offload: Path | None = None) -> nn.Module:
    """The written checkpoint, loaded by the target class itself (normswap's own generated code or stock)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model = setup.target_class.from_pretrained(folder, dtype="auto", trust_remote_code=False,
                                                   **offload_options(offload))
    finally:
        hf_logging.enable_progress_bar()
    carried = folder / CARRIED_FILE
    if carried.is_file():  # what a folded norm carried: verification compares branch reads through it (read_maps)
        model.normswap_carried = read_safetensors_file(carried)
    return model.eval()


def _write_extras(folder: Path, destination: Path, source: Path, setup: ConversionSetup, report: Any) -> None:
    """Support files (tokenizer, generation config), report and model card (the source's carried along)."""
    support = copy_support_files(source, folder).to_dict()
    pinned = pin_tokenizer_class(source, folder)
    if pinned:
        support["tokenizer_class"] = pinned
    provenance_block = setup.target_config.normswap
    (folder / REPORT_FILE).write_text(json.dumps(finite_for_json(
        {"normswap": provenance_block, "plan": setup.plan.to_dict(), **report.to_dict(),
         "support_files": support}), indent=2, allow_nan=False))
    (folder / "README.md").write_text(model_card(destination.name, provenance_block, setup.plan.describe(),
                                                 report.summary(), loads_natively=setup.generated is None,
                                                 source_card=read_source_card(source),
                                                 base_model=identify_source(source).hub_id), encoding="utf-8")


def model_class(config: Any) -> Any:
    """The class that loads this checkpoint: its architecture, or for custom code the Auto class ``auto_map`` names.

    A checkpoint with custom code (``auto_map``, e.g. normswap-generated) is never loaded into the stock
    class of the same name; ``load_config`` has already refused it without ``trust_remote_code``, unless the
    code is byte for byte normswap's own: then the class is that of normswap's own copy (``own_model_class``).
    """
    import transformers

    architectures = getattr(config, "architectures", None) or []
    auto_map = getattr(config, "auto_map", None) or {}
    if auto_map:
        wanted = architectures[0] if architectures else None
        auto_name = next((name for name, target in auto_map.items() if name != "AutoConfig"
                          and (wanted is None or target.rsplit(".", 1)[-1] == wanted)), "AutoModel")
        return own_model_class(config, auto_name) or getattr(transformers, auto_name)
    cls = getattr(transformers, architectures[0], None) if architectures else None
    return cls or transformers.AutoModel


def meta_model(config: Any, trust_remote_code: bool) -> nn.Module:
    """The checkpoint's model on the meta device: its structure and state-dict keys, no weights."""
    import copy

    cls = model_class(config)
    config = copy.deepcopy(config)
    options = {"experts_implementation": "eager"}  # fused-expert kernels have no meta implementation
    try:
        with torch.device("meta"):
            if cls.__name__.startswith("Auto"):
                model = cls.from_config(config, trust_remote_code=trust_remote_code, **options)
            else:
                model = cls._from_config(config, **options)
    except Exception as error:  # any failure here means the config does not describe a model
        first = str(error).splitlines()[0][:200] if str(error) else ""
        raise SourceError(f"transformers cannot build {cls.__name__} from this config.json "
                          f"({type(error).__name__}: {first}); check the config values") from error
    return model.eval()


def checkpoint_dtype(config: Any, weights: CheckpointWeights) -> torch.dtype:
    """The dtype new tensors (unit norms, placeholders) take: the config's, else the first floating tensor's."""
    declared = getattr(config, "dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    if isinstance(declared, torch.dtype):
        return declared
    return next((t.dtype for t in weights.tensors.values() if t.dtype.is_floating_point), torch.float32)


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``--dtype``: None or "auto" keeps each tensor's own dtype."""
    if name is None or name == "auto":
        return None
    if name not in _DTYPES:
        raise NormswapError(f"--dtype {name!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def load_model(source: Path, config: Any, trust_remote_code: bool, offload: Path | None = None,
               dtype: torch.dtype | None = None) -> nn.Module:
    """The checkpoint loaded in memory (for verification and the in-memory path), or ``offloaded`` to disk."""
    from transformers.utils import logging as hf_logging

    cls = model_class(config)
    hf_logging.disable_progress_bar()
    try:
        model = cls.from_pretrained(source, dtype=dtype or "auto", trust_remote_code=trust_remote_code,
                                    **offload_options(offload))
    except (OSError, ValueError) as error:
        raise SourceError(f"cannot load the weights in {source}: {str(error).splitlines()[0]} Point SRC at a "
                          "checkpoint folder with its weights (model.safetensors, sharded or not)") from error
    finally:
        hf_logging.enable_progress_bar()
    model.eval()
    carried = source / CARRIED_FILE
    if carried.is_file():
        model.normswap_carried = read_safetensors_file(carried)
    return model


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model")


def load_tokenizer(source: Path, trust_remote_code: bool) -> Any | None:
    """The checkpoint's own tokenizer, or None (probes then use fixed random token ids).

    ``trust_remote_code`` is always passed: left unset, transformers asks on a terminal whether to run a
    custom tokenizer's code (``auto_map`` in tokenizer_config.json), and answering yes runs it.
    """
    from transformers import AutoTokenizer

    if not any((source / name).is_file() for name in _TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError, RecursionError) as error:
        logger.warning("the tokenizer in %s did not load (%s); probing with fixed random token ids instead%s",
                       source, first_line(error), "" if trust_remote_code or not _custom_tokenizer(source)
                       else " (it needs custom code: pass --trust-remote-code to run it)")
        return None


def _custom_tokenizer(source: Path) -> bool:
    try:
        return "auto_map" in json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError, RecursionError):
        return False


def tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit-identical tensor dicts: same keys, dtypes and bits."""
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
