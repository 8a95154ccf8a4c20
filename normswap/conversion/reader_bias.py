"""A bias for a linear map that has none, where a dropped LayerNorm's ``beta`` must go (docs/design.md §6).

Dropping a pre norm folds its stand-in ``g * C x / s + beta`` into the maps that read its output:
``W <- W diag(g) C / s`` and ``b <- b + W beta``. A map built without a bias (GPT-J's ``q_proj``, Falcon's
``query_key_value``) has no ``b`` for ``W beta``: the shift is a constant per output channel, so the map is given
one in the generated code (``GiveBias``), started at ``W beta``. Dropping an out norm puts ``beta`` on one bias
among the writers of its input; where none has one (StableLM's ``o_proj``), the first linear writer is given one.
The stock class, which has no such tensor, refuses the checkpoint rather than load it without (its removed norms'
placeholders make it refuse anyway).

Only an ``nn.Linear`` (or a subclass) whose forward adds ``self.bias`` when set takes one: that is checked by
running the module with a zero weight and a bias of ones, on the meta-device model too.
"""

from __future__ import annotations

import inspect as pyinspect
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from ..codegen.edits import GiveBias
from ..errors import NormswapError
from .program import Step, combine


class ReaderBiasError(NormswapError):
    """A linear map beside a dropped LayerNorm (a reader of its output, or the writer chosen to carry its ``beta``)
    has no bias and cannot be given one."""


def new_bias_key(model: nn.Module, weight: str, norm: str, reads: bool = True) -> str:
    """The key of the bias the linear map holding ``weight`` is given for ``norm``'s ``beta`` (``reads``: the map
    reads the norm's output; else it writes its input, and the bias carries ``beta`` through the fold of an out
    norm); raises ``ReaderBiasError`` with the reason where it cannot take one."""
    cannot = (f"{weight} reads {norm}, whose bias beta folds into its readers' biases (b <- b + W beta), and has none"
              if reads else f"{weight} writes the input of {norm}, whose bias beta needs a bias among its writers, "
              "and has none")
    path = weight.removesuffix(".weight")
    if path == weight:
        raise ReaderBiasError(f"{cannot}; it is not a module's weight, so none can be added")
    module = model.get_submodule(path)
    if not isinstance(module, nn.Linear) or module.bias is not None:
        raise ReaderBiasError(f"{cannot}; it is a {type(module).__name__}, not a linear map without a bias, so none "
                              "can be added")
    owner = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
    if type(owner).__module__ != type(model).__module__:
        raise ReaderBiasError(f"{cannot}; it is built by {type(owner).__name__}, outside the family's modeling file, "
                              "so the generated code cannot give it one")
    if not _adds_bias(module):
        raise ReaderBiasError(f"{cannot}; its forward ({type(module).__name__}) ignores a bias, so none can be added")
    return f"{path}.bias"


def _adds_bias(module: nn.Linear) -> bool:
    """Whether ``module``'s forward adds ``self.bias`` once set: with a zero weight and a bias of ones it must
    return ones (run on CPU tensors, whatever device the module is on)."""
    weight = torch.zeros(module.weight.shape)
    ones = torch.ones(module.weight.shape[0])
    try:
        out = functional_call(module, {"weight": weight, "bias": ones}, (torch.zeros(2, module.weight.shape[1]),))
    except Exception:  # noqa: BLE001  a forward that cannot run alone on plain tensors is not known to add it
        return False
    return isinstance(out, torch.Tensor) and bool(torch.equal(out, ones.expand(2, -1)))


def given_biases(model: nn.Module, new_biases: Sequence[str]) -> tuple[tuple[GiveBias, ...], tuple[str, ...]]:
    """The edits that build each of ``new_biases``' modules with a bias, and every bias they give, each to start at
    0: a class's code builds every instance of it, so the same attribute of other instances (Whisper's
    cross-attention ``k_proj``, beside the self-attention one that reads the dropped norm) gets a bias too."""
    builders: dict[tuple[type, str], None] = {}
    for bias in new_biases:
        path = bias.removesuffix(".bias")
        owner = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
        builders[(_builder(type(owner), path.rsplit(".", 1)[-1]), path.rsplit(".", 1)[-1])] = None
    edits = tuple(GiveBias(cls.__name__, attribute) for cls, attribute in builders)
    given = [f"{name}.{attribute}.bias".removeprefix(".") for name, owner in model.named_modules()
             for cls, attribute in builders if isinstance(owner, cls)
             and isinstance(getattr(owner, attribute, None), nn.Linear) and getattr(owner, attribute).bias is None]
    return edits, tuple(given)


def _builder(cls: type, attribute: str) -> type:
    """The class whose own ``__init__`` builds ``self.<attribute>``: ``cls`` or the base it inherits that
    ``__init__`` from (Data2Vec-vision's SDPA attention builds its ``key`` in the eager class's ``__init__``)."""
    for base in cls.__mro__:
        init = base.__dict__.get("__init__")
        if init is None or base.__module__ != cls.__module__:
            continue
        try:
            if f"self.{attribute} =" in pyinspect.getsource(init):
                return base
        except (OSError, TypeError):
            break
    return cls


def zero_bias(steps: Mapping[str, Step], bias: str) -> Step:
    """The given ``bias``, 0 and sized by its map's output channels (dimension 0 of its weight), in the weight's
    dtype: the ``b`` that a fold (``b <- b + W beta``, or ``beta`` on its carrier) then fills."""
    return combine(lambda matrix: torch.zeros(matrix.shape[0], dtype=matrix.dtype),
                   steps[bias.removesuffix(".bias") + ".weight"])
