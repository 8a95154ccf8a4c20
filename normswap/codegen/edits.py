"""The source edits a placement change needs, as frozen records (one kind of edit per class).

Edits name a class of the modeling file, a line (from the fx stack traces of the traced
layer) and ``self.<attribute>`` paths relative to that class, so that the rewrite is a plain
lookup: find the statement at that line in that class, change the one matching expression.
"""

from __future__ import annotations

from dataclasses import dataclass

INNER_WIDTH_FIELD = "normswap_inner_width"  # the config field that holds d where the stream is d + 1 wide
# the keywords a branch call may pass its input by, where it passes none positionally (FSMT's ``query=``)
INPUT_KEYWORDS = ("hidden_states", "query", "x", "input", "inputs")
OUTPUT_PROJECTION = "normswap_output_projection"  # the attribute of ``AddOutputProjection``'s linear map
SOURCE_FIELDS = "normswap_source_fields"  # the config field that holds the values the extra dimension changed
STREAM_MAP = "normswap_stream_map"  # a fixed (d+1) x (d+1) map after a weighted norm whose output starts the stream
STREAM_LIFT = "normswap_stream_lift"  # U before the layers of a model whose stem writes no token rows to lift
STREAM_UNLIFT = "normswap_stream_unlift"  # U^T after the layers of a stack whose stream leaves with no final norm


@dataclass(frozen=True)
class UnwrapNormCall:
    """``self.<norm>(x)`` -> ``x`` in the statement at ``line``. A call of the norm on the output of ``branch``, the
    branch whose input it normalises, is another placement that did not run (FocalNet's
    ``self.norm2(self.mlp(h)) if self.use_post_layernorm else self.mlp(self.norm2(h))``), and is left alone."""

    class_name: str
    line: int
    norm: str
    branch: str = ""


@dataclass(frozen=True)
class WrapResidualAdd:
    """``a + b`` -> ``self.<norm>(a + b)``: the outermost addition of the statement at ``line``; with ``call``,
    ``call(...)`` -> ``self.<norm>(call(...))``: the add is inside that module-level function, or (``self.x``)
    inside that child module, whose forward returns the sum; with ``item`` too, it returns a tuple whose item
    ``item`` is the sum: ``normswap_norm_item(self.<norm>, call(...), item)`` normalises that item alone."""

    class_name: str
    line: int
    norm: str
    call: str = ""
    item: int | None = None


@dataclass(frozen=True)
class WrapBranchInput:
    """``self.<branch>(x, ...)`` -> ``self.<branch>(self.<norm>(x), ...)`` in the statement at ``line``."""

    class_name: str
    line: int
    branch: str
    norm: str


@dataclass(frozen=True)
class UnwrapModelNorm:
    """Every ``self.<norm>(x)`` call in ``forward`` of a model-level class -> ``x``."""

    class_name: str
    norm: str


@dataclass(frozen=True)
class NeutraliseNorm:
    """Every ``self.<norm> = ...`` in ``__init__`` -> ``NormswapRemovedNorm(parameters)``.

    The placeholder passes its input through and keeps a 0-d tensor under each of the norm's
    parameter names, so the stock class refuses the checkpoint (size mismatch) instead of loading it.
    With ``item_class``, ``self.<norm>`` is a module list built by one expression (GLPN's stage norms): each
    ``<item_class>(...)`` call in it becomes the placeholder, and the list keeps its length.
    """

    class_name: str
    norm: str
    parameters: tuple[str, ...] = ("weight",)
    item_class: str = ""


@dataclass(frozen=True)
class GiveBias:
    """``normswap_give_bias(self.<attribute>)`` right after each statement of ``__init__`` that assigns
    ``self.<attribute>`` (a linear map built without a bias): a dropped LayerNorm's ``beta`` folds into its bias
    (``conversion/reader_bias.py``)."""

    class_name: str
    attribute: str


@dataclass(frozen=True)
class BuildNormAlways:
    """``self.<norm> = nn.Identity()`` in ``__init__`` -> the norm constructor the same ``__init__`` uses otherwise.

    ModernBERT's first layer builds an Identity where later layers build ``attn_norm``, because its embedding norm
    already normalises what branch 0 reads; in a Post-Norm target every layer's norm holds a moved norm.
    """

    class_name: str
    norm: str


@dataclass(frozen=True)
class AddStackNorm:
    """A new norm on the class that runs the layer loop, applied before or after the loop.

    Its constructor is copied from ``self.<copy_attribute> = ...`` in ``copy_from``'s ``__init__``. Where
    ``copy_from`` is the layers' own class and its constructor reads names the loop's class does not have (CvT
    builds its layers' norms from an ``embed_dim`` argument), the first layer's norm is copied instead: the same
    class, shape and settings, whose weights loading replaces. Where the stream between layers is channels first
    and the copied norm normalises the last axis (VitDet), the call moves ``channel_axis`` last and back:
    ``h = self.<norm>(h.movedim(1, -1)).movedim(-1, 1)``.

    With ``per_stage`` the stack is one item of ``self.<stack_attribute>``, a list of layer lists that one loop
    runs stage by stage (GLPN, PVT: ``stage_loops``): the norm is a module list with one fresh copy of each stage's
    first layer's ``<copy_attribute>`` (a path in the layer), and the call, inside the stage loop, takes the item
    of the loop's index.
    """

    class_name: str
    stack_attribute: str
    norm: str
    where: str  # "before" or "after" the loop
    copy_from: str
    copy_attribute: str
    copy_from_layers: bool = False  # ``copy_from`` is the class of the stack's items
    channel_axis: int = -1
    per_stage: bool = False


@dataclass(frozen=True)
class ReplaceNormClass:
    """Every ``self.<norm> = SomeNorm(args)`` in ``__init__`` -> ``<new_class>(args)``.

    A norm's constructor arguments differ by family (``normalized_shape``, ``hidden_size``, ``dim``, the whole
    config), so with ``wrap`` the original norm is built as written and ``<new_class>.like`` copies its shape,
    eps and affine parameters; without it the call keeps its arguments. Either way the parameters keep their
    names.
    """

    class_name: str
    norm: str
    new_class: str = "NormswapRMSNorm"
    keywords: tuple[tuple[str, str], ...] = ()  # arguments to set, as source text (a weightless norm's eps)
    wrap: bool = False  # build the original norm and pass it to ``new_class.like`` instead of its arguments
    # where the constructor expression builds other modules too, only its ``<item_class>(...)`` calls are wrapped:
    # the items of a module list ``self.<norm> = nn.ModuleList([...])`` (GLPN's stage norms, LongCat-Flash's
    # pairs) or what ``__init__`` appends to it (XLM's ``self.layer_norm1.append(nn.LayerNorm(...))``), or the
    # norm a conditional builds in some layers (AXK2's dense layers, where MoE layers build a gate)
    item_class: str = ""


@dataclass(frozen=True)
class CentreStream:
    """``h = h - h.mean(-1, keepdim=True)`` just before the layer loop: the stream starts with zero mean. A
    channels-first stream (SqueezeBERT's, VitDet's) is centred over its ``channel_axis``. With ``per_stage``
    (``AddStackNorm``'s), before each stage's layers inside the loop over a list of layer lists."""

    class_name: str
    stack_attribute: str
    channel_axis: int = -1
    per_stage: bool = False


@dataclass(frozen=True)
class CentreNormInput:
    """Every ``self.<norm>(x)`` in ``forward`` -> ``self.<norm>(x - x.mean(-1, keepdim=True))``.

    An embedding LayerNorm reads the raw embeddings; on a centred input it equals the RMSNorm that replaces it.
    A norm of a channels-first tensor has its input centred over the ``axis`` it normalises.
    """

    class_name: str
    norm: str
    axis: int = -1


@dataclass(frozen=True)
class BuildSubmodelDirectly:
    """``<auto_class>.from_config(args)`` in the statement at ``line`` -> ``<model_class>._from_config(args)``.

    The Auto classes map a stock config to the stock class, so a composite model (Llava, Aria) would build its
    language model from transformers, not from the generated file; for a plain sub-config ``from_config`` is
    exactly ``<the class it resolves to>._from_config``, so naming the regenerated class changes nothing else.
    """

    class_name: str
    line: int
    auto_class: str
    model_class: str


@dataclass(frozen=True)
class AddLayerNorm:
    """``self.<norm> = <the constructor of self.<copy_attribute>>`` added to ``__init__``, after that norm's own
    assignment: a new norm of the same kind and size (a parallel block's later branch gets a norm of its own). With
    ``new_class``, ``self.<norm> = <new_class>.like(<that constructor>)``: a norm of another kind, of the same width
    and eps (``NormswapRMSNorm``, ``NormswapLayerNorm``)."""

    class_name: str
    norm: str
    copy_attribute: str
    new_class: str = ""
    # a class whose ``__init__`` builds ``self.<copy_attribute>``, where ``class_name`` builds no norm of its own
    # (MegatronBERT's SelfOutput adds its branch; its Attention builds the norm): the new norm then goes after the
    # last module ``class_name.__init__`` assigns, and the constructor may read only names defined there
    copy_from: str = ""
    # ``name=value`` arguments of the ``.like`` call: ``affine=True`` where the template norm has no weight (OLMo's
    # LayerNorm), and then its eps, which such a norm keeps in its code
    keywords: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class WrapBranchOutput:
    """In the outermost ``a + b + ...`` of the statement at ``line``, the term written ``term`` ->
    ``self.<norm>(term)``: a norm on a branch's output before it joins the stream (an ``out`` norm). With
    ``helper``, the add is inside that module-level function, and the term is the argument written ``term`` of its
    call in the statement at ``line`` (BLOOM's ``dropout_add(output, residual, ...)``)."""

    class_name: str
    line: int
    term: str
    norm: str
    helper: str = ""


@dataclass(frozen=True)
class ReadAfterBranch:
    """``<variable> = <stream>`` before the statement at ``line``, and there ``self.<branch>(x, ...)`` ->
    ``self.<branch>(self.<norm>(<variable>), ...)``: the branch reads, through its new norm, the stream after the
    earlier branch's add (``residual + attn``)."""

    class_name: str
    line: int
    branch: str
    norm: str
    variable: str
    stream: str  # source text of the stream at that call
    # the name of the old norm's output where the call's input is an expression of it (Falcon-H1's ``hidden_states *
    # self.attention_in_multiplier``): that name alone is replaced there, and the rest of the expression kept
    through: str = ""


@dataclass(frozen=True)
class ReplaceResidualAdd:
    """The outermost ``a + b + ...`` in the statement at ``line`` -> ``expression``. With ``helper``, the add is
    inside that module-level function, and its call's argument written ``argument`` -> ``expression`` instead
    (Falcon's ``dropout_add(mlp_output, residual, ...)``: the stream argument becomes the stream after the earlier
    branch)."""

    class_name: str
    line: int
    expression: str
    helper: str = ""
    argument: str = ""


@dataclass(frozen=True)
class DropStatement:
    """The statement at ``line`` of ``class_name`` -> ``pass  # normswap: <why>``: an in-place add whose term the
    generated code adds elsewhere, a norm call whose norm now reads another stream (``serialise``)."""

    class_name: str
    line: int
    why: str


@dataclass(frozen=True)
class SizeByInnerWidth:
    """In ``self.<attribute> = Ctor(...)`` of ``__init__``: the ``<config>.hidden_size`` reads numbered in
    ``occurrences`` (in source order) -> ``<config>.normswap_inner_width``.

    Exact RMSNorm -> LayerNorm writes ``hidden_size = d + 1``; code that also sizes an inner width by it (Helium's
    ``o_proj`` input, OLMoE's ``q_norm``, BitNet's ``attn_sub_norm``: all ``heads * head_dim``) keeps ``d`` there.
    """

    class_name: str
    attribute: str
    occurrences: tuple[int, ...]


@dataclass(frozen=True)
class AddOutputProjection:
    """``self.<attribute> = torch.nn.Linear(<widths>, bias=False)`` in ``__init__`` after ``self.<norm> = ...``
    (``normswap_output_projection``, d+1 to d, by default), and every ``self.<norm>(x)`` in ``forward`` ->
    ``self.<attribute>(self.<norm>(x))``.

    A model without a head returns its final norm's output; one extra dimension makes that ``U`` times the original
    (docs/design.md §5), and this fixed map (``diag(g) U^T``, the reader a head would have been) gives it back. After
    an embedding norm with a weight (``normswap_stream_map``, d+1 to d+1: ``U diag(g) U^T / s``) it starts the
    stream as ``U`` times the original's.
    """

    class_name: str
    norm: str
    attribute: str = OUTPUT_PROJECTION
    # its input and output widths, as source text in ``__init__`` (``{config}``: the config it takes)
    widths: tuple[str, str] = ("{config}.hidden_size", "{config}." + INNER_WIDTH_FIELD)
    input_map: str = ""  # where set, a second fixed map of ``input_widths`` on the norm's input: ``<map>(<norm>(
    input_widths: tuple[str, str] = ("", "")  # <input_map>(x)))``, as a stem d wide meets the norm d + 1 wide


@dataclass(frozen=True)
class AddStackProjection:
    """``self.<attribute> = torch.nn.Linear(<config>.<widths[0]>, <config>.<widths[1]>, bias=False)`` in
    ``__init__`` after ``self.<stack_attribute> = ...``, and ``h = self.<attribute>(h)`` right ``where`` ("before"
    or "after") the layer loop of ``forward``.

    A fixed map where the stream enters or leaves the layers: a stack whose stream leaves its last layer with no
    final norm is ``U h`` one dimension wider (docs/design.md §5), and ``U^T`` after the loop gives ``h`` back.
    """

    class_name: str
    stack_attribute: str
    attribute: str
    where: str
    widths: tuple[str, str]  # as ``AddOutputProjection.widths``


@dataclass(frozen=True)
class BuildAtSourceWidth:
    """In ``__init__``: ``self.<attribute> = <expression>`` -> ``self.<attribute> =
    normswap_lifted_projector(lambda <config>: <expression>, <config>, <scale>)``.

    A projector into the stream that the family's code sizes by the language model's hidden_size (inside it, not
    only at its output) is built from a copy of the config at the source's width (``SOURCE_FIELDS``), exactly as
    the source built it, and its output is lifted by ``U`` (times ``scale``) as it enters the stream.
    """

    class_name: str
    attribute: str
    scale: float = 1.0


@dataclass(frozen=True)
class VariantStatement:
    """The statement at ``line`` -> ``if <guard 1>: <it, with edits 1> elif ...``: instances of one layer class that
    place their norms differently (AXK2's dense layers call a norm where its MoE layers call a gated norm) each run
    the statement as their own edits make it. Each guard names the class of a module that tells the variants apart,
    ``type(self.<path>).__name__ == "<class>"``; the last case is the ``else``."""

    class_name: str
    line: int
    cases: tuple[tuple[str, tuple[Edit, ...]], ...]  # (guard, the edits of the statement in that variant)


Edit = (UnwrapNormCall | WrapResidualAdd | WrapBranchInput | WrapBranchOutput | UnwrapModelNorm | NeutraliseNorm
        | BuildNormAlways | GiveBias | AddStackNorm
        | ReplaceNormClass | CentreStream | CentreNormInput | BuildSubmodelDirectly | AddLayerNorm | ReadAfterBranch
        | ReplaceResidualAdd | DropStatement | SizeByInnerWidth | AddOutputProjection | AddStackProjection
        | BuildAtSourceWidth | VariantStatement)
