"""The config that sizes the residual stream, and the field its norms take eps from (docs/design.md §5).

The extra-dimension map writes ``hidden_size = d+1`` and ``eps' = eps * d/(d+1)`` into the family's config; a
composite's values go into the sub-config its language model is built from, so both are looked up there. A norm
whose eps no config field reaches gets its wider eps written into the generated code instead, and so does every
stream norm where the field also reaches a norm that is not the stream's (Qwen3's q_norm/k_norm over head_dim, a
gated delta net's output norm): scaling the field would scale those norms' eps too, and the map leaves them as they
are, so the field keeps its value for them. Where such a norm's input is small (a delta net's output, ~1e-4), its
eps is no rounding matter: 1e-6 -> 1e-6 * 64/65 moved LaraMini's logits by 6e-3 x max|reference|.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..detect.source import quiet_transformers
from ..errors import NormswapError
from ..topology import NormSite, Topology

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
    if type(config) is type(model.config):  # a stack built from a copy of the model's config (T5's encoder)
        return StreamConfig(None, model.config, "")
    for name in getattr(model.config, "sub_configs", {}) or {}:
        if getattr(model.config, name, None) is config:
            return StreamConfig(name, config, path)
    raise NormswapError(f"{topology.model_type}'s language model is built from a config that is none of "
                        f"{type(model.config).__name__}'s sub-configs, so its wider hidden_size has nowhere to go")


def eps_sources(model: nn.Module, stream: StreamConfig, topology: Topology) -> tuple[str | None, list[NormSite]]:
    """Where the stream norms take their eps from: the config field that some of them read (Llama's
    ``rms_norm_eps``, CpmAnt's ``eps``), None where none does, and the norms that do not read it (JetMoE's layer
    norms take a default argument; only its final norm reads ``rms_norm_eps``). The wider LayerNorms need
    eps * d/(d+1): the field is scaled, and the other norms get theirs written into the code. Where the field
    also sets the eps of a module that is no stream norm, no field is returned and every stream norm's eps goes
    into the code, so that module keeps its own.

    A field is a candidate when its value is some norm's eps; which norms read it is found by building the model
    on the meta device with the field doubled and seeing which norms take the new value."""
    norms = [norm for norm in topology.stream_norms if norm.eps is not None]
    for name in _EPS_FIELDS:
        value = getattr(stream.config, name, None)
        if not isinstance(value, float) or not any(math.isclose(value, norm.eps) for norm in norms):
            continue
        config = copy.deepcopy(model.config)
        setattr(getattr(config, stream.field) if stream.field else config, name, 2 * value)
        with torch.device("meta"), quiet_transformers():
            probe = type(model)._from_config(config)
        others = [norm for norm in norms if not math.isclose(eps_of(probe.get_submodule(norm.path)), 2 * norm.eps)]
        if len(others) < len(norms):
            return (None, norms) if _read_beyond_stream(model, probe, topology, value) else (name, others)
    return None, norms


def _read_beyond_stream(model: nn.Module, probe: nn.Module, topology: Topology, value: float) -> bool:
    """Whether a module that is no stream norm took its eps from the field: ``value`` in ``model``, and twice
    that in ``probe``, built with the field doubled."""
    stream = {norm.path for norm in topology.stream_norms}
    built = dict(probe.named_modules())
    for path, module in model.named_modules():
        twin = built.get(path)
        if path not in stream and twin is not None and math.isclose(eps_of(module), value) and math.isclose(
                eps_of(twin), 2 * value):
            return True
    return False


def eps_of(norm: nn.Module) -> float:
    values = [getattr(norm, name, None) for name in ("eps", "variance_epsilon", "epsilon")]
    return next((value for value in values if isinstance(value, float)), math.nan)
