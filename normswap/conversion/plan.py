"""The conversion plan: which norm goes to which slot under the norm-shift mapping (docs/design.md §3).

Every branch keeps the normalisation it was trained with. Read a stack's norms as one
sequence of S + 1 entries, S being its number of sublayers:

    Post-Norm:  E,   P_0, P_1, ..., P_{S-1}      (embedding norm, then each sublayer's post norm)
    Pre-Norm:   N_0, N_1, ..., N_{S-1}, Z        (each sublayer's pre norm, then the final norm)

Entry k feeds the same branch in both layouts (branch k reads ``P_{k-1}``'s output in a
Post-Norm model and ``N_k``'s in a Pre-Norm one), so the mapping is entry k -> entry k, both
ways, and branch 0 reads exactly what it read before. Where one layout has a slot the other
lacks (OPT has no embedding norm; mBART has one *and* a final norm), the plan says what is
dropped, what starts as a unit norm, and what that costs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from ..errors import NormswapError
from ..topology import NormSite, Stack, Sublayer, Topology, embedding_norm_stays

Placement = Literal["pre", "post"]


class PlanError(NormswapError):
    """The source and target topologies cannot be matched by the norm-shift mapping."""


@dataclass(frozen=True)
class NormMove:
    """One entry of the norm sequence: where its weights come from and where they go.

    ``source`` is None when the source has no norm in that entry (the target norm starts as a
    unit norm: weight 1, bias 0); ``target`` is None when the target has no slot (the source
    norm is dropped, and kept aside in the checkpoint so a round trip can restore it).
    """

    index: int
    source_role: str
    source: str | None
    target_role: str
    target: str | None
    note: str = ""
    copy: bool = False  # one source norm copied to several branches: a carried original takes precedence
    target_kind: str = ""  # the target norm's kind; a unit rmsnorm-offset norm has weight 0, not 1
    source_kind: str = ""  # the source norm's kind: a (1 + w) norm moved into a plain slot takes weight 1 + w


@dataclass(frozen=True)
class StackPlan:
    """The moves of one layer stack, plus target norms that only ever start as unit norms (path, kind)."""

    source_stack: str
    target_stack: str
    moves: tuple[NormMove, ...]
    unit_norms: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ConversionPlan:
    """Everything a conversion will do, before it does it. Frozen, printable, JSON-serialisable."""

    source_model_type: str
    target_model_type: str
    source_placement: str
    target_placement: str
    realisation: str  # "native: <model_type>" or "generated code"
    exact: bool
    stacks: tuple[StackPlan, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def noop(self) -> bool:
        return self.source_placement == self.target_placement and self.source_model_type == self.target_model_type

    def describe(self) -> str:
        """A human-readable listing of the plan, one move per line."""
        lines = [f"plan: {self.source_model_type} ({self.source_placement}) -> {self.target_model_type} "
                 f"({self.target_placement}) via {self.realisation}; exact: {str(self.exact).lower()}"]
        if self.noop:
            lines.append("  nothing to do: the model already has this placement")
        for stack in self.stacks:
            lines.append(f"  stack {stack.source_stack} -> {stack.target_stack}:")
            for move in stack.moves:
                source = move.source or "(none: starts as a unit norm)"
                target = move.target or "(no slot: dropped, kept aside for round trips)"
                note = f"   # {move.note}" if move.note else ""
                lines.append(f"    {move.source_role:>9} {source}  ->  {move.target_role:<9} {target}{note}")
            for path, _ in stack.unit_norms:
                lines.append(f"    {'':>9} (none: starts as a unit norm)  ->  {path}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "noop": self.noop}


def norm_sequence(stack: Stack, sublayers: list[Sublayer], placement: str) -> list[tuple[str, tuple[NormSite, ...]]]:
    """The S + 1 entries of a stack's norm sequence as (role, norms); an entry may hold 0, 1 or 2 norms."""
    if placement == "post":
        entries = [("embedding", (stack.embedding_norm,) if stack.embedding_norm else ())]
        for index, sub in enumerate(sublayers):
            entries.append((f"post {index}", sub.norms_in("post")))
        return entries
    if placement in ("pre", "parallel"):
        entries = [(f"pre {index}", sub.norms_in("pre")) for index, sub in enumerate(sublayers)]
        entries.append(("final", (stack.final_norm,) if stack.final_norm else ()))
        return entries
    raise PlanError(f"normswap converts between Post-Norm and Pre-Norm; this model is {placement}")


def serialises(source_placement: str, target_placement: str) -> bool:
    """Whether going from ``source_placement`` to ``target_placement`` turns each branch of a parallel block into
    a sublayer of its own (``--placement pre`` on a parallel Pre-Norm model means sequential Pre-Norm)."""
    return source_placement == "parallel" and target_placement == "pre"


def build_placement_plan(source: Topology, target: Topology, realisation: str) -> ConversionPlan:
    """The norm-shift plan from ``source`` to ``target`` (both detected), stack by stack.

    A parallel Pre-Norm source going to a sequential Pre-Norm target is *serialised*: each branch of a
    parallel block becomes a sublayer of its own and keeps the norm it read.
    """
    source_placement = require_placement_source(source)
    target_placement = require_placement_source(target)
    if len(source.stacks) != len(target.stacks):
        raise PlanError(f"{source.model_type} has {len(source.stacks)} layer stacks but the target "
                        f"{target.model_type} has {len(target.stacks)}")
    serial = serialises(source_placement, target_placement)
    stacks = []
    notes: list[str] = []
    for source_stack, target_stack in zip(source.stacks, target.stacks, strict=True):
        source_subs = [s for layer in source.layers if layer.stack == source_stack.path for s in layer.sublayers]
        target_subs = [s for layer in target.layers if layer.stack == target_stack.path for s in layer.sublayers]
        source_kinds = _serial_kinds(source_subs) if serial else [s.kind for s in source_subs]
        if source_kinds != [s.kind for s in target_subs]:
            raise PlanError(f"the sublayers of {source_stack.path} ({len(source_kinds)}) and of the target's "
                            f"{target_stack.path} ({len(target_subs)}) do not line up")
        stacks.append(_stack_plan(source_stack, source_subs, source_placement,
                                  target_stack, target_subs, target_placement, notes))
    if serial:
        notes.append("parallel -> sequential: each branch keeps the norm it read, but the later branch of each "
                     "block now reads h + (the earlier branch)(h) instead of h (the MLP reads h + attention(h)), a "
                     "different function (approximate; heal to recover)")
    elif any(sub.kind == "parallel" for layer in source.layers for sub in layer.sublayers):
        notes.append("parallel blocks: see the moves for which norm each branch keeps")
    return ConversionPlan(
        source_model_type=source.model_type,
        target_model_type=target.model_type,
        source_placement=source_placement,
        target_placement=target_placement,
        realisation=realisation,
        exact=source_placement == target_placement,
        stacks=tuple(stacks),
        notes=tuple(_unique(notes)),
    )


def _stack_plan(source_stack: Stack, source_subs: list[Sublayer], source_placement: str,
                target_stack: Stack, target_subs: list[Sublayer], target_placement: str,
                notes: list[str]) -> StackPlan:
    source_entries = (serial_sequence(source_stack, source_subs) if serialises(source_placement, target_placement)
                      else norm_sequence(source_stack, source_subs, source_placement))
    target_entries = norm_sequence(target_stack, target_subs, target_placement)
    unit_norms: list[tuple[str, str]] = []
    # a Pre-Norm layout with an embedding norm before N_0 (mBART, BLOOM) has one entry more
    if target_placement != "post" and target_stack.embedding_norm and source_placement == "post":
        unit_norms.append((target_stack.embedding_norm.path, target_stack.embedding_norm.kind))
        notes.append(f"{target_stack.embedding_norm.path} starts as a unit norm and the embedding norm becomes "
                     "the first pre norm: branch 0 reads E(LN(e)) instead of E(e), which differs only through eps "
                     "in the second normalisation (little where the embeddings' variance is far above eps)")
    moves: list[NormMove] = []
    if (source_placement != "post" and target_placement == "post"
            and embedding_norm_stays(source_stack, source_entries[0][1])):
        # branch 0 reads the embedding norm through an identity placeholder: the two are one norm, which stays
        source_entries[0] = (source_entries[0][0], (source_stack.embedding_norm,))
        notes.append(f"{source_stack.embedding_norm.path} stays the embedding norm: branch 0 read it through "
                     f"an identity placeholder, which every layer of the Post-Norm model replaces with a norm")
    elif source_placement != "post" and source_stack.embedding_norm and target_placement == "post":
        moves.append(NormMove(-1, "embedding", source_stack.embedding_norm.path, "-", None,
                              "a Post-Norm model has one norm before branch 0"))
        notes.append(f"{source_stack.embedding_norm.path} is dropped: a Post-Norm model has one norm before branch "
                     "0, which takes the first pre norm; branch 0 is exact only if the dropped norm was a unit norm")
    for index, ((source_role, sources), (target_role, targets)) in enumerate(
            zip(source_entries, target_entries, strict=True)):
        moves.extend(_entry_moves(index, source_role, sources, target_role, targets, notes))
    return StackPlan(source_stack.path, target_stack.path, _mark_copies(moves), tuple(unit_norms))


def serial_sequence(stack: Stack, sublayers: list[Sublayer]) -> list[tuple[str, tuple[NormSite, ...]]]:
    """A parallel Pre-Norm stack's entries as the sequential Pre-Norm model it becomes: one entry per branch,
    holding the norm that branch reads (GPT-J's shared ``ln_1`` appears in both entries of its block)."""
    entries: list[tuple[str, tuple[NormSite, ...]]] = []
    for sub in sublayers:
        if sub.kind != "parallel":
            entries.append((f"pre {len(entries)}", sub.norms_in("pre")))
            continue
        by_path = {norm.path: norm for norm in sub.norms_in("pre")}
        for branch in sub.branches:
            entries.append((f"pre {len(entries)}", tuple(by_path[p] for p in branch.reads if p in by_path)))
    entries.append(("final", (stack.final_norm,) if stack.final_norm else ()))
    return entries


def _serial_kinds(sublayers: list[Sublayer]) -> list[str]:
    return [kind for sub in sublayers
            for kind in ([b.kind for b in sub.branches] if sub.kind == "parallel" else [sub.kind])]


def _mark_copies(moves: list[NormMove]) -> tuple[NormMove, ...]:
    """A source norm moved to more than one slot is copied: only its first move takes it as its own."""
    seen: set[str] = set()
    marked = []
    for move in moves:
        if move.source is not None and move.target is not None and move.source in seen and not move.copy:
            move = replace(move, copy=True, note=move.note or "copied: the branches shared this norm")
        if move.source is not None:
            seen.add(move.source)
        marked.append(move)
    return tuple(marked)


# A LayerNorm with or without its bias is one kind for a placement change: a norm moved into a slot that has the
# tensor it lacks gets the unit value (bias 0), and one that loses a tensor must have the unit value there, which
# the weight mapping checks (ESMC's final LayerNorm has a bias, its layer norms none). A (1 + w) norm and a plain
# one are one kind too: the plain weight 1 + w computes the same function (docs/design.md §6), so a move between
# them converts the weight (Muse Glimmer's final norm is an offset RMSNorm, its layer norms plain ones).
_KIND_FAMILY = {"layernorm-nobias": "layernorm", "rmsnorm-offset": "rmsnorm", "layernorm-offset": "layernorm"}


def _entry_moves(index: int, source_role: str, sources: tuple[NormSite, ...], target_role: str,
                 targets: tuple[NormSite, ...], notes: list[str]) -> list[NormMove]:
    if not sources and not targets:
        return []
    kinds = {_KIND_FAMILY.get(norm.kind, norm.kind) for norm in (*sources, *targets) if norm.kind != "identity"}
    if len(kinds) > 1:
        kinds = {norm.kind for norm in (*sources, *targets) if norm.kind != "identity"}
        raise PlanError(f"{source_role} holds {', '.join(sorted(kinds))} norms on the two sides; a placement change "
                        "keeps the norm kind (changing it is a separate conversion)")
    if not targets:
        note = "the target has no norm here; branch 0 no longer reads it" if index == 0 else "no target slot"
        notes.append(f"{sources[0].path} has no slot in the target ({target_role}) and is dropped")
        return [NormMove(index, source_role, s.path, target_role, None, note) for s in sources]
    if not sources:
        note = "branch 0 read no norm before; now it reads a unit norm" if index == 0 else "no source norm"
        notes.append(f"{targets[0].path} ({target_role}) has no source norm and starts as a unit norm")
        return [NormMove(index, source_role, None, target_role, t.path, note, target_kind=t.kind) for t in targets]
    if len(sources) == len(targets):
        return [NormMove(index, source_role, s.path, target_role, t.path, target_kind=t.kind, source_kind=s.kind)
                for s, t in zip(sources, targets, strict=True)]
    if len(targets) == 1:  # two branch norms -> one post norm: both branches will read one input
        kept, *dropped = sources
        notes.append(f"parallel block: {targets[0].path} takes {kept.path} (the first branch's norm); "
                     f"{', '.join(d.path for d in dropped)} is dropped")
        return [NormMove(index, source_role, kept.path, target_role, targets[0].path, "kept: first branch's norm",
                         target_kind=targets[0].kind, source_kind=kept.kind),
                *(NormMove(index, source_role, d.path, target_role, None, "dropped: branches share one input")
                  for d in dropped)]
    if len(sources) == 1:  # one norm -> one per branch: every branch reads a copy
        return [NormMove(index, source_role, sources[0].path, target_role, t.path, "copied to each branch",
                         copy=True, target_kind=t.kind, source_kind=sources[0].kind) for t in targets]
    raise PlanError(f"cannot map {len(sources)} norms ({source_role}) onto {len(targets)} ({target_role})")


_BRANCH_NORM_PLACEMENTS = {
    "sandwich": "a norm on each sublayer's input and another on its branch output, inside the residual add",
    "post-sublayer": "a norm on each branch output, inside the residual add, and none on the stream",
    "pre-post": "a norm before and after each sublayer",
}


def require_placement_source(topology: Topology) -> str:
    """The placement of ``topology`` if the norm-shift mapping applies to it, else why not (one line)."""
    placement = topology.placement
    _require_one_sublayer_per_norm(topology)
    if placement in ("pre", "post", "parallel"):
        return placement
    if placement in _BRANCH_NORM_PLACEMENTS:
        raise PlanError(
            f"{topology.model_type} has {placement} placement ({_BRANCH_NORM_PLACEMENTS[placement]}); the norm-shift "
            "mapping moves each stream norm to the next branch (docs/design.md §3), and a norm inside a branch has "
            "no such image: removing it changes the function, so it needs a calibrated stand-in (§6), a different, "
            "approximate conversion than --placement pre/post")
    if placement == "none":
        inside = sorted({norm.path.rpartition(".")[2] for layer in topology.layers for norm in layer.inner_norms})
        where = (f"its norms ({', '.join(inside)}) sit inside its branches" if inside
                 else "nor a LayerNorm or RMSNorm in its branches")
        raise PlanError(f"{topology.model_type} has no norm on its residual stream ({where}; {topology.summary()}); "
                        "the norm-shift mapping moves residual norms, and there are none to move")
    raise PlanError(f"{topology.model_type} has {placement} placement (its layers or sublayers place their norms "
                    "differently); the norm-shift mapping needs one placement throughout a stack")


def _require_one_sublayer_per_norm(topology: Topology) -> None:
    """A norm read by two sublayers that add at different points (LongCat-Flash's shortcut MoE reads the first
    MLP's norm and adds at the end of the layer) makes the layer no sequence of ``h + F(norm(h))`` steps."""
    for layer in topology.layers:
        readers: dict[str, int] = {}
        for index, sub in enumerate(layer.sublayers):
            for norm in sub.norms:
                first = readers.setdefault(norm.path, index)
                if first != index:
                    raise PlanError(
                        f"{topology.model_type}'s {layer.path} reads {norm.path} in sublayer {first} and again in "
                        f"sublayer {index}, which adds to the stream later: a branch that skips sublayers has no "
                        "place in the norm-shift mapping (docs/design.md §3), where each norm sits between one add "
                        "and the next branch")


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))
