"""The modeling code this normswap writes for a checkpoint it generated, planned again from trusted inputs only.

A generated checkpoint ships ``modeling_normswap_<family>.py``; running a checkpoint's code needs
``--trust-remote-code``, unless that file is byte for byte what this normswap would write for it. To know
what it would write, the conversion is planned again the way ``convert`` planned it: the original family's
stock model is rebuilt on the meta device from the checkpoint's config.json (data, never code), and the
conversion its ``normswap`` provenance block names is planned on it. Nothing of the checkpoint runs here.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..codegen.package import GeneratedModule
from ..detect.source import config_from_dict
from ..errors import NormswapError
from .checkpoint import meta_model
from .route import plan_layout
from .setup import ConversionSetup


class RegenerationError(NormswapError):
    """The provenance names no conversion this normswap can plan again."""


@dataclass(frozen=True)
class ConversionRequest:
    """The ``convert`` options that plan one conversion, read back from its provenance line."""

    placement: str | None = None
    norm: str | None = None
    exact: bool = False
    untie: bool = False
    widened_from: int | None = None  # exact RMSNorm -> LayerNorm: the original hidden size d (written as d + 1)
    # whether that conversion wrote eps * d/(d+1) into the config's eps field; it keeps the field where norms beside
    # the stream read it too (Qwen3's q_norm), and writes the stream norms' eps into the code instead
    eps_field_scaled: bool = True
    native: bool = False  # a composed conversion's earlier pass may have gone to a stock family, a later one wrote code
    only: tuple[str, ...] = ()  # --norm none|dyt --only: the groups of norms it replaced


@dataclass(frozen=True)
class Regenerated:
    """What ``convert`` writes beside the weights for one reading of the provenance: the module, and auto_map."""

    generated: GeneratedModule
    auto_map: dict[str, str]


_PLACES = r"pre|post|parallel|sandwich|post-sublayer"
_PLACEMENT = re.compile(rf"placement (?:{_PLACES}|mixed) -> (?P<target>{_PLACES})(?: \(calibrated stand-ins\))?")
_THEN = "; then "
_NORM = re.compile(r"norm (?P<source>[a-z-]+) -> (?P<target>rmsnorm|layernorm|none|dyt)(?: \((?P<detail>.*)\))?")
_ONLY = re.compile(r"(?P<groups>[^()]+) only\) \(")  # "mlp, final only) (calibrated, approximate"
_WIDENED = re.compile(r"exact, hidden (?P<d>\d+) -> (?P<wider>\d+)\b.*")
_KEYS_NOT_CARRIED = ("auto_map", "normswap", "transformers_version", "_name_or_path")


def conversion_requests(conversion: str) -> list[ConversionRequest]:
    """The option sets that may have written ``conversion``; a composed conversion (passes joined by "; then ")
    was asked as one ``convert`` with the last placement pass's target and the norm pass's options, and its first
    pass may have had a native target."""
    parts = conversion.split(_THEN)
    if len(parts) == 1:
        return _single_requests(conversion)
    placements = [found["target"] for part in parts if (found := _PLACEMENT.fullmatch(part)) is not None]
    norms = [_single_requests(part) for part in parts if _PLACEMENT.fullmatch(part) is None]
    if len(norms) > 1:
        raise RegenerationError(f"its provenance names {len(norms)} norm-kind passes in {conversion[:80]!r}; a "
                                "conversion has at most one")
    placement = placements[-1] if placements else None
    return [dataclasses.replace(norm, placement=placement, native=native)
            for native in (True, False) for norm in (norms[0] if norms else [ConversionRequest()])]


def _single_requests(conversion: str) -> list[ConversionRequest]:
    """The option sets that may have written ``conversion`` (provenance ``conversion``), likeliest first.

    ``--untie`` is not in the line of an exact LayerNorm -> RMSNorm conversion but changes its code (the stream
    is centred in the embedding weights instead of in code), so both readings are offered.
    """
    if (placement := _PLACEMENT.fullmatch(conversion)) is not None:
        return [ConversionRequest(placement=placement["target"])]
    norm = _NORM.fullmatch(conversion)
    if norm is None:
        raise RegenerationError(f"its provenance names the conversion {conversion[:80]!r}, which this normswap does "
                                "not plan")
    detail = norm["detail"] or ""
    if norm["target"] in ("none", "dyt"):  # norm-free: one reading (the stream is centred wherever it can be)
        some = _ONLY.match(detail)
        return [ConversionRequest(norm=norm["target"], only=tuple(some["groups"].split(", ")) if some else ())]
    if norm["target"] == "rmsnorm":
        if norm["source"] == "layernorm" and not detail:
            return [ConversionRequest(norm="rmsnorm"), ConversionRequest(norm="rmsnorm", untie=True)]
        return [ConversionRequest(norm="rmsnorm")]
    if detail == "approximate":
        return [ConversionRequest(norm="layernorm")]
    widened = _WIDENED.fullmatch(detail)
    if widened is None or int(widened["wider"]) != int(widened["d"]) + 1:
        raise RegenerationError(f"its provenance names the conversion {conversion[:80]!r}, which this normswap does "
                                "not plan")
    return [ConversionRequest(norm="layernorm", exact=True, widened_from=int(widened["d"]), eps_field_scaled=scaled)
            for scaled in (True, False)]


def regenerate(data: dict[str, Any], origin: str) -> Iterator[Regenerated]:
    """The code ``convert`` would write for the checkpoint whose config.json holds ``data``, one reading of its
    provenance at a time (most checkpoints match the first; planning a reading costs about a conversion's
    planning). Raises ``RegenerationError`` or the planners' ``NormswapError`` where no reading plans."""
    provenance = data.get("normswap")
    original_type = provenance.get("source_model_type") if isinstance(provenance, dict) else None
    conversion = provenance.get("conversion") if isinstance(provenance, dict) else None
    if not isinstance(original_type, str) or not isinstance(conversion, str):
        raise RegenerationError("its normswap block does not name the source model type and the conversion")
    refusal: NormswapError | None = None
    planned = 0
    for request in conversion_requests(conversion):
        try:
            config = original_config(data, original_type, request, origin)
            if isinstance(provenance.get("source_architectures"), list):
                config.architectures = list(provenance["source_architectures"])
            setup = _plan(config, request)
        except NormswapError as error:
            refusal = refusal or error
            continue
        planned += 1
        yield Regenerated(setup.generated, dict(setup.target_config.auto_map))  # type: ignore[arg-type]
    if not planned and refusal is not None:
        raise refusal


def original_config(data: dict[str, Any], original_type: str, request: ConversionRequest, origin: str) -> Any:
    """The stock config of the model that was converted: the written one, back in the original family
    (one dimension narrower again after an exact RMSNorm -> LayerNorm conversion)."""
    fields = {key: value for key, value in data.items() if key not in _KEYS_NOT_CARRIED}
    fields["model_type"] = original_type
    d = request.widened_from
    if d is not None:
        eps = fields.get("rms_norm_eps")  # absent where the family's norms take eps from their code (Pixtral)
        if fields.get("hidden_size") != d + 1 or not isinstance(eps, float | None):
            raise RegenerationError(f"its config is not the one an exact RMSNorm -> LayerNorm conversion of hidden "
                                    f"size {d} writes (hidden_size {d + 1} and a float rms_norm_eps, if any)")
        fields["hidden_size"] = d
        if request.eps_field_scaled and eps is not None:
            fields["rms_norm_eps"] = eps * (d + 1) / d  # the conversion wrote eps * d/(d+1)
    return config_from_dict(fields, f"{origin} (as its original {original_type} config)")


def _plan(config: Any, request: ConversionRequest) -> ConversionSetup:
    """The conversion planned as ``convert`` planned it; a placement that wrote code had no native target."""
    meta = meta_model(config, trust_remote_code=False)
    setup = plan_layout(meta, request.placement, request.norm, exact=request.exact, untie=request.untie,
                        native=request.native, only=request.only)
    if setup.generated is None:
        raise RegenerationError("planned again, its conversion writes no modeling code")
    return setup
