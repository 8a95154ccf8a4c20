"""Tell norm modules apart by what they compute, not by their class name.

A small CPU copy of each candidate module (its parameters are vectors of the
hidden size, so this is cheap even for 70B configs) is probed with random inputs:

* scale invariance ``N(a x) = N(x)``: every norm has it;
* unit RMS out: an L2 normalisation (``x / |x|``, RMS ``1 / sqrt(dim)``) is not a norm kind, though
  ``scales_to_unit_length`` tells it apart so that a refusal can name it;
* shift invariance ``N(x + c) = N(x)``: only mean-subtracting LayerNorm has it;
* weight 0 gives 0 (``w * n``) or ``n`` (Gemma's ``(1 + w) * n``);
* a bias parameter that is added, or none.

A norm that normalises the channel axis of a channels-first ``(batch, channels, length)`` tensor (SqueezeBERT's
``SqueezeBertLayerNorm`` transposes inside) is probed through the same checks on the tensor laid out so, and
records that axis: a norm that replaces it must normalise the same one.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..topology import NormKind

_NOT_NORMS = (nn.Linear, nn.Embedding, nn.Dropout, nn.modules.conv._ConvNd, nn.MultiheadAttention, nn.ModuleList)
_EPS_ATTRIBUTES = ("eps", "variance_epsilon", "epsilon", "variance_eps", "layer_norm_eps")
_TOLERANCE = 1e-3


@dataclass(frozen=True)
class NormInfo:
    """What a norm module computes."""

    kind: NormKind
    eps: float | None
    dim: int
    axis: int = -1  # the axis of its input it normalises: -1, or 1 for a channels-first tensor


# what normswap's own generated code puts in a removed norm's place (``--norm none``, ``--norm dyt``): a fixed affine
# map per channel, and Dynamic Tanh. Neither normalises (no scale invariance), so neither is a norm kind; detection
# sees the stream through them, as through a norm, so a norm-free model inspects as one ("no residual norms")
STAND_IN_CLASSES = frozenset({"NormswapStandIn", "NormswapDyT"})


def is_norm_stand_in(module: nn.Module) -> bool:
    """Whether ``module`` is what normswap put in a removed residual norm's place (``STAND_IN_CLASSES``)."""
    return type(module).__name__ in STAND_IN_CLASSES


def is_candidate(module: nn.Module) -> bool:
    """Childless modules whose parameters are at most two vectors of one length."""
    if isinstance(module, _NOT_NORMS) or type(module).__module__.startswith("torch.nn.modules.activation"):
        return False
    if any(True for _ in module.children()):
        return False
    params = list(module.parameters(recurse=False))
    if len(params) > 2 or any(p.dim() != 1 for p in params):
        return False
    return len({p.shape[0] for p in params}) <= 1


def classify_norm(module: nn.Module, hidden_size: int) -> NormInfo | None:
    """Return what ``module`` computes if it is a norm, else None. ``nn.Identity`` gives ``identity``."""
    if isinstance(module, nn.Identity):
        return NormInfo("identity", None, hidden_size)
    if not is_candidate(module):
        return None
    dim = _normalized_size(module, hidden_size)
    try:
        return _probe(_cpu_copy(module), dim)
    except Exception:  # noqa: BLE001 - a module that cannot run on a (.., dim) tensor is not a norm
        pass
    try:
        found = _probe(_ChannelsFirst(_cpu_copy(module)), dim)
    except Exception:  # noqa: BLE001 - nor on a (batch, dim, length) one
        return None
    return replace(found, axis=1) if found is not None else None


class _ChannelsFirst(nn.Module):
    """``module`` fed ``(batch, dim, length)`` from a ``(batch, length, dim)`` probe, and its output laid back, so
    that the probe's checks along the last axis read a norm of the channel axis."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        for name, param in module.named_parameters(recurse=False):
            self.register_parameter(name, param)  # the probe sets the norm's own weight and bias by name
        for name in _EPS_ATTRIBUTES:
            if hasattr(module, name):
                setattr(self, name, getattr(module, name))
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.transpose(1, 2)).transpose(1, 2)


def scales_to_unit_length(module: nn.Module, dim: int) -> bool:
    """Whether ``module`` maps every vector to length 1 (``x / |x|``, nGPT's hidden states on the unit sphere).

    Not a norm kind: its output's RMS is ``1 / sqrt(dim)``, and no conversion maps it. Told apart so that a layer
    whose stream passes through one is refused by that name rather than as "no residual add"."""
    if not is_candidate(module) or any(True for _ in module.parameters(recurse=False)):
        return False
    try:
        with torch.no_grad():
            x = torch.randn(3, 5, dim, generator=torch.Generator().manual_seed(0)) * 3.0 + 0.7
            out = _cpu_copy(module)(x)
    except Exception:  # noqa: BLE001 - a module that cannot run on a (.., dim) tensor normalises nothing
        return False
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        return False
    length = out.pow(2).sum(-1).sqrt()
    return torch.allclose(length, torch.ones_like(length), atol=1e-2)


def _normalized_size(module: nn.Module, hidden_size: int) -> int:
    own = own_size(module)
    return hidden_size if own is None else own


def own_size(module: nn.Module) -> int | None:
    """The size a module's weights or ``normalized_shape`` fix; None for a weightless one that takes any size."""
    for param in module.parameters(recurse=False):
        return int(param.shape[0])
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, (tuple, list)) and len(shape) == 1:
        return int(shape[0])
    if isinstance(shape, int):
        return shape
    return None


def _cpu_copy(module: nn.Module) -> nn.Module:
    clone = copy.deepcopy(module)
    if any(t.is_meta for t in [*clone.parameters(), *clone.buffers()]):
        clone = clone.to_empty(device="cpu")
    clone = clone.to(torch.float32)
    clone.eval()
    return clone


def _split_parameters(module: nn.Module) -> tuple[nn.Parameter | None, nn.Parameter | None]:
    weight = bias = None
    for name, param in module.named_parameters(recurse=False):
        if "bias" in name or "beta" in name:
            bias = param
        elif weight is None:
            weight = param
        else:
            bias = param
    return weight, bias


@torch.no_grad()
def _probe(module: nn.Module, dim: int) -> NormInfo | None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, dim, generator=generator) * 3.0 + 0.7
    weight, bias = _split_parameters(module)
    if bias is not None:
        bias.zero_()

    if weight is not None:
        weight.fill_(1.0)
    unit = module(x)
    if not isinstance(unit, torch.Tensor) or unit.shape != x.shape:
        return None
    offset = False
    if weight is not None:
        weight.zero_()
        at_zero = module(x)
        if torch.allclose(at_zero, torch.zeros_like(at_zero), atol=_TOLERANCE):
            weight.fill_(1.0)
        elif torch.allclose(at_zero * 2, unit, atol=_TOLERANCE, rtol=_TOLERANCE):
            offset = True
            unit = at_zero
        else:
            return None
    normalised = unit

    # every norm is scale invariant and puts out unit RMS (up to eps)
    if not torch.allclose(module(2.5 * x), module(x), atol=_TOLERANCE, rtol=_TOLERANCE):
        return None
    rms = normalised.pow(2).mean(-1).sqrt()
    if not torch.allclose(rms, torch.ones_like(rms), atol=1e-2):
        return None
    mean_subtracting = torch.allclose(module(x + 4.0), module(x), atol=_TOLERANCE, rtol=_TOLERANCE)

    if weight is not None and not _weight_multiplies(module, x, weight, normalised, offset):
        return None
    if bias is not None and not _bias_adds(module, x, bias, weight, offset):
        return None

    if mean_subtracting:
        kind: NormKind = "layernorm" if bias is not None else ("layernorm-nobias" if weight is not None
                                                                  else "layernorm-noaffine")
        if offset:  # Nemotron's LayerNorm1P: (1 + w) * n + b
            kind = "layernorm-offset"
    elif weight is None:
        kind = "rmsnorm-noaffine"
    else:
        kind = "rmsnorm-offset" if offset else "rmsnorm"
    return NormInfo(kind, _eps(module, dim, mean_subtracting), dim)


def _weight_multiplies(module: nn.Module, x: torch.Tensor, weight: nn.Parameter, normalised: torch.Tensor,
                       offset: bool) -> bool:
    gamma = torch.linspace(0.5, 1.5, weight.shape[0])
    weight.copy_(gamma - 1.0 if offset else gamma)
    scaled = module(x)
    weight.fill_(0.0 if offset else 1.0)
    return torch.allclose(scaled, normalised * gamma, atol=_TOLERANCE, rtol=_TOLERANCE)


def _bias_adds(module: nn.Module, x: torch.Tensor, bias: nn.Parameter, weight: nn.Parameter | None,
               offset: bool) -> bool:
    before = module(x)
    beta = torch.linspace(-1.0, 1.0, bias.shape[0])
    bias.copy_(beta)
    shifted = module(x)
    bias.zero_()
    return torch.allclose(shifted, before + beta, atol=_TOLERANCE, rtol=_TOLERANCE)


def _eps(module: nn.Module, dim: int, mean_subtracting: bool) -> float | None:
    """The eps attribute where the module has one, else a float64 measurement of it."""
    for name in _EPS_ATTRIBUTES:
        value = getattr(module, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return _measure_eps(module, dim, mean_subtracting)


def _measure_eps(module: nn.Module, dim: int, mean_subtracting: bool) -> float | None:
    """From ``|N(s z)| = |z| s / sqrt(s^2 + eps)`` for a zero-mean, unit-RMS ``z``."""
    module = module.double()
    z = torch.linspace(-1.0, 1.0, dim, dtype=torch.float64)
    z = z - z.mean() if mean_subtracting else z
    z = z / z.pow(2).mean().sqrt()
    for scale_squared in (1e-6, 1e-3, 1.0):
        scale = math.sqrt(scale_squared)
        out = module(z * scale)
        ratio = float(out.pow(2).mean().sqrt())  # = s / sqrt(s^2 + eps) (weight 1, bias 0)
        if 0.0 < ratio < 1.0 - 1e-9:
            # modules that compute in fp32 blur the last digits: keep the 3 significant ones (1e-05, not 9.99999e-06)
            return float(f"{max(scale_squared / ratio**2 - scale_squared, 0.0):.3g}")
    return None
