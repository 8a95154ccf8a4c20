"""Norm-free models (``--norm none``) and Dynamic Tanh (``--norm dyt``): docs/design.md §10.

Every residual norm (embedding, pre, post, out and final norms; not the q/k norms inside a branch, which are
not on the residual path) is replaced:

* ``none``: by its calibrated stand-in ``NormswapStandIn``, the fixed map ``g * x / s + b`` (``g = 1 + w`` for
  Gemma-style offset norms), ``s`` the mean per-token RMS (LayerNorm: standard deviation) of the norm's input
  over calibration tokens. It computes no statistic of the token.
* ``dyt``: by ``NormswapDyT``, ``g * tanh(alpha x) + b``, with one learnable scalar ``alpha`` started at ``1 / s``,
  so that tanh's linear regime is the stand-in.

Where the stand-in lives: it stays a module in the norm's place, with weight ``g / s``, rather than being folded
into the norm's neighbours. The fold is exact for a pre or final norm whose readers are linear maps, but: folding
the final norm into a tied ``lm_head`` (GPT-2, Gemma) would untie the embeddings; a reader without a bias cannot
take a LayerNorm's bias; a Post-LN norm sits on the stream itself, which every later layer reads and writes, so
no single neighbour can take it; and a stand-in of its own keeps ``g / s`` (and DyT's ``alpha``) plain tensors in
the checkpoint that healing trains, at the place the teacher's norm output is matched. The cost is one
elementwise product per token and norm.

A LayerNorm also subtracts the token's mean. On a Pre-LN model the stream's writers are centred first (the exact
step of LayerNorm -> RMSNorm, ``stream_centring``), so every norm reads a zero-mean input and the stand-in or DyT
needs no mean subtraction. Where the stream cannot be centred (Post-LN: a norm reads ``h + F(h)`` with ``h`` the
previous norm's output ``g * n + b``), the stand-in keeps the mean subtraction as the fixed projection
``x - mean(x)`` it is; DyT, which is ``g * tanh(alpha x) + b`` by definition, drops it, and the plan says so.

Both are ``exact: false``: a fixed ``1 / s`` equals a token's normalisation only where that token's own scale is
``s``, and tanh saturates where a norm would divide. Heal the result (``normswap heal``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..codegen.derive import list_item_class, norm_owner, require_plain_norm
from ..codegen.edits import ReplaceNormClass
from ..detect import inspect
from ..errors import NormswapError, first_line
from ..topology import OFFSET_NORM_KINDS, NormSite, Topology
from .calibration import CalibrationSite
from .compose import compose
from .passes import Pass, PassMove, Scales
from .program import Step, combine, constant, one_plus
from .registry import NormKind
from .setup import ConversionSetup
from .stream_centring import centring_pass

NORM_FREE_KINDS = ("none", "dyt")
_LAYER_NORMS = frozenset({"layernorm", "layernorm-nobias", "layernorm-noaffine", "layernorm-offset"})
_RMS_NORMS = frozenset({"rmsnorm", "rmsnorm-offset", "rmsnorm-noaffine"})


def exact_refusal(norm: str) -> str:
    """Why ``--norm none|dyt`` cannot be ``--exact``: one line."""
    if norm == "dyt":
        return ("--norm dyt cannot be exact: DyT's g * tanh(a x) + b saturates where a norm divides each token by its "
                "own scale, so no weights make it the token-wise normalisation; leave out --exact and heal the result")
    return ("--norm none cannot be exact: a norm's stand-in multiplies every token by one fixed 1/s, which is the "
            "token-wise normalisation only on tokens whose own scale is s; leave out --exact and heal the result")


def residual_norm_sites(topology: Topology) -> tuple[NormSite, ...]:
    """Every norm on the residual path, once each: embedding, sublayer (pre, post, out) and final norms."""
    embedding = [stack.embedding_norm for stack in topology.stacks if stack.embedding_norm is not None]
    found = {norm.path: norm for norm in (*embedding, *topology.stream_norms) if norm.kind != "identity"}
    return tuple(found.values())


def calibration_site(norm: NormSite) -> CalibrationSite:
    """Where the norm's ``s`` is measured: its input's mean per-token standard deviation (LayerNorm) or RMS."""
    statistic = "std" if norm.kind in _LAYER_NORMS else "rms"
    return CalibrationSite(norm.path, "input", statistic, norm.axis, float(norm.eps or 0.0))


def norm_groups(topology: Topology) -> dict[str, tuple[str, ...]]:
    """The names ``--only`` picks each residual norm by: ``embedding`` and ``final``; a sublayer's norm by its
    sublayer's kind (``attention``, ``mlp``), its slot (``pre``, ``post``, ``out``) and both (``mlp:pre``)."""
    groups: dict[str, tuple[str, ...]] = {}
    for stack in topology.stacks:
        for norm, name in ((stack.embedding_norm, "embedding"), (stack.final_norm, "final")):
            if norm is not None:
                groups[norm.path] = (name,)
    for layer in topology.layers:
        for sub in layer.sublayers:
            for norm in sub.norms:
                names = (sub.kind, norm.slot, f"{sub.kind}:{norm.slot}")
                groups[norm.path] = tuple(dict.fromkeys((*groups.get(norm.path, ()), *names)))
    return groups


def chosen_sites(topology: Topology, sites: tuple[NormSite, ...], only: tuple[str, ...]) -> tuple[NormSite, ...]:
    """The sites ``only`` names (all of them where it is empty), in model order; a name no residual norm answers to
    is refused with the names there are, so that a staged removal cannot skip a group by a typo."""
    if not only:
        return sites
    groups = norm_groups(topology)
    known = sorted({name for site in sites for name in groups.get(site.path, ())})
    unknown = [name for name in only if name not in known]
    if unknown:
        raise NormswapError(f"--only {','.join(unknown)}: no residual norm of {topology.model_type} left to replace is "
                            f"called that; its groups are {', '.join(known)}")
    return tuple(site for site in sites if set(groups.get(site.path, ())) & set(only))


def stand_in_pass(model: nn.Module, topology: Topology, centred: bool, why_not: str = "",
                  only: tuple[str, ...] = ()) -> Pass:
    """Each residual norm (of the groups ``only`` names) -> ``NormswapStandIn`` (weight ``g / s``, bias kept).
    ``centred``: the stream has zero mean (a centring pass ran first), so a LayerNorm's stand-in needs no mean
    subtraction; else ``why_not``."""
    sites = chosen_sites(topology, _replaceable(model, topology), only)
    keeps_mean = [norm for norm in sites if norm.kind in _LAYER_NORMS and not centred]
    edits = tuple(dict.fromkeys(_replacement(model, norm, "NormswapStandIn", centre=norm in keeps_mean)
                                for norm in sites))

    def rewrite(steps: dict[str, Step], scales: Scales) -> None:
        for norm in sites:
            scale = scales[calibration_site(norm)].scale
            steps[f"{norm.path}.weight"] = combine(lambda g, scale=scale: (g.double() / scale).to(g.dtype),
                                                   _plain_weight(norm, steps))

    notes = (f"the stand-ins of {len(keeps_mean)} LayerNorm(s) keep the mean subtraction x - mean(x), a fixed "
             f"projection, since the stream is not centred: {why_not}",) if keeps_mean else ()
    return Pass("every residual norm -> its calibrated stand-in g * x / s + b", exact=False, placement="none",
                edits=edits, rewrite=rewrite, calibration=tuple(calibration_site(norm) for norm in sites),
                moves=tuple(PassMove("replace", norm.path, site=calibration_site(norm),
                                     note=f"{norm.slot} norm -> stand-in") for norm in sites),
                helpers=frozenset({"stand_in"}), notes=notes)


def dyt_pass(model: nn.Module, topology: Topology, centred: bool, why_not: str = "",
             only: tuple[str, ...] = ()) -> Pass:
    """Each residual norm (of the groups ``only`` names) -> ``NormswapDyT`` (weight ``g``, bias kept, ``alpha = 1 /
    s``). ``centred``: as for ``stand_in_pass``; where a LayerNorm's stream is not centred (``why_not``), its DyT
    drops the mean subtraction."""
    sites = chosen_sites(topology, _replaceable(model, topology), only)
    edits = tuple(dict.fromkeys(_replacement(model, norm, "NormswapDyT") for norm in sites))

    def rewrite(steps: dict[str, Step], scales: Scales) -> None:
        for norm in sites:
            scale = scales[calibration_site(norm)].scale
            steps[f"{norm.path}.weight"] = _plain_weight(norm, steps)
            steps[f"{norm.path}.alpha"] = constant(lambda scale=scale: torch.tensor([1.0 / scale], dtype=torch.float64))

    dropped = [norm.path for norm in sites if norm.kind in _LAYER_NORMS and not centred]
    notes = (f"DyT drops the mean subtraction of {len(dropped)} LayerNorm(s) ({dropped[0]}, ...): tanh(a x) does not "
             f"subtract a token's mean, and the stream is not centred: {why_not}",) if dropped else ()
    return Pass("every residual norm -> DyT g * tanh(a x) + b, a = 1 / s", exact=False, placement="none",
                edits=edits, rewrite=rewrite, calibration=tuple(calibration_site(norm) for norm in sites),
                moves=tuple(PassMove("replace", norm.path, site=calibration_site(norm),
                                     note=f"{norm.slot} norm -> DyT") for norm in sites),
                helpers=frozenset({"dyt"}), notes=notes)


def _norm_free_kind(name: str, description: str) -> NormKind:
    return NormKind(name, lambda model, _topology, _exact, _untie: plan_norm_free(model, name),
                    exact_refusal=exact_refusal(name), removes_norms=True, description=description,
                    plan_some=lambda model, only: plan_norm_free(model, name, only))


NORM_KINDS = (
    _norm_free_kind("none", "every residual norm its calibrated stand-in g * x / s + b (docs/design.md §10); "
                    "approximate"),
    _norm_free_kind("dyt", "Dynamic Tanh g * tanh(a x) + b, a started at 1 / s (docs/design.md §10); approximate"),
)


def plan_norm_free(model: nn.Module, norm: str, only: tuple[str, ...] = ()) -> ConversionSetup:
    """The setup for ``norm`` = ``"none"`` or ``"dyt"`` on a loaded or meta-device ``model``: a centring pass first
    where the model is Pre-LN (exact), then the replacement pass (approximate), composed into one conversion.
    ``only``: replace the norms of these groups (``norm_groups``) and keep the others, one stage of a staged
    removal (docs/design.md §10)."""
    if norm not in NORM_FREE_KINDS:
        raise NormswapError(f"norm={norm!r}: choose 'none' or 'dyt'")
    topology = inspect(model)
    passes: list[Pass] = []
    why_not = ""
    if any(site.kind in _LAYER_NORMS for site in residual_norm_sites(topology)):
        try:
            passes.append(centring_pass(model, topology))
        except NormswapError as error:  # Post-LN, or a structure the exact centring cannot keep: say which
            why_not = (f"{topology.model_type} is Post-LN, where a norm reads the previous norm's output g * n + b, "
                       "whose mean no weight change removes" if topology.placement == "post" else first_line(error))
    make = stand_in_pass if norm == "none" else dyt_pass
    passes.append(make(model, topology, centred=bool(passes), why_not=why_not, only=only))
    which = f" ({', '.join(only)} only)" if only else ""
    return compose(model, topology, passes, f"norm {topology.norm} -> {norm}{which} (calibrated, approximate)")


def _replaceable(model: nn.Module, topology: Topology) -> tuple[NormSite, ...]:
    sites = residual_norm_sites(topology)
    if not sites:
        raise NormswapError(f"{topology.model_type} has no residual norm to remove")
    other = sorted({site.kind for site in sites} - _LAYER_NORMS - _RMS_NORMS)
    if other:
        raise NormswapError(f"{topology.model_type} has residual norms of kind {', '.join(other)}, which have no "
                            "calibrated stand-in")
    for site in sites:
        require_plain_norm(model, site.path)
    return sites


def _replacement(model: nn.Module, norm: NormSite, new_class: str, centre: bool = False) -> ReplaceNormClass:
    """``<new_class>.like(<the norm as its code builds it>)``, with the width where the norm has no weight to
    read it from, the mean subtraction where it keeps one, and the axis of a channels-first norm."""
    keywords: tuple[tuple[str, str], ...] = ()
    if norm.kind in ("layernorm-noaffine", "rmsnorm-noaffine"):
        keywords += (("dim", repr(norm.dim)),)
    if centre:
        keywords += (("centre", "True"),)
    if norm.axis != -1:
        keywords += (("axis", repr(norm.axis)),)
    return ReplaceNormClass(*norm_owner(model, norm.path), new_class=new_class, keywords=keywords, wrap=True,
                            item_class=list_item_class(model, norm.path))


def _plain_weight(norm: NormSite, steps: dict[str, Step]) -> Step:
    """The norm's gain ``g`` as a plain weight: ``w``, ``1 + w`` for an offset norm, ones for a weightless one."""
    key = f"{norm.path}.weight"
    if key not in steps:
        return constant(lambda dim=norm.dim: torch.ones(dim, dtype=torch.float64))
    if norm.kind in OFFSET_NORM_KINDS:
        return combine(one_plus, steps[key])
    return steps[key]
