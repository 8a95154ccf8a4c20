"""A checkpoint folder's weights, listed up front and read one tensor at a time.

Handles ``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``, and legacy
``pytorch_model.bin`` (sharded or not), which is only ever read with ``torch.load(weights_only=True)``.
Names are matched to the model's own state-dict keys (tied weights, a missing or extra base-model
prefix, legacy ``gamma``/``beta`` names, transformers' renamings, and tensors transformers fuses from
per-expert ones: ``fused_tensors``), and every tensor's shape is checked against the model that
config.json describes before any conversion work starts.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import SourceError
from .fused_tensors import FusedTensor, loading_conversions
from .safetensors_file import TensorEntry, read_bytes, read_header, tensor_from_bytes
from .shard_names import is_plain_shard_name

logger = logging.getLogger("normswap")

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_SAFETENSORS = "model.safetensors"
_BIN_INDEX = "pytorch_model.bin.index.json"
_BIN = "pytorch_model.bin"


@dataclass(frozen=True)
class SourceTensor:
    """One checkpoint tensor: its name in the file, dtype, shape and bytes."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    entry: TensorEntry | None  # None for tensors in a .bin pickle

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class CheckpointWeights:
    """The tensors of one checkpoint folder, by their names in the files, and the fused tensors ``add_fused``
    names (listed among ``tensors`` with no ``entry``: built from their parts when read). A tensor transformers
    re-lays out under its own name (Qwen3-VL-MoE's experts, transposed) is listed as the model has it, and
    read from the file's tensor of that name (kept in ``stored``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.tensors: dict[str, SourceTensor] = {}
        self.stored: dict[str, SourceTensor] = {}  # the files' own tensors, as they are in the files
        self.fused: dict[str, FusedTensor] = {}
        self._pickles: dict[Path, dict[str, torch.Tensor]] = {}
        files = self._weight_files()
        for file in files:
            self._list(file)
        self._check_index(files)

    @property
    def total_bytes(self) -> int:
        """The bytes stored in the files (a fused tensor's are its parts')."""
        return sum(tensor.nbytes for tensor in self.stored.values())

    def read(self, name: str) -> torch.Tensor:
        if name in self.fused:
            return self.fused[name].build(self._read_stored)
        return self._read_stored(name)

    def _read_stored(self, name: str) -> torch.Tensor:
        tensor = self.stored[name]
        if tensor.entry is None:
            return self._pickles[tensor.file][name]
        return tensor_from_bytes(read_bytes(tensor.entry), tensor.dtype, tensor.shape)

    def add_fused(self, fused: FusedTensor) -> None:
        """List ``fused`` under its model-side name, with the dtype and shape transformers' operations give it."""
        relaid = fused.parts == (fused.name,)  # Qwen3-VL-MoE: the same name, transposed while loading
        if fused.name in self.tensors and not relaid:
            raise SourceError(f"the checkpoint in {self.folder} holds {fused.name!r} both as one tensor and as the "
                              f"parts transformers fuses into it ({fused.parts[0]!r} and others); keep one of them")
        parts = {name: (self.stored[name].dtype, self.stored[name].shape) for name in fused.parts}
        dtype, shape = fused.describe(parts)
        self.tensors[fused.name] = SourceTensor(fused.name, self.stored[fused.parts[0]].file, dtype, shape, None)
        self.fused[fused.name] = fused

    def _weight_files(self) -> list[Path]:
        for index_name, single in ((_SAFETENSORS_INDEX, _SAFETENSORS), (_BIN_INDEX, _BIN)):
            index = self.folder / index_name
            if index.is_file():
                self._index = self._read_index(index)
                files = sorted(set(self._index.values()))
                for name in files:
                    if not (self.folder / name).is_file():
                        tensor = next(k for k, v in self._index.items() if v == name)
                        raise SourceError(f"{index} names the shard {name} (for {tensor!r} and others) but "
                                          f"{self.folder / name} is missing; copy the missing shard into the folder")
                return [self.folder / name for name in files]
            if (self.folder / single).is_file():
                self._index = {}
                return [self.folder / single]
        found = ", ".join(sorted(p.name for p in self.folder.iterdir())[:8])
        raise SourceError(f"{self.folder} has no weights (found: {found}); expected model.safetensors, "
                          "model.safetensors.index.json with its shards, or pytorch_model.bin")

    def _read_index(self, index: Path) -> dict[str, str]:
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            weight_map = data["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, RecursionError) as error:
            raise SourceError(f"{index} is not a valid index ({type(error).__name__}: {error}); it needs a "
                              "'weight_map' object of tensor name -> shard file") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise SourceError(f"{index}: 'weight_map' must map tensor names to shard file names")
        suffix = ".safetensors" if index.name == _SAFETENSORS_INDEX else ".bin"
        for tensor, shard in weight_map.items():
            if not is_plain_shard_name(shard, suffix):
                raise SourceError(f"{index} names the shard {shard!r} for {tensor!r}, which is not a plain "
                                  f"*{suffix} file name in the checkpoint folder; normswap reads shards only from "
                                  "SRC itself: fix the index")
        return weight_map

    def _check_index(self, files: list[Path]) -> None:
        for name, shard in self._index.items():
            if name not in self.tensors:
                raise SourceError(f"{self.folder / _index_name(files)} says {name!r} is in {shard}, but that shard "
                                  "has no such tensor; regenerate the index or re-copy the shard")

    def _list(self, file: Path) -> None:
        if file.suffix == ".safetensors":
            for name, entry in read_header(file).items():
                self.stored[name] = self.tensors[name] = SourceTensor(name, file, entry.dtype, entry.shape, entry)
            return
        state = load_pickled_weights(file)
        self._pickles[file] = state
        for name, tensor in state.items():
            self.stored[name] = self.tensors[name] = SourceTensor(name, file, tensor.dtype, tuple(tensor.shape),
                                                                  None)


def _index_name(files: list[Path]) -> str:
    return _SAFETENSORS_INDEX if files and files[0].suffix == ".safetensors" else _BIN_INDEX


def load_pickled_weights(file: Path) -> dict[str, torch.Tensor]:
    """A legacy ``.bin`` state dict, read with ``weights_only=True`` (never arbitrary pickled code).

    Zip-format files are memory-mapped, so their tensors are paged in only as they are read.
    """
    try:
        mmap = zipfile.is_zipfile(file)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # pickle-protocol chatter; failures raise below
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else "not a pickle"
        raise SourceError(f"{file} is not a PyTorch state dict normswap can read safely ({first[:160]}); "
                          "re-save it with torch.save(model.state_dict()) or as safetensors") from None
    except Exception as error:  # noqa: BLE001 - garbage makes torch.load fail with no common exception type
        raise SourceError(f"{file} is not a PyTorch zip/pickle file ({type(error).__name__}: "
                          f"{str(error).splitlines()[0][:160] if str(error) else 'unreadable'}); re-download it or "
                          "re-save it with torch.save") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SourceError(f"{file} holds a {type(state).__name__}, not a state dict of tensors; re-save it with "
                          "torch.save(model.state_dict())")
    return dict(state)


def match_names(weights: CheckpointWeights, expected: Mapping[str, torch.Size], tied: Mapping[str, tuple[str, ...]],
                prefix: str, renamed: Mapping[str, str | FusedTensor] | None = None) -> dict[str, str]:
    """For each of the model's state-dict keys, the checkpoint tensor that holds it.

    ``tied`` maps a tied key to the keys it shares storage with (only one of them is saved); ``prefix``
    is the model's base-model prefix, which checkpoints saved from a bare model lack; ``renamed`` maps
    model-side names to checkpoint names for families whose saved names differ (transformers' renamings),
    or to the ``FusedTensor`` transformers builds for them (per-expert tensors), which is then added to
    ``weights`` under the model-side name. Missing tensors and shapes that disagree with the config are
    errors; unused ones are a warning.
    """
    renamed = renamed or {}
    names: dict[str, Any] = {**weights.tensors, **{new: old if isinstance(old, FusedTensor) else weights.tensors[old]
                                                   for new, old in renamed.items()}}
    found: dict[str, str] = {}
    for key in expected:
        candidates = [key, *tied.get(key, ())]
        match = next((name for candidate in candidates for name in spellings(candidate, prefix) if name in names),
                     None)
        if match is None:
            example = next(iter(names), "nothing")
            raise SourceError(f"the checkpoint in {weights.folder} has no tensor {key!r} (it has {len(names)} "
                              f"tensors, e.g. {example!r}); the weights do not belong to this config.json, or a "
                              "shard or index entry is missing")
        source = renamed.get(match, match)
        if isinstance(source, FusedTensor):
            if source.name not in weights.fused:
                weights.add_fused(source)
            source = source.name
        found[key] = source
    names = weights.tensors
    for key, name in found.items():
        shape = tuple(names[name].shape)
        if shape != tuple(expected[key]):
            fused = weights.fused.get(name)
            parts = f" (fused from {len(fused.parts)} tensors, e.g. {fused.parts[0]!r})" if fused else ""
            raise SourceError(f"{names[name].file.name}: tensor {name!r}{parts} has shape {shape} but config.json "
                              f"implies {tuple(expected[key])}; the config does not match the weights (fix "
                              "config.json or use the matching checkpoint)")
    used = set(found.values()) | {part for name in found.values() if name in weights.fused
                                  for part in weights.fused[name].parts}
    unused = sorted(set(weights.tensors) - used)
    if unused:
        logger.warning("ignoring %d checkpoint tensor(s) the model does not use: %s%s", len(unused),
                       ", ".join(unused[:4]), "..." if len(unused) > 4 else "")
    return found


def spellings(key: str, prefix: str) -> list[str]:
    """The names a key may have in older or bare-model checkpoints."""
    forms = [key]
    if prefix:
        forms += [key.removeprefix(f"{prefix}.")] if key.startswith(f"{prefix}.") else [f"{prefix}.{key}"]
    legacy = []
    for form in forms:
        if form.endswith(".weight"):
            legacy.append(form.removesuffix(".weight") + ".gamma")
        elif form.endswith(".bias"):
            legacy.append(form.removesuffix(".bias") + ".beta")
    return forms + legacy


def tied_keys(model: Any) -> dict[str, tuple[str, ...]]:
    """For each state-dict key that shares its tensor with others, those other keys."""
    groups: dict[int, list[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(key)
    return {key: tuple(k for k in group if k != key) for group in groups.values() if len(group) > 1
            for key in group}


def transformers_renamings(model: Any, names: Iterable[str]) -> dict[str, str | FusedTensor]:
    """Model-side names of checkpoint tensors that transformers renames while loading (``embed_out`` ->
    ``lm_head``), or of the tensors it fuses from several (per-expert weights into ``experts.gate_up_proj``),
    for ``match_names``."""
    return loading_conversions(model, names)
