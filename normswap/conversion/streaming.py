"""Carry out a planned conversion tensor by tensor, from checkpoint files to output shards.

Memory stays at a few tensors: each output tensor is computed from the source tensors its step
reads (kept in a small cache, so a bias fold that reads its layer's weight does not read it twice),
written to its shard and dropped. Plain copies pass their bytes straight through.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import NormswapError
from ..io.shard_writer import FileRange, PlannedTensor, ShardLayout, ShardWriter, write_small
from ..io.source_weights import CheckpointWeights
from .finite import require_finite
from .program import Step, TensorProgram, run_step, settle

_CACHED_MATRICES = 3


@dataclass(frozen=True)
class StreamedOutput:
    """What a streamed conversion wrote."""

    shard_files: tuple[str, ...]
    tensors: int
    bytes_written: int  # computed or copied here; mirrored bytes already in place are not counted
    carried: tuple[str, ...]
    reused_bytes: int = 0  # the mirrored bytes already in place (``layout.in_place``)


class SourceReader:
    """Source tensors by the model's key names, with a small cache and NaN/Inf checks where arithmetic reads."""

    def __init__(self, weights: CheckpointWeights, names: Mapping[str, str], checked: frozenset[str],
                 dtype: torch.dtype | None = None) -> None:
        self.weights = weights
        self.names = names
        self.checked = checked
        self.dtype = dtype  # --dtype: floating tensors are read in the output dtype, so arithmetic rounds once
        self._vectors: dict[str, torch.Tensor] = {}
        self._matrices: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._verified: set[str] = set()

    def __call__(self, key: str) -> torch.Tensor:
        name = self.names[key]
        if name in self._vectors:
            return self._vectors[name]
        if name in self._matrices:
            self._matrices.move_to_end(name)
            return self._matrices[name]
        tensor = self.weights.read(name)
        if key in self.checked and name not in self._verified:
            require_finite(tensor, name, self.weights.tensors[name].file)
            self._verified.add(name)
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        if tensor.dim() <= 1:
            self._vectors[name] = tensor
        else:
            self._matrices[name] = tensor
            while len(self._matrices) > _CACHED_MATRICES:
                self._matrices.popitem(last=False)
        return tensor


def planned_outputs(program: TensorProgram, order: list[str], target_shapes: Mapping[str, torch.Size],
                    weights: CheckpointWeights, names: Mapping[str, str], default_dtype: torch.dtype,
                    dtype: torch.dtype | None) -> list[PlannedTensor]:
    """Name, dtype and shape of every output tensor, in writing order, before any is computed.

    A tensor keeps the dtype of the first source tensor its step reads (constants take the checkpoint's
    dtype); ``dtype`` overrides every floating-point tensor.
    """
    planned = []
    for key in order:
        step = program.outputs[key]
        found = weights.tensors[names[step.reads[0]]].dtype if step.reads else default_dtype
        if dtype is not None and found.is_floating_point:
            found = dtype
        planned.append(PlannedTensor(key, found, tuple(target_shapes[key])))
    return planned


def stream_program(program: TensorProgram, planned: list[PlannedTensor], weights: CheckpointWeights,
                   names: Mapping[str, str], folder: Path, max_shard_bytes: int, carried_file: str,
                   default_dtype: torch.dtype, *, dtype: torch.dtype | None = None, allow_nonfinite: bool = False,
                   progress: bool = True, layout: ShardLayout | None = None) -> StreamedOutput:
    """Compute and write every planned output tensor, then the carried norms. With a ``layout`` from
    ``mirror_layout``, the tensors it has in place are already written."""
    from tqdm.auto import tqdm

    vectors = frozenset(key for key, name in names.items() if len(weights.tensors[name].shape) <= 1)
    checked = frozenset() if allow_nonfinite else program.touched_reads() | vectors
    read = SourceReader(weights, names, checked, dtype)
    for key in sorted(checked & vectors):  # norm weights and biases, even where they are only moved
        read(key)
    for check in program.checks:
        run_step(check, read)
    total = sum(t.nbytes for t in planned)
    written = 0
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="converting", delay=2.0,
              disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar, \
            ShardWriter(folder, planned, max_shard_bytes, on_written=bar.update, layout=layout) as writer:
        in_place = layout.in_place if layout is not None else frozenset()
        reused = sum(tensor.nbytes for tensor in planned if tensor.name in in_place)
        bar.update(reused)
        for done, tensor in enumerate(planned, 1):
            if tensor.name not in in_place:
                step = program.outputs[tensor.name]
                written += writer.write(tensor.name, _produce(step, tensor, read, weights, names))
            if done % 16 == 0 or done == len(planned):
                bar.set_postfix_str(f"{done}/{len(planned)} tensors", refresh=False)
        files = writer.close()
    carried = {key: settle(step, run_step(step, read), default_dtype) for key, step in program.carried.items()}
    if carried:
        write_small(folder / carried_file, carried,
                    {"normswap": "norm tensors the target layout has no slot for, kept for round trips"})
    return StreamedOutput(tuple(files), len(planned), written, tuple(carried), reused)


def _produce(step: Step, tensor: PlannedTensor, read: SourceReader, weights: CheckpointWeights,
             names: Mapping[str, str]) -> torch.Tensor | FileRange:
    """An unchanged copy's place in its source file (copied by the kernel), else the computed tensor in the
    planned dtype."""
    if not step.touches and step.reads:
        source = weights.tensors[names[step.reads[0]]]
        if source.dtype == tensor.dtype and source.entry is not None:
            return FileRange(source.file, source.entry.begin, source.entry.nbytes)
    value = run_step(step, read)
    if value.dtype != tensor.dtype:
        if not (value.is_floating_point() and tensor.dtype.is_floating_point):
            raise NormswapError(f"internal: {tensor.name} came out {value.dtype}, planned {tensor.dtype}; "
                                "please report it")
        value = value.to(tensor.dtype)
    return value.contiguous()


def byte_copies(program: TensorProgram, planned: list[PlannedTensor], weights: CheckpointWeights,
                names: Mapping[str, str]) -> tuple[dict[str, str], frozenset[str]]:
    """Each output's source tensor (its first read), and the outputs that are those bytes unchanged."""
    sources: dict[str, str] = {}
    unchanged = set()
    for tensor in planned:
        step = program.outputs[tensor.name]
        if not step.reads:
            continue
        source = names[step.reads[0]]
        sources[tensor.name] = source
        if not step.touches and weights.tensors[source].dtype == tensor.dtype:
            unchanged.add(tensor.name)
    return sources, frozenset(unchanged)
