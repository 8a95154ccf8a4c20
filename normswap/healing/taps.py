"""Which teacher activation each student activation should equal, read off the two detected topologies.

Both layouts have one norm sequence per stack (docs/design.md §3): entry k is what branch k reads, entry S
is the stack's output. Entry k's norm *output* must match across the two models (what each branch
reads, and the final hidden state); the norm *input* is the residual stream there. For the closed-form
warm start we also need, per sublayer, the student's branch output projection (its writer).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..conversion.norm_kind import linear_calls
from ..conversion.plan import norm_sequence
from ..conversion.read_maps import ReadMap, branch_read_maps
from ..detect import inspect
from ..detect.norms import is_norm_stand_in
from ..errors import NormswapError
from ..topology import Topology


@dataclass(frozen=True)
class EntryPair:
    """Entry ``index`` of one stack's norm sequence, in both models."""

    stack: str
    index: int
    teacher: str  # norm module path in the teacher
    student: str  # norm module path in the student
    student_kind: str  # the student norm's kind: LayerNorm targets may shift, RMSNorm ones only scale


@dataclass(frozen=True)
class WriterSite:
    """A student sublayer's output projection, and the entry its result must reach (the next one)."""

    stack: str
    sublayer: int
    path: str
    next_entry: EntryPair
    teacher_path: str | None = None  # the same sublayer's output projection in the teacher, when it has one


@dataclass(frozen=True)
class Correspondence:
    entries: tuple[EntryPair, ...]
    writers: tuple[WriterSite, ...]
    read_maps: Mapping[str, ReadMap] = field(default_factory=dict)  # student entry -> onto the teacher's terms
    topology: Topology | None = None  # the student's, as detected: where LoRA healing finds its branch projections

    def final_entries(self) -> tuple[EntryPair, ...]:
        """The last entry of each stack: the stack's output."""
        last: dict[str, EntryPair] = {}
        for entry in self.entries:
            last[entry.stack] = entry
        return tuple(last.values())


def correspond(teacher: nn.Module, student: nn.Module) -> Correspondence:
    """Pair the two models' norm sequences entry by entry, and find the student's branch writers; where the
    conversion folded a pre norm's ``g / s`` into its readers, the student's read goes through it (``read_maps``)."""
    teacher_topology, student_topology = inspect(teacher), inspect(student)
    paired = _pair(teacher, student, teacher_topology, student_topology)
    folded = branch_read_maps(teacher, teacher_topology, student)
    maps = {entry.student: folded[path] for entry in paired.entries
            if (path := entry.teacher.removesuffix(INPUT)) in folded}
    return replace(paired, read_maps=maps, topology=student_topology)


def _pair(teacher: nn.Module, student: nn.Module, teacher_topology: Topology,
          student_topology: Topology) -> Correspondence:
    if len(teacher_topology.stacks) != len(student_topology.stacks):
        raise NormswapError(f"the teacher ({teacher_topology.model_type}) and the student "
                            f"({student_topology.model_type}) have different layer stacks; heal a model with "
                            "the checkpoint it was converted from")
    _require_one_width(teacher_topology, student_topology)
    if not student_topology.all_norms:  # norm-free (--norm none, dyt): the modules in the norms' places
        return _same_places(teacher_topology, student)
    if {_placement(teacher_topology), _placement(student_topology)} - {"pre", "post"}:
        return _branch_reads(teacher_topology, student_topology)
    calls, _ = linear_calls(student, ())
    teacher_calls, _ = linear_calls(teacher, ())
    entries: list[EntryPair] = []
    writers: list[WriterSite] = []
    for teacher_stack, student_stack in zip(teacher_topology.stacks, student_topology.stacks, strict=True):
        teacher_sequence = norm_sequence(teacher_stack, _sublayers(teacher_topology, teacher_stack.path),
                                         _placement(teacher_topology))
        student_subs = _sublayers(student_topology, student_stack.path)
        student_sequence = norm_sequence(student_stack, student_subs, _placement(student_topology))
        if len(teacher_sequence) != len(student_sequence):
            raise NormswapError(f"{teacher_stack.path} has {len(teacher_sequence) - 1} sublayers in the teacher and "
                                f"{len(student_sequence) - 1} in the student; they must be the same model")
        pairs: dict[int, EntryPair] = {}
        for index, ((_, teacher_norms), (_, student_norms)) in enumerate(zip(teacher_sequence, student_sequence,
                                                                              strict=True)):
            if teacher_norms and student_norms:
                pairs[index] = EntryPair(student_stack.path, index, teacher_norms[0].path, student_norms[0].path,
                                         student_norms[0].kind)
        entries.extend(pairs.values())
        teacher_subs = _sublayers(teacher_topology, teacher_stack.path)
        for index, sub in enumerate(student_subs):
            if len(sub.branches) != 1 or index + 1 not in pairs:
                continue
            inside = _branch_linears(calls, sub)
            if inside:
                teacher_sub = teacher_subs[index] if index < len(teacher_subs) else None
                teacher_inside = _branch_linears(teacher_calls, teacher_sub) if teacher_sub is not None else []
                writers.append(WriterSite(student_stack.path, index, inside[-1], pairs[index + 1],
                                          teacher_inside[-1] if teacher_inside else None))
    if not entries:
        raise NormswapError("the teacher and the student share no norm positions to match")
    return Correspondence(tuple(entries), tuple(writers))


def _branch_reads(teacher: Topology, student: Topology) -> Correspondence:
    """Sandwich and post-sublayer layouts have no one norm per entry (a branch may read the raw stream, or a norm
    sits on its output), so the pairs are what each branch reads, taken at the input of the module the branch
    runs first (``path:in``), and each stack's output, the final norm's, where both have one (else the last
    branch's input stands in as the deepest match)."""
    entries: list[EntryPair] = []
    for teacher_stack, student_stack in zip(teacher.stacks, student.stacks, strict=True):
        teacher_subs, student_subs = _sublayers(teacher, teacher_stack.path), _sublayers(student, student_stack.path)
        if len(teacher_subs) != len(student_subs):
            raise NormswapError(f"{teacher_stack.path} has {len(teacher_subs)} sublayers in the teacher and "
                                f"{len(student_subs)} in the student; they must be the same model")
        for index, (teacher_sub, student_sub) in enumerate(zip(teacher_subs, student_subs, strict=True)):
            teacher_entry, student_entry = teacher_sub.branches[0].entry, student_sub.branches[0].entry
            if teacher_entry and student_entry:
                entries.append(EntryPair(student_stack.path, index, f"{teacher_entry}{INPUT}",
                                         f"{student_entry}{INPUT}", "branch input"))
        if teacher_stack.final_norm and student_stack.final_norm:
            entries.append(EntryPair(student_stack.path, len(student_subs), teacher_stack.final_norm.path,
                                     student_stack.final_norm.path, student_stack.final_norm.kind))
    if not entries:
        raise NormswapError("the teacher and the student share no branch inputs to match")
    return Correspondence(tuple(entries), ())


def _require_one_width(teacher: Topology, student: Topology) -> None:
    """Healing matches what each branch reads in both models, which needs one stream width: an exact LayerNorm
    conversion's extra dimension carries the stream rotated, with the norm weights moved into the readers."""
    for teacher_stack, student_stack in zip(teacher.stacks, student.stacks, strict=True):
        if teacher_stack.width and student_stack.width and teacher_stack.width != student_stack.width:
            raise NormswapError(
                f"the student's {student_stack.path} is {student_stack.width} wide and the teacher's "
                f"{teacher_stack.width} (--norm layernorm --exact adds a dimension), so what their branches read "
                "cannot be matched; heal the inexact pass alone (convert with --placement only, heal, then "
                "--norm layernorm --exact, which is exact and needs no healing)")


def _same_places(teacher: Topology, student: nn.Module) -> Correspondence:
    """Each teacher residual norm paired with what a norm-free student runs in its place: the stand-in or DyT
    module at the same path, whose output is what the teacher's norm hands on (a branch's input, a stack's output).
    Every residual norm is an entry, in stream order, so a stack's last one is its output."""
    entries: list[EntryPair] = []
    for stack in teacher.stacks:
        layers = [norm for layer in teacher.layers if layer.stack == stack.path
                  for sub in layer.sublayers for norm in sub.norms]
        norms = [norm for norm in (stack.embedding_norm, *layers, stack.final_norm)
                 if norm is not None and norm.kind != "identity"]
        for norm in norms:
            module = _submodule(student, norm.path)
            if module is not None and is_norm_stand_in(module):
                entries.append(EntryPair(stack.path, len(entries), norm.path, norm.path, type(module).__name__))
    if not entries:
        raise NormswapError("the student has no norms, and nothing of normswap's stands where the teacher's norms "
                            "are: heal a model with the checkpoint it was converted from")
    return Correspondence(tuple(entries), ())


def _submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _branch_linears(calls: list[str], sub: Any) -> list[str]:
    """The linear layers a single-branch sublayer calls, in call order (the last writes the branch's output)."""
    if len(sub.branches) != 1:
        return []
    return [p for p in calls if any(p == m or p.startswith(m + ".") for m in sub.branches[0].modules)]


def _sublayers(topology: Topology, stack: str) -> list[Any]:
    return [sub for layer in topology.layers if layer.stack == stack for sub in layer.sublayers]


def _placement(topology: Topology) -> str:
    return "pre" if topology.placement == "parallel" else topology.placement


INPUT = ":in"  # a tap at a module's input (what a branch reads), not its output


def tap(model: nn.Module, path: str, found: dict[str, Any], key: str) -> Any:
    """Record, under ``key``, the output of the module at ``path``, or its first tensor input for ``path:in``."""
    if path.endswith(INPUT):
        def input_hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            found[key] = next((value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)), None)
        return model.get_submodule(path.removesuffix(INPUT)).register_forward_pre_hook(input_hook, with_kwargs=True)

    def output_hook(_m: nn.Module, _args: tuple, output: Any) -> None:
        found[key] = output[0] if isinstance(output, tuple) else output
    return model.get_submodule(path).register_forward_hook(output_hook)


@contextmanager
def capture(model: nn.Module, norms: dict[str, str], linears: tuple[str, ...] = (),
            keep_inputs: bool = False) -> Iterator[dict[str, Any]]:
    """Record norm outputs (and inputs with ``keep_inputs``) by key, and linear inputs/outputs by path."""
    found: dict[str, Any] = {}
    handles = []
    for key, path in norms.items():
        if path.endswith(INPUT):
            handles.append(tap(model, path, found, key))
            continue

        def norm_hook(_m: nn.Module, args: tuple, output: Any, key: str = key) -> None:
            found[key] = output[0] if isinstance(output, tuple) else output
            if keep_inputs:
                found[f"{key}:in"] = args[0]
        handles.append(model.get_submodule(path).register_forward_hook(norm_hook))
    for path in linears:
        def linear_hook(_m: nn.Module, args: tuple, output: torch.Tensor, path: str = path) -> None:
            found[f"{path}:in"] = args[0]
            found[f"{path}:out"] = output
        handles.append(model.get_submodule(path).register_forward_hook(linear_hook))
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()
