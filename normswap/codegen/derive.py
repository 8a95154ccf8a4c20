"""From a detected topology to the source edits that move the norms (docs/internals.md, code generation).

Pre -> Post: every pre-norm call is unwrapped; every residual add is wrapped in a norm. The
layer reuses its own norm modules cyclically (sublayer j's add takes the module that was
sublayer j+1's pre norm, the last add takes the first), and the plan moves the weights to
match. The final norm leaves the model's forward and a new embedding norm runs before the loop.

Post -> Pre: every post-norm call is unwrapped; every branch input is wrapped in its
sublayer's (former post) norm. The embedding norm leaves the embeddings and a new final norm
runs after the loop.
"""

from __future__ import annotations

import ast
import inspect as pyinspect
from pathlib import Path

from torch import nn

from ..errors import NormswapError
from ..topology import NormSite, Topology
from .edits import (
    AddStackNorm,
    CentreNormInput,
    CentreStream,
    Edit,
    NeutraliseNorm,
    ReplaceNormClass,
    UnwrapModelNorm,
    UnwrapNormCall,
    WrapBranchInput,
    WrapResidualAdd,
)

EMBEDDING_NORM = "normswap_embedding_norm"
FINAL_NORM = "normswap_final_norm"


class CodegenError(NormswapError):
    """The modeling source cannot be rewritten for this conversion."""


def modeling_file(model: nn.Module, topology: Topology) -> Path:
    """The transformers modeling file that defines the model's layers."""
    layer = model.get_submodule(topology.layers[0].path)
    return Path(pyinspect.getsourcefile(type(layer)) or "")


def placement_edits(model: nn.Module, topology: Topology, placement: str) -> list[Edit]:
    """The edits that turn ``model``'s layout into ``placement``."""
    if len(topology.stacks) != 1:
        raise CodegenError(f"{topology.model_type} has {len(topology.stacks)} layer stacks; generated code handles "
                           "single-stack models (encoder-decoders come later)")
    if len({layer.layer_class for layer in topology.layers}) != 1 or len(
            {tuple((s.kind, s.placement) for s in layer.sublayers) for layer in topology.layers}) != 1:
        raise CodegenError(f"{topology.model_type} layers differ from each other; generated code needs one layout")
    path = modeling_file(model, topology)
    classes = _class_lines(path)
    stack = topology.stacks[0]
    layer = topology.layers[0]
    layer_module = model.get_submodule(layer.path)
    locate = _Locator(layer_module, layer.path, classes, path.name)
    loop_owner = _owner(model, stack.path)
    stack_attribute = stack.path.rsplit(".", 1)[-1]
    edits: list[Edit] = []
    subs = layer.sublayers

    if placement == "post":
        if stack.embedding_norm is not None:
            raise CodegenError(f"{topology.model_type} has an embedding norm before its Pre-Norm layers; generated "
                               "Post-Norm code for that layout is not supported yet")
        if stack.final_norm is None:
            raise CodegenError(f"{topology.model_type} has no final norm to become the embedding norm")
        for index, sub in enumerate(subs):
            pre_norms = sub.norms_in("pre")
            if not pre_norms:
                raise CodegenError(f"sublayer {index} of {layer.path} has no pre norm")
            for norm in pre_norms:
                class_name, attribute = locate.attribute(norm.source, norm.path)
                edits.append(UnwrapNormCall(class_name, locate.line(norm.source), attribute))
            for extra in pre_norms[1:]:
                owner, attribute = owner_and_attribute(model, extra.path)
                edits.append(NeutraliseNorm(owner, attribute, _parameter_names(model, extra.path)))
            next_norm = subs[(index + 1) % len(subs)].norms_in("pre")[0]
            class_name, attribute = locate.attribute(sub.residual_add, next_norm.path)
            edits.append(WrapResidualAdd(class_name, locate.line(sub.residual_add), attribute))
        owner, attribute = owner_and_attribute(model, stack.final_norm.path)
        edits += [UnwrapModelNorm(owner, attribute),
                  NeutraliseNorm(owner, attribute, _parameter_names(model, stack.final_norm.path)),
                  AddStackNorm(loop_owner, stack_attribute, EMBEDDING_NORM, "before", owner, attribute)]
        return edits

    if placement == "pre":
        if stack.embedding_norm is None:
            raise CodegenError(f"{topology.model_type} has no embedding norm to become the final norm")
        for index, sub in enumerate(subs):
            (norm,) = sub.norms_in("post") or (None,)
            if norm is None or len(sub.branches) != 1 or not sub.branches[0].entry:
                raise CodegenError(f"sublayer {index} of {layer.path} is not a single branch with one post norm")
            class_name, attribute = locate.attribute(norm.source, norm.path)
            edits.append(UnwrapNormCall(class_name, locate.line(norm.source), attribute))
            branch = sub.branches[0]
            class_name, branch_attribute = locate.attribute(branch.entry_source, branch.entry or "")
            _, norm_attribute = locate.attribute(branch.entry_source, norm.path)
            edits.append(WrapBranchInput(class_name, locate.line(branch.entry_source), branch_attribute,
                                         norm_attribute))
        owner, attribute = owner_and_attribute(model, stack.embedding_norm.path)
        edits += [UnwrapModelNorm(owner, attribute),
                  NeutraliseNorm(owner, attribute, _parameter_names(model, stack.embedding_norm.path)),
                  AddStackNorm(loop_owner, stack_attribute, FINAL_NORM, "after", owner, attribute)]
        return edits
    raise CodegenError(f"placement must be pre or post, got {placement!r}")


def layer_norm_edits(model: nn.Module, topology: Topology) -> list[Edit]:
    """Every residual RMSNorm (pre norms and final norm) becomes ``NormswapLayerNorm.like(<the norm as written>)``,
    which reads its width and eps from the built norm whatever its constructor takes (CpmAnt's takes the config)."""
    edits: list[Edit] = []
    for path in (norm.path for norm in topology.stream_norms):
        edit = ReplaceNormClass(*owner_and_attribute(model, path), new_class="NormswapLayerNorm", wrap=True)
        if edit not in edits:
            edits.append(edit)
    return edits


def rms_norm_edits(model: nn.Module, topology: Topology, centre_in_code: bool = True) -> list[Edit]:
    """The edits that make a Pre-LN model run RMSNorm on a zero-mean stream (docs/design.md §4).

    Every norm that reads the residual stream (pre norms, final norm) becomes ``NormswapRMSNorm``; the
    stream is centred once before the layer loop, which also centres the embeddings without touching
    their weights, so a tied ``lm_head`` stays tied. An embedding LayerNorm (BLOOM, BERT-style embeddings)
    reads the raw embeddings: its input is centred in code too, where it equals the RMSNorm that replaces it;
    the centring before the loop then takes care of its output (its weight and bias).
    """
    edits: list[Edit] = []
    for norm in topology.stream_norms:  # a Pre-LN model's layer norms are all pre norms
        edit = rms_norm_replacement(model, norm)
        if edit not in edits:
            edits.append(edit)
    for norm in embedding_layer_norms(topology) if centre_in_code else ():
        for edit in (rms_norm_replacement(model, norm), CentreNormInput(*owner_and_attribute(model, norm.path))):
            if edit not in edits:
                edits.append(edit)
    for stack in topology.stacks if centre_in_code else ():  # an encoder-decoder has two streams to centre
        edits.append(CentreStream(_owner(model, stack.path), stack.path.rsplit(".", 1)[-1]))
    return edits


def embedding_layer_norms(topology: Topology) -> list[NormSite]:
    """The LayerNorms that read a stack's raw embeddings, before its first layer."""
    return [stack.embedding_norm for stack in topology.stacks
            if stack.embedding_norm is not None and stack.embedding_norm.kind.startswith("layernorm")]


def rms_norm_replacement(model: nn.Module, norm: NormSite) -> ReplaceNormClass:
    """``NormswapRMSNorm`` in place of the LayerNorm at ``norm``.

    The original norm is built as written and handed to ``NormswapRMSNorm.like``, which copies its shape, eps
    and affine parameters whatever its constructor's arguments are called (Cohere: ``hidden_size``); a
    weightless LayerNorm (OLMo) keeps eps in its code, not in an attribute, so the edit states it.
    """
    keywords = (("eps", repr(norm.eps)),) if norm.kind == "layernorm-noaffine" else ()
    return ReplaceNormClass(*owner_and_attribute(model, norm.path), keywords=keywords, wrap=True)


class _Locator:
    """Resolves (source line, module path) to (enclosing class, ``self.`` attribute path in that class)."""

    def __init__(self, layer: nn.Module, layer_path: str, classes: list[tuple[str, int, int]], filename: str):
        self.layer_path = layer_path
        self.classes = classes
        self.filename = filename
        self.class_paths: dict[str, list[str]] = {}
        for path, module in layer.named_modules():
            self.class_paths.setdefault(type(module).__name__, []).append(path)

    def line(self, source: str | None) -> int:
        if not source or ":" not in source:
            raise CodegenError("a norm or add has no source line in the trace; cannot rewrite it")
        filename, line = source.rsplit(":", 1)
        if filename != self.filename:
            raise CodegenError(f"{source} is outside {self.filename}; cannot rewrite code in two files")
        return int(line)

    def attribute(self, source: str | None, module_path: str) -> tuple[str, str]:
        line = self.line(source)
        enclosing = [(name, start, end) for name, start, end in self.classes if start <= line <= end]
        if not enclosing:
            raise CodegenError(f"{source} is not inside a class")
        class_name = max(enclosing, key=lambda item: item[1])[0]
        relative = module_path.removeprefix(self.layer_path + ".")
        for class_path in self.class_paths.get(class_name, []):
            if not class_path:
                return class_name, relative
            if relative.startswith(class_path + "."):
                return class_name, relative[len(class_path) + 1:]
        raise CodegenError(f"{module_path} is not reachable from {class_name} (at {source})")


def _owner(model: nn.Module, path: str) -> str:
    parent = path.rsplit(".", 1)[0] if "." in path else ""
    return type(model.get_submodule(parent)).__name__


def owner_and_attribute(model: nn.Module, path: str) -> tuple[str, str]:
    """The class that owns the module at ``path`` and the attribute it is stored under."""
    return _owner(model, path), path.rsplit(".", 1)[-1]


def _parameter_names(model: nn.Module, path: str) -> tuple[str, ...]:
    return tuple(name for name, _ in model.get_submodule(path).named_parameters(recurse=False))


def _class_lines(path: Path) -> list[tuple[str, int, int]]:
    """(class name, first line, last line) of every class in the file.

    Only line numbers are needed here, so Python's own parser does it (libcst, which keeps the source
    exact for rewriting, takes about a second per modeling file).
    """
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [(node.name, min([node.lineno, *(d.lineno for d in node.decorator_list)]), node.end_lineno or node.lineno)
            for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]
