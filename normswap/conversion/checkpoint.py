"""``normswap convert SRC DST``: load a checkpoint, convert it, verify it, write it atomically."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..corpus import default_corpus, read_corpus
from ..detect.source import load_config
from ..errors import NormswapError, SourceError
from ..io.destination import atomic_output, check_destination
from ..io.model_card import model_card
from ..io.support_files import copy_support_files
from .api import plan_conversion, provenance, realise
from .norm_change import convert_norm_kind
from .verify import measure_drift, probe_inputs

CARRIED_FILE = "normswap_carried.safetensors"
REPORT_FILE = "normswap_report.json"


@dataclass(frozen=True)
class ConversionResult:
    """What ``convert_checkpoint`` did: the plan, the report, and where it wrote (None for a no-op)."""

    plan: Any  # ConversionPlan (placement) or NormKindPlan (norm kind)
    report: Any  # DriftReport (inexact) or ExactnessReport (exact); None for a no-op
    destination: Path | None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan.to_dict(),
            "report": self.report.to_dict() if self.report else None,
            "destination": str(self.destination) if self.destination else None,
        }


def convert_checkpoint(source: str | Path, destination: str | Path, placement: str | None = None, *,
                       norm: str | None = None, exact: bool = False, untie: bool = False, native: bool = True,
                       overwrite: bool = False,
                       max_shard_size: str = "5GB", calib: str | Path | None = None,
                       trust_remote_code: bool = False) -> ConversionResult:
    """Convert the checkpoint folder ``source`` to ``placement`` or ``norm`` and write it to ``destination``."""
    if (placement is None) == (norm is None):
        raise NormswapError("pass exactly one of --placement and --norm (combining them is not supported yet)")
    source_path, destination_path = Path(source), Path(destination)
    config = load_config(source_path, trust_remote_code)
    if not source_path.is_dir():
        raise SourceError(f"{source_path} is a file; convert needs the checkpoint folder (config.json and weights)")
    check_destination(source_path, destination_path, overwrite)
    texts = read_corpus(calib) if calib else None

    model = _load_model(source_path, config, trust_remote_code)

    def probe() -> dict[str, torch.Tensor]:  # the tokenizer is loaded only when something will be converted
        return probe_inputs(model, texts or default_corpus(), _load_tokenizer(source_path))

    if norm is not None:
        converted, plan, report, generated = convert_norm_kind(model, norm, exact=exact, untie=untie, inputs=probe())
    else:
        setup = plan_conversion(model, placement or "", native)
        if setup.plan.noop:
            return ConversionResult(setup.plan, None, None, setup.plan.notes[0])
        converted = realise(model, setup)
        plan, generated = setup.plan, setup.generated
        report = measure_drift(model, converted, setup.source, setup.target, probe(), exact=plan.exact)
        converted.config.normswap = provenance(model, plan, str(source_path.resolve()))
    converted.config.normswap["source"] = str(source_path.resolve())
    _write(destination_path, overwrite, source_path, converted, generated, plan, report, max_shard_size)
    return ConversionResult(plan, report, destination_path.resolve())


def _write(destination: Path, overwrite: bool, source: Path, converted: nn.Module, generated: Any, plan: Any,
           report: Any, max_shard_size: str) -> None:
    """Weights, config, carried norms, support files, generated code, report and card, atomically."""
    with atomic_output(destination, overwrite) as folder:
        converted.save_pretrained(folder, max_shard_size=max_shard_size)
        carried = getattr(converted, "normswap_carried", None)
        if carried:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in carried.items()}, str(folder / CARRIED_FILE),
                      metadata={"normswap": "norm tensors the target layout has no slot for, kept for round trips"})
        copy_support_files(source, folder)
        if generated is not None:
            (folder / generated.file_name).write_text(generated.source, encoding="utf-8")
        (folder / REPORT_FILE).write_text(json.dumps(
            {"normswap": converted.config.normswap, "plan": plan.to_dict(), **report.to_dict()}, indent=2))
        (folder / "README.md").write_text(model_card(destination.name, converted.config.normswap, plan.describe(),
                                                     report.summary(), loads_natively=generated is None))


def _load_model(source: Path, config: Any, trust_remote_code: bool) -> nn.Module:
    """The checkpoint's own architecture: its stock class, or for custom code the Auto class ``auto_map`` names.

    A checkpoint with custom code (``auto_map``, e.g. normswap-generated) is never loaded into the stock
    class of the same name; ``load_config`` has already refused it without ``trust_remote_code``.
    """
    import transformers
    from transformers.utils import logging as hf_logging

    architectures = getattr(config, "architectures", None) or []
    auto_map = getattr(config, "auto_map", None) or {}
    if auto_map:
        wanted = architectures[0] if architectures else None
        auto_name = next((name for name, target in auto_map.items() if name != "AutoConfig"
                          and (wanted is None or target.rsplit(".", 1)[-1] == wanted)), "AutoModel")
        cls = getattr(transformers, auto_name)
    else:
        cls = getattr(transformers, architectures[0], None) if architectures else None
        cls = cls or transformers.AutoModel
    hf_logging.disable_progress_bar()
    try:
        model = cls.from_pretrained(source, dtype="auto", trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise SourceError(f"cannot load the weights in {source}: {str(error).splitlines()[0]} Point SRC at a "
                          "checkpoint folder with its weights (model.safetensors, sharded or not)") from error
    finally:
        hf_logging.enable_progress_bar()
    model.eval()
    carried = source / CARRIED_FILE
    if carried.is_file():
        from safetensors.torch import load_file

        model.normswap_carried = load_file(str(carried))
    return model


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model")


def _load_tokenizer(source: Path) -> Any | None:
    """The checkpoint's own tokenizer, or None (probes then use fixed random token ids)."""
    from transformers import AutoTokenizer

    if not any((source / name).is_file() for name in _TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def tensors_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Bit-identical tensor dicts: same keys, dtypes and bits."""
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
