"""Calibrated scales: the typical size of what a norm reads, measured on real tokens (docs/design.md §9).

A norm that a conversion removes becomes its *stand-in*, the linear map it is on a typical token
(RMSNorm ``g * x / s``, LayerNorm ``g * (x - mean x) / s + b``), and a norm that a conversion adds starts
with weight ``s``, so that on a typical token it is the identity. Both need ``s``: the mean over the
calibration tokens of each token's RMS (LayerNorm: standard deviation) of the tensor at that site.

The source model runs once on the probe inputs with hooks on the measured modules; padding is excluded
through the attention mask. The model may be loaded in memory or offloaded to disk (weights read one
module at a time, as verification does): hooks see the same tensors either way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..errors import NormswapError
from .repeatable import same_random_draws

Side = Literal["input", "output"]
Statistic = Literal["rms", "std"]


class CalibrationError(NormswapError):
    """A calibration site saw no tokens, or only non-finite ones."""


@dataclass(frozen=True)
class CalibrationSite:
    """Where a scale is measured: the input or the output of ``module``, over its channel ``axis``.

    ``statistic`` is ``rms`` for an RMSNorm (or a norm-free site) and ``std`` for a LayerNorm, whose stand-in
    subtracts the mean first. ``eps`` is the norm's own, so that ``s`` is what the norm divides by.
    ``channel_scale``: the key of a parameter that multiplies the tensor channel by channel on its way to the norm
    (BEiT's layer scale ``lambda_1 * attention_output``), applied before the statistic.
    """

    module: str
    side: Side
    statistic: Statistic = "rms"
    axis: int = -1
    eps: float = 0.0
    channel_scale: str = ""


@dataclass(frozen=True)
class CalibratedScale:
    """The measured ``s`` of one site: the mean per-token scale, how many tokens it averages, and their spread
    (coefficient of variation: how far a single token's own scale strays from ``s``, which is the stand-in's
    whole inexactness)."""

    site: CalibrationSite
    scale: float
    tokens: int
    spread: float

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self.site), "scale": self.scale, "tokens": self.tokens, "spread": self.spread}


def calibrate(model: nn.Module, sites: Iterable[CalibrationSite], inputs: Mapping[str, torch.Tensor]
              ) -> dict[CalibrationSite, CalibratedScale]:
    """Run ``model`` once on ``inputs`` and measure every site (each call of a module that runs more than once)."""
    sites = list(dict.fromkeys(sites))
    if not sites:
        return {}
    mask = inputs.get("attention_mask")
    per_token: dict[CalibrationSite, list[torch.Tensor]] = {site: [] for site in sites}
    handles = []
    by_module: dict[str, list[CalibrationSite]] = {}
    for site in sites:
        by_module.setdefault(site.module, []).append(site)
    for path, module_sites in by_module.items():
        module = model.get_submodule(path)

        def measure(value: Any, side: Side, module_sites: list[CalibrationSite] = module_sites) -> None:
            tensor = _first_tensor(value)
            if tensor is None:
                return
            for site in module_sites:
                if site.side == side:
                    scaled = tensor * _channel_scale(model, site, tensor) if site.channel_scale else tensor
                    per_token[site].append(_token_scales(scaled, site, mask))

        handles.append(module.register_forward_pre_hook(
            lambda _m, args, kwargs, measure=measure: measure((args, kwargs), "input"), with_kwargs=True))
        handles.append(module.register_forward_hook(lambda _m, _args, output, measure=measure: measure(output,
                                                                                                      "output")))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), same_random_draws():
            model(**inputs)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return {site: _summarise(site, found) for site, found in per_token.items()}


def _channel_scale(model: nn.Module, site: CalibrationSite, tensor: torch.Tensor) -> torch.Tensor:
    """The site's per-channel scale, shaped to multiply ``tensor`` along its channel axis; read when the module
    runs, so that an offloaded model has loaded it."""
    scale = model.get_parameter(site.channel_scale).detach().to(tensor.device, tensor.dtype)
    shape = [1] * tensor.dim()
    shape[site.axis] = -1
    return scale.reshape(shape)


def _first_tensor(value: Any) -> torch.Tensor | None:
    """The module's main input or output: the first floating-point tensor, positional before keyword."""
    if isinstance(value, torch.Tensor):
        return value if value.is_floating_point() else None
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _token_scales(tensor: torch.Tensor, site: CalibrationSite, mask: torch.Tensor | None) -> torch.Tensor:
    """Each token's RMS (or standard deviation) over the channel axis, in float64; padding tokens dropped where
    the tensor's leading axes are the mask's (batch, positions), or those two flattened into one."""
    wide = tensor.detach().to(torch.float64).movedim(site.axis, -1)
    if site.statistic == "std":
        wide = wide - wide.mean(-1, keepdim=True)
    scales = (wide.pow(2).mean(-1) + site.eps).sqrt()
    if mask is not None and scales.shape == mask.shape:
        return scales[mask.to(scales.device).bool()].flatten()
    if mask is not None and scales.dim() == 1 and scales.numel() == mask.numel():  # OPT's MLP: (batch * positions, d)
        return scales[mask.to(scales.device).bool().flatten()]
    return scales.flatten()


def _summarise(site: CalibrationSite, found: list[torch.Tensor]) -> CalibratedScale:
    if not found:
        raise CalibrationError(f"{site.module} did not run on the calibration inputs, so the scale of its {site.side} "
                               "cannot be measured; pass --calib with text that reaches it")
    scales = torch.cat([part.cpu() for part in found])
    scales = scales[torch.isfinite(scales)]
    if scales.numel() == 0:
        raise CalibrationError(f"the {site.side} of {site.module} was NaN or Inf on every calibration token")
    mean = float(scales.mean())
    spread = float(scales.std() / mean) if scales.numel() > 1 and mean > 0 else 0.0
    if mean <= 0:
        raise CalibrationError(f"the {site.side} of {site.module} is zero on every calibration token, so no scale "
                               "makes a stand-in of it")
    return CalibratedScale(site, mean, int(scales.numel()), spread)
