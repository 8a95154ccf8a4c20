"""The detected residual/norm topology: frozen, printable and JSON-serialisable.

A ``Topology`` is what ``normswap inspect`` reports and what a conversion plan is
built from. Example, BERT (Post-LN)::

    embeddings.LayerNorm -> [attn -> + -> LayerNorm] -> [mlp -> + -> LayerNorm] x 6
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

NormKind = Literal[
    "layernorm", "layernorm-nobias", "layernorm-noaffine", "layernorm-offset", "rmsnorm", "rmsnorm-offset",
    "rmsnorm-noaffine", "identity"
]
NormSlot = Literal["pre", "post", "out"]
OFFSET_NORM_KINDS = frozenset({"rmsnorm-offset", "layernorm-offset"})  # (1 + w) * n: a unit norm has w = 0
BranchKind = Literal["attention", "cross-attention", "mlp"]
ScaleForm = Literal["gain", "interpolation", "output"]
ScaleExtent = Literal["constant", "scalar", "per-channel"]
Placement = Literal["pre", "post", "sandwich", "post-sublayer", "parallel", "pre-post", "none", "mixed"]

NORM_KIND_LABELS: dict[str, str] = {
    "layernorm": "LayerNorm",
    "layernorm-nobias": "LayerNorm (no bias)",
    "layernorm-noaffine": "LayerNorm (no affine)",
    "layernorm-offset": "LayerNorm (1 + w)",
    "rmsnorm": "RMSNorm",
    "rmsnorm-offset": "RMSNorm (1 + w)",
    "rmsnorm-noaffine": "RMSNorm (no affine)",
    "identity": "Identity",
}
PLACEMENT_LABELS: dict[str, str] = {
    "pre": "Pre-Norm",
    "post": "Post-Norm",
    "sandwich": "Sandwich-Norm",
    "post-sublayer": "Post-sublayer-Norm",
    "parallel": "Parallel-residual (Pre-Norm)",
    "pre-post": "Pre+Post-Norm",
    "none": "no residual norms",
    "mixed": "mixed placement",
}


@dataclass(frozen=True)
class NormSite:
    """One norm module call on the residual path of a sublayer (or the embedding/final norm)."""

    path: str
    slot: NormSlot | Literal["embedding", "final", "inner"]
    kind: NormKind
    eps: float | None
    dim: int
    source: str | None = None  # "modeling_bert.py:293", where the call sits in the modeling code
    axis: int = -1  # the axis of its input it normalises: -1, or 1 on a channels-first (batch, channels, ...) tensor


@dataclass(frozen=True)
class Branch:
    """One branch F of a sublayer: the modules it runs, the kind they add up to, and the pre norms it reads.

    In a parallel group the branches may read different norms (GPT-NeoX: attention reads
    ``input_layernorm``, the MLP ``post_attention_layernorm``) or share one (GPT-J ``ln_1``).
    """

    kind: BranchKind
    modules: tuple[str, ...]
    reads: tuple[str, ...] = ()  # paths of the pre norms between the stream and this branch
    entry: str | None = None  # the first module the branch runs: its input is what the branch reads
    entry_source: str | None = None  # where the entry module is called, "modeling_bert.py:364"
    # the other modules that read the stream as the entry does (ALBERT's attention calls key and value beside query
    # in its own forward): their positions in ``modules``, which keep their order wherever paths are relocated, and
    # where each is called; a norm moved before the branch must reach every one of them
    reader_positions: tuple[int, ...] = ()
    reader_sources: tuple[str | None, ...] = ()

    def other_readers(self) -> tuple[tuple[str, str | None], ...]:
        """(module path, where it is called) of each module beside the entry that reads what the entry reads."""
        return tuple((self.modules[position], source)
                     for position, source in zip(self.reader_positions, self.reader_sources, strict=True))


@dataclass(frozen=True)
class ResidualScale:
    """What multiplies the stream that a residual add keeps: ``h <- s * h + F(...)`` instead of ``h <- h + F(...)``.

    Recorded because the norm-shift mapping (docs/design.md §3) and the exact norm-kind maps (§4, §5) assume the
    stream is only ever added to: the mapping's identity path carries the stream unchanged, so any ``s`` other
    than 1 breaks it. A constant or scalar ``s`` commutes with centring (§4) and with the extra-dimension lift
    (§5); a per-channel gain does not.

    * ``gain``: ``h <- s * h + F(...)`` (a residual gain, e.g. a learned per-channel vector);
    * ``interpolation``: ``h <- h + r * (F(...) - h)``, so ``s = 1 - r``; ``tensors`` name ``r``'s sources;
    * ``output``: the layer multiplies the stream by ``s`` after its last residual add.
    """

    form: ScaleForm
    extent: ScaleExtent  # a number in the code, one stored value, or one value per hidden channel
    tensors: tuple[str, ...] = ()  # the parameters and buffers the factor is computed from
    value: float | None = None  # the factor on the stream, where the code fixes it
    source: str | None = None  # where the scaling sits in the modeling code, "modeling_doge.py:477"

    @property
    def per_channel(self) -> bool:
        return self.extent == "per-channel"

    def describe(self) -> str:
        """``per-channel gain input_residual (modeling_doge.py:477)``: what scales the stream, and where."""
        what = {"gain": "gain", "interpolation": "interpolation rate", "output": "output scale"}[self.form]
        named = f" {', '.join(self.tensors)}" if self.tensors else ""
        value = f" {self.value:.4g}" if self.value is not None and not self.tensors else ""
        where = f" ({self.source})" if self.source else ""
        return f"{self.extent} {what}{named}{value}{where}"


@dataclass(frozen=True)
class Sublayer:
    """One residual add ``h + F(...)`` together with the norms around it.

    A parallel group (GPT-J, GPT-NeoX) is one sublayer with several branches.
    """

    kind: BranchKind | Literal["parallel"]
    placement: Placement
    branches: tuple[Branch, ...]
    norms: tuple[NormSite, ...]
    residual_add: str | None  # source line of the add, e.g. "modeling_llama.py:301"
    notes: tuple[str, ...] = ()
    residual_scale: ResidualScale | None = None  # None: the add keeps the stream as it is (h + F)
    # the modeling-code line that called the code holding the add: where the add is inside a module-level helper
    # (Falcon's ``dropout_add``), the call of it that adds, of the several a configuration may skip
    residual_add_caller: str | None = None

    def norms_in(self, slot: str) -> tuple[NormSite, ...]:
        return tuple(norm for norm in self.norms if norm.slot == slot)


@dataclass(frozen=True)
class Layer:
    """One layer module of a stack (``encoder.layer.3``) and its sublayers in execution order.

    A model with no layer modules (XLM, FlauBERT) runs ``for i in range(n)`` over lists of branches and norms:
    its layer ``i`` is the items at index ``i`` (``items``: ``attentions.0``, ``layer_norm1.0``, ...), and its
    ``path`` is the module whose forward runs that loop.
    """

    index: int
    stack: str
    path: str
    layer_class: str
    sublayers: tuple[Sublayer, ...]
    inner_norms: tuple[NormSite, ...] = ()  # q/k norms and other norms inside a branch
    output_scale: ResidualScale | None = None  # what the layer multiplies its output stream by, if anything
    items: tuple[str, ...] = ()  # the module-list items that make the layer, where no module does

    def relative(self, path: str) -> str:
        """``path`` inside the layer, written alike for every layer of its stack: ``attention.dense`` for
        ``encoder.layer.3.attention.dense``, and for a layer of list items ``layer_norm1.*`` for ``layer_norm1.3``."""
        inside = path.removeprefix(f"{self.path}.") if self.path else path
        for item in self.items:
            if inside == item or inside.startswith(f"{item}."):
                return f"{item.rpartition('.')[0]}.*{inside[len(item):]}"
        return inside

    @property
    def placement(self) -> Placement:
        return combine_placements(sub.placement for sub in self.sublayers)

    @property
    def residual_scales(self) -> tuple[ResidualScale, ...]:
        """Every scaling of the stream in this layer, in execution order."""
        scales = [sub.residual_scale for sub in self.sublayers if sub.residual_scale]
        return (*scales, self.output_scale) if self.output_scale else tuple(scales)


@dataclass(frozen=True)
class Stack:
    """A sequence of layers sharing one residual stream (a decoder, or an encoder)."""

    path: str
    num_layers: int
    embedding_norm: NormSite | None
    final_norm: NormSite | None
    width: int | None = None  # the stream's width, as its first layer reads it (stages of a vision model differ)
    axis: int = -1  # the axis of the stream between layers that holds its channels: 1 where it is channels first
    passes: int | None = None  # layer calls in one forward, where the model reuses its layers (ALBERT's one group)

    def layer_count(self) -> str:
        """``6 layers``, or ``1 layers, 12 passes`` where the stack runs its layers more than once."""
        return f"{self.num_layers} layers" + (f", {self.passes} passes" if self.passes else "")


@dataclass(frozen=True)
class Topology:
    """The model's residual/norm topology, as detected."""

    model_type: str
    model_class: str
    stacks: tuple[Stack, ...]
    layers: tuple[Layer, ...]
    notes: tuple[str, ...] = ()

    @property
    def placement(self) -> Placement:
        return combine_placements(layer.placement for layer in self.layers)

    @property
    def residual_scales(self) -> tuple[ResidualScale, ...]:
        """What scales the stream between residual adds, over all layers; empty where every add is ``h + F``."""
        return tuple(scale for layer in self.layers for scale in layer.residual_scales)

    @property
    def identity_residual(self) -> bool:
        """Whether the stream is only ever added to: what the norm-shift and exact norm-kind maps assume."""
        return not self.residual_scales

    @property
    def residual_norms(self) -> tuple[NormSite, ...]:
        return tuple(norm for layer in self.layers for sub in layer.sublayers for norm in sub.norms)

    @property
    def final_norms(self) -> tuple[NormSite, ...]:
        """The final norm of every stack that has one."""
        return tuple(stack.final_norm for stack in self.stacks if stack.final_norm)

    @property
    def stream_norms(self) -> tuple[NormSite, ...]:
        """The norms of the layers plus the final norms: in a Pre-Norm model, every reader of the stream."""
        return (*self.residual_norms, *self.final_norms)

    @property
    def all_norms(self) -> tuple[NormSite, ...]:
        edges = [norm for stack in self.stacks for norm in (stack.embedding_norm, stack.final_norm) if norm]
        return (*edges, *self.residual_norms)

    @property
    def norm(self) -> str:
        """The norm kind of the model, ``mixed`` where norms differ (identity placeholders ignored)."""
        kinds = {norm.kind for norm in self.all_norms if norm.kind != "identity"}
        if not kinds:
            return "none"
        return kinds.pop() if len(kinds) == 1 else "mixed"

    @property
    def eps(self) -> float | None:
        values = {norm.eps for norm in self.all_norms if norm.kind != "identity"}
        return values.pop() if len(values) == 1 else None

    @property
    def embedding_norm(self) -> NormSite | None:
        return self.stacks[0].embedding_norm if self.stacks else None

    @property
    def final_norm(self) -> NormSite | None:
        return self.stacks[-1].final_norm if self.stacks else None

    def summary(self) -> str:
        """One line, e.g. ``Post-Norm, LayerNorm (eps 1e-12), embedding norm, no final norm, 6 layers``."""
        norm = NORM_KIND_LABELS.get(self.norm, self.norm)
        eps = f" (eps {self.eps:g})" if self.eps is not None else ""
        parts = [PLACEMENT_LABELS[self.placement], f"{norm}{eps}"]
        parts.append("embedding norm" if any(s.embedding_norm for s in self.stacks) else "no embedding norm")
        parts.append("final norm" if any(s.final_norm for s in self.stacks) else "no final norm")
        if self.residual_scales:
            parts.append(_scaled_residual_summary(self.residual_scales))
        parts.append(" + ".join(s.layer_count() for s in self.stacks) if len(self.stacks) > 1
                     else self.stacks[0].layer_count() if self.stacks and self.stacks[0].passes
                     else f"{len(self.layers)} layers")
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """The JSON contract documented in docs/inspect.md ("inspect --json")."""
        return {
            "model_type": self.model_type,
            "model_class": self.model_class,
            "summary": self.summary(),
            "placement": self.placement,
            "norm": self.norm,
            "eps": self.eps,
            "embedding_norm": self.embedding_norm.path if self.embedding_norm else None,
            "final_norm": self.final_norm.path if self.final_norm else None,
            "stacks": [asdict(stack) for stack in self.stacks],
            "layers": [
                {
                    "index": layer.index,
                    "stack": layer.stack,
                    "path": layer.path,
                    "class": layer.layer_class,
                    "placement": layer.placement,
                    "sublayers": [_sublayer_dict(sub) for sub in layer.sublayers],
                    "inner_norms": [asdict(norm) for norm in layer.inner_norms],
                    "output_scale": asdict(layer.output_scale) if layer.output_scale else None,
                    "items": list(layer.items),
                }
                for layer in self.layers
            ],
            "notes": list(self.notes),
        }


def _sublayer_dict(sub: Sublayer) -> dict[str, Any]:
    return {
        "kind": sub.kind,
        "placement": sub.placement,
        "branches": [{"kind": b.kind, "modules": list(b.modules), "reads": list(b.reads), "entry": b.entry,
                      "entry_source": b.entry_source}
                     for b in sub.branches],
        "norms": [asdict(norm) for norm in sub.norms],
        "residual_add": sub.residual_add,
        "residual_scale": asdict(sub.residual_scale) if sub.residual_scale else None,
        "notes": list(sub.notes),
    }


def _scaled_residual_summary(scales: tuple[ResidualScale, ...]) -> str:
    """``scaled residual (per-channel gain)``: the strongest kind of scaling, for the summary line."""
    order: tuple[ScaleExtent, ...] = ("per-channel", "scalar", "constant")
    extent = next(e for e in order if any(scale.extent == e for scale in scales))
    forms = ", ".join(dict.fromkeys(scale.form for scale in scales if scale.extent == extent))
    return f"scaled residual ({extent} {forms})"


def embedding_norm_stays(stack: Stack, first_pre: tuple[NormSite, ...]) -> bool:
    """Whether a Pre-Norm stack's embedding norm stays the embedding norm of its Post-Norm twin: where branch 0
    reads it through an identity placeholder (``first_pre``, its pre norms), the two norms in a row are one, and
    the norm-shift keeps it (ModernBERT)."""
    return stack.embedding_norm is not None and bool(first_pre) and all(norm.kind == "identity" for norm in first_pre)


def combine_placements(placements: Any) -> Placement:
    """One placement if all agree, ``mixed`` otherwise. Parallel blocks among Pre-Norm sublayers (Falcon-H1: attention
    and Mamba read one norm, then a Pre-Norm MLP) are ``parallel``: every norm is before its branches, as in a
    model of parallel blocks alone, and the norm-shift sequence has one entry per sublayer either way."""
    seen = set(placements)
    if not seen:
        return "none"
    if seen == {"pre", "parallel"}:
        return "parallel"
    return seen.pop() if len(seen) == 1 else "mixed"


def placement_of_slots(slots: set[str], parallel: bool) -> Placement:
    """What a sublayer's occupied norm slots add up to.

    A parallel group normalised before its branches is ``parallel``; one normalised after the
    sum, ``N(h + A(h) + M(h))``, is ``post`` (its kind still says ``parallel``).
    """
    if parallel and slots:  # a parallel group with no norm at all (a norm-free model's) is "none", as any sublayer
        return "post" if slots == {"post"} else "parallel"
    table: dict[frozenset[str], Placement] = {
        frozenset({"pre"}): "pre",
        frozenset({"post"}): "post",
        frozenset({"out"}): "post-sublayer",
        frozenset({"pre", "out"}): "sandwich",
        frozenset({"pre", "post"}): "pre-post",
        frozenset(): "none",
    }
    return table.get(frozenset(slots), "mixed")
