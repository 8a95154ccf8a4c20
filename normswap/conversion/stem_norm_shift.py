"""Post-Norm read one layer off, to Pre-Norm (docs/design.md §3): MiniMax normalises the stream itself where each
layer starts (``h = N_in(h); residual = h``) and after its attention's add (``h = N_post(h)``), so the norm after
each layer's last add is the next layer's ``N_in`` and the model's final norm follows the last one.

The norm shift moves the norm after each add onto the branch after it: the attention reads ``N_in(h)`` and the MLP
``N_post(h)``, while the residual keeps the stream as it is. Each norm stays the module it was, with its weights,
in the layer that holds it, so the pass changes code only: every call that normalised the stream is unwrapped and
the branch after it reads the stream through that norm. Like every placement change of the norm shift it is not
exact (the stream is no longer normalised between the branches).
"""

from __future__ import annotations

import ast
from pathlib import Path

from torch import nn

from ..codegen.derive import _Locator, each_variant_edits, modeling_file
from ..codegen.edits import Edit, UnwrapNormCall, WrapBranchInput
from ..codegen.serialise import forward_of
from ..detect.stem_norm import TAKEN_AFTER_PRE_NORM
from ..topology import Layer, NormSite, Topology
from .passes import Pass, PassMove
from .plan import PlanError


def stem_norm_in_every_layer(topology: Topology) -> bool:
    """Whether every layer normalises the stream where it starts (the residual taken after its first norm) and
    after an add inside it: a Post-Norm stack read one layer off."""
    starts = [layer for layer in topology.layers if TAKEN_AFTER_PRE_NORM in layer.sublayers[0].notes
              and layer.sublayers[0].norms_in("pre")]
    return (len(starts) == len(topology.layers) > 1
            and any(sub.norms_in("post") for layer in topology.layers for sub in layer.sublayers))


def shifted_stream_norms(model: nn.Module, topology: Topology) -> Pass:
    """The pass: each norm of the stream moved onto the branch that reads its output."""
    source = modeling_file(model, topology)

    def layer_edits(locate: _Locator, layer: Layer) -> list[Edit]:
        found: list[Edit] = []
        for index, norm in enumerate(_norms_read(layer)):
            branch = layer.sublayers[index].branches[0]
            class_name, attribute = locate.attribute(norm.source, norm.path)
            found.append(UnwrapNormCall(class_name, locate.line(norm.source), attribute))
            if locate.enclosing_class(branch.entry_source) == class_name:
                branch_attribute = locate.attribute(branch.entry_source, branch.entry or "")[1]
                found.append(WrapBranchInput(class_name, locate.line(branch.entry_source), branch_attribute, attribute))
                for reader, where in branch.other_readers():
                    reader_attribute = locate.attribute(where, reader)[1]
                    found.append(WrapBranchInput(class_name, locate.line(where), reader_attribute, attribute))
            else:  # the branch's first map is inside a child module (MiniMax's lightning attention): wrap its call
                child = locate.relative(branch.entry or "").split(".")[0]
                found.append(WrapBranchInput(class_name, _call_line(source, class_name, child), child, attribute))
        return found

    edits = each_variant_edits(model, topology, layer_edits)
    moves = tuple(PassMove("move", norm.path, note=f"onto the input of {layer.sublayers[index].kind} "
                           f"({layer.sublayers[index].branches[0].entry}); its weights stay")
                  for layer in topology.layers for index, norm in enumerate(_norms_read(layer)))
    return Pass("mixed -> pre: each norm of the stream moved onto the branch after it (the norm shift, one layer "
                "off)", exact=False, placement="pre", edits=tuple(edits), moves=moves,
                notes=("every norm keeps its module and weights; the stream between branches is no longer "
                       "normalised, so the model is not the original's function: heal it",))


def _call_line(source: Path, class_name: str, child: str) -> int:
    """The line of the one call of ``self.<child>`` in ``class_name.forward``."""
    forward = forward_of(ast.parse(source.read_text(encoding="utf-8")), class_name)
    lines = [node.lineno for node in ast.walk(forward) if isinstance(node, ast.Call)
             and ast.unparse(node.func) == f"self.{child}"]
    if len(lines) != 1:
        raise PlanError(f"{class_name}.forward calls self.{child} {len(lines)} times, so there is no one call whose "
                        "input the norm moved onto that branch can wrap")
    return lines[0]


def _norms_read(layer: Layer) -> list[NormSite]:
    """The norm each sublayer's branch reads in the Pre-Norm form: the first sublayer the layer's first norm, every
    later one the norm after the add before it; refused where the layer is not that shape."""
    subs = layer.sublayers
    reads: list[NormSite] = []
    for index, sub in enumerate(subs):
        own = sub.norms_in("pre") if index == 0 else subs[index - 1].norms_in("post")
        extra = [norm.path for norm in sub.norms if norm.slot == "out" or (index and norm.slot == "pre")]
        if len(own) != 1 or extra or len(sub.branches) != 1 or not sub.branches[0].entry:
            raise PlanError(f"sublayer {index} of {layer.path} is not one branch that reads the stream after exactly "
                            "one norm of the stream, so the norm shift one layer off has no norm to move onto it")
        reads.append(own[0])
    if subs[-1].norms_in("post"):
        raise PlanError(f"{layer.path} normalises the stream after its last add and again where the next layer starts")
    return reads
