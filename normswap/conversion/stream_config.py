"""The config that sizes the residual stream, and the field its norms take eps from (docs/design.md §5).

The extra-dimension map writes ``hidden_size = d+1`` and ``eps' = eps * d/(d+1)`` into the family's config; a
composite's values go into the sub-config its language model is built from, so both are looked up there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import NormswapError
from ..topology import Topology

_EPS_FIELDS = ("rms_norm_eps", "norm_eps", "layer_norm_eps", "layer_norm_epsilon", "rms_norm_epsilon", "eps",
               "norm_epsilon")


@dataclass(frozen=True)
class StreamConfig:
    """The config that sizes the residual stream: the model's own, or the sub-config its language model is built
    from (a composite's ``text_config``), where ``hidden_size`` and the norms' eps live and the wider values go."""

    field: str | None  # the sub-config's name in the model's config; None for the model's config itself
    config: Any
    path: str  # the module built from it (``model``, a composite's ``model.language_model``); "" for the model


def stream_config(model: nn.Module, topology: Topology) -> StreamConfig:
    """The config of the module that holds the layer stack (the nearest one that has a config), named as the
    model's config names it."""
    path = topology.stacks[0].path
    owner = model
    while path:
        candidate = model.get_submodule(path)
        if getattr(candidate, "config", None) is not None:
            owner = candidate
            break
        path = path.rpartition(".")[0]
    config = owner.config
    if config is model.config:
        return StreamConfig(None, config, path)
    for name in getattr(model.config, "sub_configs", {}) or {}:
        if getattr(model.config, name, None) is config:
            return StreamConfig(name, config, path)
    raise NormswapError(f"{topology.model_type}'s language model is built from a config that is none of "
                        f"{type(model.config).__name__}'s sub-configs, so its wider hidden_size has nowhere to go")


def eps_field(config: Any, topology: Topology, family: str) -> str:
    """The config field the norms take their eps from (Llama's ``rms_norm_eps``, CpmAnt's ``eps``): the wider
    LayerNorms need it set to eps * d/(d+1). ``config`` is the stream's (``stream_config``)."""
    values = {norm.eps for norm in topology.stream_norms if norm.eps is not None}
    for name in _EPS_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, float) and all(math.isclose(value, eps) for eps in values):
            return name
    raise NormswapError(f"no field of {family}'s config holds its norms' eps ({', '.join(map(str, sorted(values)))}), "
                        "which the wider LayerNorms must take as eps * d/(d+1)")
