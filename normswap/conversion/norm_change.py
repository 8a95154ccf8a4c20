"""Which norm-kind conversion a model takes: one choice, shared by the API and the command line."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..detect import inspect
from ..errors import NormswapError
from .approximate_kind import (
    convert_offset_to_rms_norm,
    convert_to_layer_norm_approximate,
    convert_to_rms_norm_approximate,
)
from .extra_dimension import convert_to_layer_norm_exact
from .norm_kind import convert_to_rms_norm


def convert_norm_kind(model: nn.Module, norm: str, *, exact: bool = False, untie: bool = False,
                      inputs: dict[str, torch.Tensor] | None = None) -> tuple[nn.Module, Any, Any, Any]:
    """(converted model, plan, report, generated module) for ``norm`` = ``"rmsnorm"`` or ``"layernorm"``.

    rmsnorm: Gemma's (1 + w) norms become plain RMSNorms (exact), Post-LN models convert approximately,
    Pre-LN models exactly. layernorm: exactly by one extra dimension with ``exact``, else approximately.
    """
    if norm == "rmsnorm":
        topology = inspect(model)
        if {n.kind for n in topology.all_norms} == {"rmsnorm-offset"}:
            return convert_offset_to_rms_norm(model, inputs)
        if topology.placement == "post":
            return convert_to_rms_norm_approximate(model, inputs)
        return convert_to_rms_norm(model, inputs, untie=untie)
    if norm == "layernorm":
        return convert_to_layer_norm_exact(model, inputs) if exact else convert_to_layer_norm_approximate(model, inputs)
    raise NormswapError(f"norm={norm!r}: choose 'rmsnorm' or 'layernorm'")
