"""Turn rewritten modeling source into a module that loads: absolute imports, a header, its own model_type.

The generated module subclasses the family's config under its own model_type, ``normswap-<family>-<digest>``,
and binds every model class to it, so a converted checkpoint never loads silently into the stock classes. The
digest is of the module's source: every layout is its own model_type, which the module registers with
transformers' Auto classes on import (a checkpoint of that model_type runs exactly this code).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect as pyinspect
import os
import re
import sys
from dataclasses import dataclass
from importlib.util import resolve_name
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from ..version import __version__
from .derive import CodegenError

if TYPE_CHECKING:
    from .composite import CompositeCode


@dataclass(frozen=True)
class GeneratedModule:
    """A generated modeling module: its file name, source and the names a checkpoint's config needs."""

    family: str
    file_name: str  # modeling_normswap_llama.py
    source: str
    config_class: str  # NormswapLlamaConfig
    model_type: str  # normswap-llama-<digest of source>
    model_classes: tuple[str, ...]

    @property
    def module_name(self) -> str:
        return self.file_name.removesuffix(".py")

    def auto_map(self, original_model_type: str) -> dict[str, str]:
        """``auto_map`` for config.json: AutoConfig plus every Auto class that maps the family to one of ours."""
        return {"AutoConfig": f"{self.module_name}.{self.config_class}",
                **{auto: f"{self.module_name}.{found}"
                   for auto, found in auto_classes(original_model_type, self.model_classes).items()}}


def auto_classes(original_model_type: str, model_classes: tuple[str, ...]) -> dict[str, str]:
    """Auto class name -> the class of ``model_classes`` it builds for the family ``original_model_type``: the
    classes config.json's ``auto_map`` names, and those the generated module registers for its own config class."""
    from transformers.models.auto import modeling_auto  # dir(transformers) would import every Auto class

    found_by_auto = {}
    for name in sorted(dir(modeling_auto)):
        auto = getattr(modeling_auto, name, None) if name.startswith("AutoModel") else None
        table = getattr(getattr(auto, "_model_mapping", None), "_model_mapping", None)
        named = table.get(original_model_type) if isinstance(table, dict) else None
        # a family may map one Auto class to several (Funnel: FunnelModel, FunnelBaseModel): the first we ship
        found = next((n for n in (named if isinstance(named, (tuple, list)) else (named,)) if n in model_classes),
                     None)
        if found is not None:
            found_by_auto[name] = found
    return found_by_auto


_RMS_NORM_CLASS = '''

class NormswapRMSNorm(torch.nn.Module):
    """RMSNorm that takes nn.LayerNorm's arguments, with an optional bias: LN(h) on a zero-mean stream.

    normswap centres every writer to the residual stream, so the LayerNorms that read it see zero-mean
    inputs, where LN(h) = w * h / sqrt(mean(h^2) + eps) + b exactly, with the same eps. ``axis`` 1 normalises
    the channels of a channels-first tensor, as the LayerNorm it replaces did (SqueezeBERT's).
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device=None, dtype=None,
                 axis=-1):
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.normalized_shape = shape
        self.eps = eps
        self.axis = axis
        factory = {"device": device, "dtype": dtype}
        self.weight = torch.nn.Parameter(torch.ones(shape, **factory)) if elementwise_affine else None
        self.bias = torch.nn.Parameter(torch.zeros(shape, **factory)) if elementwise_affine and bias else None

    @classmethod
    def like(cls, norm, eps=None, axis=-1, affine=False, width=None):
        """The RMSNorm standing in for ``norm``, a LayerNorm of any family's class built with its own
        arguments (their names differ: normalized_shape, hidden_size, dim): its shape, eps, weight and bias,
        normalising the ``axis`` it did; with ``affine``, a weight even where ``norm`` has none (a new norm that
        starts at a calibrated scale), ``width`` wide where ``norm`` records no shape (NanoChat's). A placeholder
        a conditional builds instead of a norm (``nn.Identity()``) stays what it is."""
        if isinstance(norm, torch.nn.Identity):
            return norm
        weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
        recorded = getattr(norm, "normalized_shape", None)
        shape = tuple(weight.shape) if weight is not None else tuple(recorded) if recorded is not None else (width,)
        if eps is None:
            eps = next(value for value in (getattr(norm, name, None) for name in ("eps", "variance_epsilon", "epsilon"))
                       if isinstance(value, float))
        factory = {"device": weight.device, "dtype": weight.dtype} if weight is not None else {}
        return cls(shape, eps, elementwise_affine=weight is not None or affine, bias=bias is not None, axis=axis,
                   **factory)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        channels_last = hidden_states.movedim(self.axis, -1) if self.axis != -1 else hidden_states
        normed = torch.nn.functional.rms_norm(channels_last, self.normalized_shape, self.weight, self.eps)
        normed = normed + self.bias if self.bias is not None else normed
        return normed.movedim(-1, self.axis) if self.axis != -1 else normed
'''


_LAYER_NORM_CLASS = '''

class NormswapLayerNorm(torch.nn.LayerNorm):
    """LayerNorm that takes an RMSNorm's ``(hidden_size, eps)`` arguments.

    normswap's exact RMSNorm -> LayerNorm map adds one hidden dimension: U (d+1 x d, orthonormal columns
    orthogonal to the all-ones vector) carries the stream to zero mean, where this LayerNorm with eps * d/(d+1)
    equals sqrt((d+1)/d) * U * RMSNorm; the readers' weights absorb the rest.
    """

    def __init__(self, hidden_size, eps=1e-6, **kwargs):
        super().__init__(hidden_size, eps=eps)

    @classmethod
    def like(cls, norm, eps=None, affine=False, width=None):
        """The LayerNorm standing in for ``norm``, an RMSNorm of any family's class built with its own
        arguments (their names differ: hidden_size, dim, config): its width and eps; with ``affine``, a weight
        even where ``norm`` has none (a new norm that starts at a calibrated scale, its width then
        ``norm.normalized_shape``, or ``width`` where it records none), and then no bias: a model of weightless
        norms has no bias that could take the norm's shift when it is removed again. A placeholder a
        conditional builds instead of a norm (``nn.Identity()``) stays what it is."""
        if isinstance(norm, torch.nn.Identity):
            return norm
        weight = getattr(norm, "weight", None)
        if eps is None:
            eps = next(value for value in (getattr(norm, name, None) for name in ("eps", "variance_epsilon", "epsilon"))
                       if isinstance(value, float))
        if weight is None and not affine:  # a weightless RMSNorm, which may know no width either (NanoChat's)
            return NormswapWeightlessLayerNorm(eps)
        if weight is not None:
            return cls(weight.shape[-1], eps=eps)
        recorded = getattr(norm, "normalized_shape", None)
        built = cls(recorded[-1] if recorded is not None else width, eps=eps)
        built.bias = None
        return built


class NormswapWeightlessLayerNorm(torch.nn.Module):
    """LayerNorm without weight or bias over the last dimension, whatever its width: it stands in for a weightless
    RMSNorm, which a family may build without a width (NanoChat's takes eps only)."""

    def __init__(self, eps=1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, hidden_states):
        return torch.nn.functional.layer_norm(hidden_states, hidden_states.shape[-1:], eps=self.eps)
'''


_EXTRA_DIMENSION_VALIDATOR = '''
    def validate(self):
        """The stock checks, except validate_architecture: hidden_size is heads * head_dim + 1 here."""
        for validator in getattr(type(self), "__class_validators__", ()):
            if validator.__name__ != "validate_architecture":
                validator(self)
'''


_PLAIN_RMS_NORM_CLASS = '''

class NormswapPlainRMSNorm(torch.nn.Module):
    """RMSNorm ``w * x / rms(x)`` that takes an offset RMSNorm's ``(dim, eps)`` arguments; computes in fp32.

    normswap replaces Gemma-style ``(1 + w) * x / rms(x)`` by this, with ``w := 1 + w``: the same function.
    """

    def __init__(self, dim, eps=1e-6, **kwargs):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        normed = torch.nn.functional.rms_norm(hidden_states.float(), (hidden_states.shape[-1],),
                                              self.weight.float(), self.eps)
        return normed.type_as(hidden_states)
'''


_STAND_IN_CLASS = '''

class NormswapStandIn(torch.nn.Module):
    """A residual norm's calibrated stand-in: ``weight * x + bias``, the linear map the norm is on a typical token.

    normswap removes the norm (``--norm none``): ``weight`` starts at ``g / s``, ``s`` the mean per-token RMS (for a
    LayerNorm, standard deviation) of the norm's input over calibration tokens, so a token whose own scale is ``s``
    comes out as the norm made it. It computes no statistic of the token: with ``centre`` it subtracts the token's
    mean first, the fixed projection ``x - mean(x)`` a LayerNorm applies, kept where the stream is not centred.
    """

    def __init__(self, dim, bias=True, centre=False, axis=-1, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.centre = centre
        self.axis = axis
        self.weight = torch.nn.Parameter(torch.ones(dim, **factory))
        self.bias = torch.nn.Parameter(torch.zeros(dim, **factory)) if bias else None

    @classmethod
    def like(cls, norm, dim=None, centre=False, axis=-1):
        """The stand-in for ``norm`` (any family's norm class, built with its own arguments): its width, and a bias
        where it has one. A placeholder a conditional builds instead of a norm (``nn.Identity()``) stays."""
        if isinstance(norm, torch.nn.Identity):
            return norm
        weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
        width = weight.shape[-1] if weight is not None else dim
        factory = {"device": weight.device, "dtype": weight.dtype} if weight is not None else {}
        return cls(width, bias=isinstance(bias, torch.Tensor), centre=centre, axis=axis, **factory)

    def forward(self, hidden_states):
        channels_last = hidden_states.movedim(self.axis, -1) if self.axis != -1 else hidden_states
        if self.centre:
            channels_last = channels_last - channels_last.mean(-1, keepdim=True)
        out = channels_last * self.weight.to(channels_last.dtype)
        out = out + self.bias.to(out.dtype) if self.bias is not None else out
        return out.movedim(-1, self.axis) if self.axis != -1 else out
'''


_DYT_CLASS = '''

class NormswapDyT(torch.nn.Module):
    """Dynamic Tanh (Zhu et al., CVPR 2025) in place of a residual norm: ``weight * tanh(alpha * x) + bias``.

    ``alpha`` is one learnable scalar, started at ``1 / s`` (``s`` the mean per-token scale of the norm's input over
    calibration tokens), so that in tanh's linear regime this is the norm's calibrated stand-in ``g * x / s + b``.
    """

    def __init__(self, dim, bias=True, axis=-1, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.axis = axis
        self.alpha = torch.nn.Parameter(torch.ones(1, **factory))
        self.weight = torch.nn.Parameter(torch.ones(dim, **factory))
        self.bias = torch.nn.Parameter(torch.zeros(dim, **factory)) if bias else None

    @classmethod
    def like(cls, norm, dim=None, axis=-1):
        """The DyT for ``norm`` (any family's norm class, built with its own arguments): its width, and a bias where
        it has one. A placeholder a conditional builds instead of a norm (``nn.Identity()``) stays."""
        if isinstance(norm, torch.nn.Identity):
            return norm
        weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
        width = weight.shape[-1] if weight is not None else dim
        factory = {"device": weight.device, "dtype": weight.dtype} if weight is not None else {}
        return cls(width, bias=isinstance(bias, torch.Tensor), axis=axis, **factory)

    def forward(self, hidden_states):
        channels_last = hidden_states.movedim(self.axis, -1) if self.axis != -1 else hidden_states
        out = torch.tanh(self.alpha.to(channels_last.dtype) * channels_last) * self.weight.to(channels_last.dtype)
        out = out + self.bias.to(out.dtype) if self.bias is not None else out
        return out.movedim(-1, self.axis) if self.axis != -1 else out
'''


_FRESH_COPY_FUNCTION = '''

def normswap_fresh_copy(module):
    """A module built as ``module`` was (class, shape, settings), where its constructor's arguments are out of
    scope; loading replaces its weights."""
    import copy

    return copy.deepcopy(module)
'''


_GIVE_BIAS_FUNCTION = '''

def normswap_give_bias(linear):
    """A zero bias for a linear map built without one: a dropped LayerNorm's shift ``W beta`` is stored there, and
    loading replaces it."""
    if linear.bias is None:
        linear.bias = torch.nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                                     device=linear.weight.device))
'''


_NORM_ITEM_FUNCTION = '''

def normswap_norm_item(norm, output, item):
    """``output`` (a tuple a module returned) with its item ``item``, the residual sum, normalised by ``norm``."""
    return (*output[:item], norm(output[item]), *output[item + 1:])
'''


_LIFTED_PROJECTOR_FUNCTIONS = '''

def normswap_source_width_config(config):
    """``config`` as the source model had it: every value the extra dimension changed (the language model's
    hidden_size d -> d + 1, its norms' eps) back, in each sub-config that holds the changed value (one its config
    class keeps equal, Idefics2's perceiver_config, too), rebuilt from its values so that fields the config class
    derives from them (MiniMax-M3-VL's merged_hidden_size) are derived from the source's."""
    values = config.to_dict()
    names = [name for name in getattr(config, "sub_configs", None) or {} if isinstance(values.get(name), dict)]
    sections = [values, *(values[name] for name in names)]
    changed = [(field, section[field], value) for section in sections
               for field, value in (section.get("normswap_source_fields") or {}).items() if field in section]
    for section in sections:
        for field, wide, value in changed:
            if section.get(field) == wide:
                section[field] = value
    narrowed = type(config).from_dict(values)
    for name in ["", *names]:  # the attention and experts kernels the model was built with, which values omit
        source, target = (getattr(config, name), getattr(narrowed, name)) if name else (config, narrowed)
        for field in ("_attn_implementation_internal", "_experts_implementation_internal"):
            if hasattr(source, field):
                target.__dict__[field] = getattr(source, field)
    return narrowed


def normswap_lift(hidden_states, scale=1.0):
    """``scale * U h`` over the last axis, d -> d + 1: ``U``'s columns are orthonormal and orthogonal to the
    all-ones vector (the Householder reflection taking e_(d+1) to the ones over sqrt(d + 1), its first d
    columns), computed without the matrix, in float64."""
    wide = hidden_states.double()
    root = (wide.shape[-1] + 1) ** 0.5
    total = wide.sum(-1, keepdim=True) / (root - 1.0)
    lifted = torch.nn.functional.pad(wide, (0, 1)) - total / root
    lifted[..., -1:] += total
    return (lifted * scale).to(hidden_states.dtype)


def normswap_lift_output(module, args, output, scale=1.0):
    """Forward hook: the projector's output (the features it puts into the stream) lifted by ``U``."""
    if isinstance(output, torch.Tensor):
        return normswap_lift(output, scale)
    raise TypeError(f"{type(module).__name__} returns {type(output).__name__}, not the features tensor that "
                    "normswap lifts into the wider stream")


def normswap_lifted_projector(build, config, scale=1.0):
    """The projector ``build(config)`` makes, built at the source's width, its output lifted by ``U``: exactly the
    source's projector followed by the lift into the stream one dimension wider (docs/design.md §5)."""
    import functools

    module = build(normswap_source_width_config(config))
    module.register_forward_hook(functools.partial(normswap_lift_output, scale=scale))
    return module
'''


def package_module(original: ModuleType, rewritten: str, config_class: type, conversion: str,
                   rms_norm: bool = False, layer_norm: bool = False, plain_rms_norm: bool = False,
                   stand_in: bool = False, dyt: bool = False,
                   composite: CompositeCode | None = None, wider_sub_config: tuple[str, type] | None = None,
                   untied_head: tuple[str, str] | None = None) -> GeneratedModule:
    """The loadable module source for ``rewritten`` (a rewrite of ``original``'s source), followed by
    ``composite``'s wrapper classes where the model's top classes live in another module.

    ``wider_sub_config``: (field, config class) of a composite's language model made one dimension wider; its
    stock config class refuses hidden_size = heads * head_dim + 1, so the generated config builds that field
    as a subclass without the check. ``untied_head``: (model class, key) of an LM head that leaves the class's
    tied weights while the config still ties the rest (``_untied_head``)."""
    stock = original.__name__.startswith("transformers.models.")  # transformers.models.<family>.modeling_<family>
    family = original.__name__.rsplit(".", 2)[-2] if stock else family_model_type(config_class.model_type)
    prefix = config_class.__name__.removesuffix("Config")
    generated_config = f"Normswap{prefix}Config"
    model_type = _undigested_model_type(family_model_type(config_class.model_type))
    model_classes = tuple(
        name for name, value in vars(original).items()
        if pyinspect.isclass(value) and value.__module__ == original.__name__ and _is_pretrained_model(value)
    ) + (composite.model_classes if composite else ())
    config_name = composite.config_name if composite else config_class.__name__
    body = _guard_optional_imports(absolute_imports(_without_registration(rewritten), original.__package__ or
                                                    original.__name__.rsplit(".", 1)[0])
                                   + (composite.source if composite else ""))
    wrapped = f" and the model classes of {', '.join(composite.wrapped_files)}" if composite and \
        composite.wrapped_files else ""
    header = (f"# Generated by normswap {__version__} from transformers {_transformers_version()} "
              f"models/{family}/{Path(original.__file__ or '').name}{wrapped}:\n# {conversion}. DO NOT EDIT: "
              "regenerate with `normswap convert` instead.\n")
    footer = f'''

class NormswapRemovedNorm(torch.nn.Module):
    """A norm this layout no longer applies: it passes its input through.

    It keeps a 0-d tensor (1.0) under each of the removed norm's parameter names, so that loading this
    checkpoint into the stock class fails with a size mismatch (the stock norm's are vectors) instead of running
    the wrong layout, while every tensor of the state dict still has a value to reduce over.
    """

    def __init__(self, parameter_names: tuple[str, ...]) -> None:
        super().__init__()
        for name in parameter_names:
            self.register_buffer(name, torch.tensor(1.0), persistent=True)

    def reset_placeholders(self) -> None:
        """Each placeholder back to 1.0: what weight initialisation does to this module (a model built on the meta
        device and initialised holds what one built directly holds)."""
        with torch.no_grad():
            for buffer in self.buffers(recurse=False):
                buffer.fill_(1.0)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states


{_wider_sub_config_class(wider_sub_config)}class {generated_config}({config_name}):
    """{config_class.__name__} under its own model_type, so this layout never loads into the stock classes."""

    model_type = "{model_type}"
{_wider_sub_config_field(wider_sub_config, config_name)}{_EXTRA_DIMENSION_VALIDATOR if layer_norm else ""}

from transformers import PreTrainedModel as _NormswapPreTrainedModel  # noqa: E402


def _initialize_as_stock(self, module, is_custom_code=False):
    """transformers takes code outside its package for custom code, which may write weights without its
    initialisation functions, and so skips a module with no tensors of its own (a model that fills its layers'
    non-persistent buffers, as Falcon-H1 does). This is transformers' own code, which uses those functions,
    looked up at each call, as the stock classes do (so a patch of it reaches this module too); a removed norm's
    placeholders, which no family's initialisation knows, are set here."""
    if isinstance(module, NormswapRemovedNorm) and not getattr(module, "_is_hf_initialized", False):
        module.reset_placeholders()
    return _NormswapPreTrainedModel._initialize_weights(self, module)


# every model class of this module reads its configuration as {generated_config}, and initialises what
# loading leaves to initialise as the stock classes do
for _model_class in ({", ".join(model_classes)},):
    _model_class.config_class = {generated_config}
    _model_class._initialize_weights = _initialize_as_stock
{_untied_head(untied_head)}{_auto_registration(generated_config, model_type,
                                               auto_classes(config_class.model_type, model_classes))}'''
    if not any(line.strip() == "import torch" for line in body.splitlines()):
        body = "import torch\n" + body
    if config_name not in body:
        raise CodegenError(f"{original.__name__} does not import {config_class.__name__}; cannot subclass it")
    if untied_head is not None and untied_head[0] not in model_classes:
        raise CodegenError(f"{untied_head[0]}, whose tied weights hold the LM head, is not a model class of "
                           f"{original.__name__}, so the generated code cannot untie the head")
    if "normswap_norm_item(" in body:
        footer = _NORM_ITEM_FUNCTION + footer
    if "normswap_lifted_projector(" in body:
        footer = _LIFTED_PROJECTOR_FUNCTIONS + footer
    if "normswap_fresh_copy(" in body:
        footer = _FRESH_COPY_FUNCTION + footer
    if "normswap_give_bias(" in body:
        footer = _GIVE_BIAS_FUNCTION + footer
    if rms_norm:
        footer = _RMS_NORM_CLASS + footer
    if layer_norm:
        footer = _LAYER_NORM_CLASS + footer
    if plain_rms_norm:
        footer = _PLAIN_RMS_NORM_CLASS + footer
    if stand_in:
        footer = _STAND_IN_CLASS + footer
    if dyt:
        footer = _DYT_CLASS + footer
    file_family = composite.family if composite and composite.family else family
    source, model_type = _sealed(header + body + footer, model_type)
    return GeneratedModule(file_family, f"modeling_normswap_{file_family}.py", source, generated_config,
                           model_type, model_classes)


def repackage(previous: GeneratedModule, rewritten: str, conversion: str, rms_norm: bool = False,
              layer_norm: bool = False, plain_rms_norm: bool = False, stand_in: bool = False,
              dyt: bool = False) -> GeneratedModule:
    """``previous`` (a module this normswap generated) with a later pass's edits (``rewritten``, its source edited):
    still one module over the stock family's source, with the same classes, whose header lists every conversion in
    order, with the normswap classes the later pass needs appended; its model_type is the family's again, with the
    digest of the new source."""
    first, second, rest = rewritten.split("\n", 2)
    done = second.removeprefix("# ").split(". DO NOT EDIT", 1)[0]
    header = f"{first}\n# {done}; then {conversion}. DO NOT EDIT: regenerate with `normswap convert` instead.\n"
    body = rest
    for wanted, name, text in ((rms_norm, "NormswapRMSNorm", _RMS_NORM_CLASS),
                               (layer_norm, "NormswapLayerNorm", _LAYER_NORM_CLASS),
                               (plain_rms_norm, "NormswapPlainRMSNorm", _PLAIN_RMS_NORM_CLASS),
                               (stand_in, "NormswapStandIn", _STAND_IN_CLASS), (dyt, "NormswapDyT", _DYT_CLASS)):
        if wanted and f"class {name}(" not in body:
            body += text
    for used, text in (("normswap_norm_item(", _NORM_ITEM_FUNCTION), ("normswap_fresh_copy(", _FRESH_COPY_FUNCTION),
                       ("normswap_give_bias(", _GIVE_BIAS_FUNCTION),
                       ("normswap_lifted_projector(", _LIFTED_PROJECTOR_FUNCTIONS)):
        if used in body and text.strip().splitlines()[0] not in body:
            body += text
    undigested = _undigested_model_type(family_model_type(previous.model_type))
    source, model_type = _sealed((header + body).replace(previous.model_type, undigested), undigested)
    return GeneratedModule(previous.family, previous.file_name, source, previous.config_class, model_type,
                           previous.model_classes)


_DIGEST_PLACEHOLDER = "@layout-digest@"
_GENERATED_MODEL_TYPE = re.compile(r"(?:normswap-)+(?P<family>.+?)(?:-[0-9a-f]{12})?")


def family_model_type(model_type: str) -> str:
    """The stock family a generated model_type was written from (``normswap-llama-<digest>`` -> ``llama``, as
    ``normswap-llama``, from before the digest, and code generated from generated code); any other unchanged."""
    found = _GENERATED_MODEL_TYPE.fullmatch(model_type)
    return found["family"] if found else model_type


def _undigested_model_type(family_model_type: str) -> str:
    """The generated model_type before its source is complete: ``_sealed`` writes the digest in."""
    return f"normswap-{family_model_type}-{_DIGEST_PLACEHOLDER}"


def _sealed(source: str, undigested: str) -> tuple[str, str]:
    """``source`` and its model_type, with the digest of ``source`` (the placeholder in) in place of the placeholder.

    The model_type names the code: two checkpoints share it only where their modeling files are the same, so the
    module can register it with AutoConfig, and a checkpoint that transformers then reads through this module's
    classes, without trust_remote_code, is one this very code wrote."""
    digest = hashlib.sha256(source.encode("utf-8")).hexdigest()[:12]
    model_type = undigested.replace(_DIGEST_PLACEHOLDER, digest)
    return source.replace(undigested, model_type), model_type


_REGISTRATION_BEGINS = "# normswap: Auto class registration begins"
_REGISTRATION_ENDS = "# normswap: Auto class registration ends"
_REGISTRATION = re.compile(rf"\n*{_REGISTRATION_BEGINS}\n.*?{_REGISTRATION_ENDS}\n", re.DOTALL)


def _without_registration(source: str) -> str:
    """``source`` without the Auto registration of a module normswap generated earlier (code converted again):
    run in the new module, it would map the earlier layout's model_type to this module's classes."""
    return _REGISTRATION.sub("\n", source)


def _auto_registration(generated_config: str, model_type: str, found_by_auto: dict[str, str]) -> str:
    """The module's registration with transformers' Auto classes, as ``from_pretrained(..., trust_remote_code=True)``
    registers custom code: a module imported as it is builds its classes through them (the generic heads call
    ``AutoModel.from_config(config)``), AutoConfig reads a saved checkpoint of this model_type back, and
    ``save_pretrained`` ships this file and its ``auto_map`` beside the weights (``register_for_auto_class``), so
    that no checkpoint of these classes is saved without the code that reads it.

    Registering the model_type is safe because it carries the digest of this module's source: a config.json that
    names it was written beside this very code, and a checkpoint of any other layout (another model_type) still
    needs trust_remote_code."""
    pairs = "".join(f'    ("{auto}", {found}),\n' for auto, found in found_by_auto.items())
    models = f'''
from transformers.models.auto import modeling_auto as _normswap_auto_classes  # noqa: E402

for _auto_class, _model_class in (
{pairs}):
    getattr(_normswap_auto_classes, _auto_class).register({generated_config}, _model_class, exist_ok=True)
    _model_class.register_for_auto_class(_auto_class)
''' if found_by_auto else ""
    return f'''

{_REGISTRATION_BEGINS}
# transformers' Auto classes read a config.json of this model_type as a {generated_config} and build this module's
# classes from it (the generic heads call AutoModel.from_config); save_pretrained writes this file beside the
# weights. The model_type names this code (the digest of its source), so a checkpoint of any other layout still
# needs trust_remote_code
from transformers import AutoConfig as _NormswapAutoConfig  # noqa: E402

_NormswapAutoConfig.register("{model_type}", {generated_config}, exist_ok=True)
{generated_config}.register_for_auto_class()
{models}{_REGISTRATION_ENDS}
'''


def _untied_head(untied: tuple[str, str] | None) -> str:
    """The model class's tied weights without its LM head, where one config flag ties the head and the token
    embeddings the stacks share (T5's ``tie_word_embeddings``, which its config class also forces): turning the flag
    off would untie the stacks' embeddings too, into copies that train apart, so the head alone leaves the map."""
    if untied is None:
        return ""
    model_class, key = untied
    return f'''

# normswap's exact map writes {key} as its own tensor (E diag(g) U^T, where the token embedding
# holds the rows U e): it leaves the tied weights, and the embeddings the config ties stay tied to each other
{model_class}._tied_weights_keys = {{
    target: source
    for target, source in {model_class}._tied_weights_keys.items()
    if target != {key!r}
}}
'''


def _wider_sub_config_class(wider: tuple[str, type] | None) -> str:
    if wider is None:
        return ""
    _, text = wider
    return f'''from {text.__module__} import {text.__name__}


class NormswapWider{text.__name__}({text.__name__}):
    """{text.__name__} of a language model one dimension wider than its heads: the same fields and checks."""
{_EXTRA_DIMENSION_VALIDATOR}

'''


def _wider_sub_config_field(wider: tuple[str, type] | None, config_name: str) -> str:
    if wider is None:
        return ""
    field, text = wider
    return (f"    sub_configs_defaults = {{**{config_name}.sub_configs_defaults, {field!r}: "
            f"NormswapWider{text.__name__}}}\n")


def load_generated(module: GeneratedModule) -> ModuleType:
    """Import the generated source from a per-content cache folder (imported once per process)."""
    digest = hashlib.sha256(module.source.encode()).hexdigest()[:16]
    name = f"normswap_generated_{digest}.{module.module_name}"
    if name in sys.modules:
        return sys.modules[name]
    folder = _cache_folder() / digest
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / module.file_name
    if not path.is_file() or path.read_text(encoding="utf-8") != module.source:
        temporary = path.with_suffix(f".tmp{os.getpid()}")
        temporary.write_text(module.source, encoding="utf-8")
        temporary.replace(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CodegenError(f"cannot import the generated module at {path}")
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[name] = loaded
    spec.loader.exec_module(loaded)
    return loaded


def _cache_folder() -> Path:
    root = os.environ.get("NORMSWAP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "normswap")
    return Path(root) / "generated"


def _is_pretrained_model(value: type) -> bool:
    from transformers import PreTrainedModel

    return issubclass(value, PreTrainedModel)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def absolute_imports(source: str, package: str) -> str:
    """``from ...utils import x`` -> ``from transformers.utils import x``: the file will live outside transformers.

    Only the ``from <dots><module>`` words of each relative import change, so the statements are found with
    ``ast`` and edited in place (a second libcst parse of a 1000-line modeling file cost 0.8 s per conversion).
    """
    lines = source.split("\n")  # ast counts lines by newline only (splitlines would also split at form feeds)
    relative = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom) and node.level]
    for node in sorted(relative, key=lambda n: (n.lineno, n.col_offset), reverse=True):
        line = lines[node.lineno - 1].encode("utf-8")
        head, statement = line[:node.col_offset], line[node.col_offset:].decode("utf-8")
        match = _RELATIVE_FROM.match(statement)
        if match is None:
            raise CodegenError(f"internal: cannot read the relative import on line {node.lineno} of the modeling "
                                "code; please report it")
        absolute = resolve_name(match.group("dots") + match.group("module"), package)
        lines[node.lineno - 1] = head.decode("utf-8") + f"from {absolute} import" + statement[match.end():]
    return "\n".join(lines)


def _guard_optional_imports(source: str) -> str:
    """Each import of an optional package inside a function or branch -> the same import in a ``try`` block.

    transformers refuses to load remote code whose imports are not installed, and its check reads every
    import outside ``try`` blocks, even one a stock file makes only when a feature is on (DistilBERT's
    ``import deepspeed`` under ZeRO-3). Stock loads without the package, so the generated file must too; the
    ``try`` re-raises, so the import fails exactly where and when it would have.
    """
    tree = ast.parse(source)
    guarded = {id(node) for node in ast.walk(tree) if isinstance(node, ast.Try) for node in ast.walk(node)}
    nested = [node for top in tree.body if not isinstance(top, (ast.Import, ast.ImportFrom))
              for node in ast.walk(top) if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in guarded
              and _optional(node)]
    lines = source.split("\n")
    for node in sorted(nested, key=lambda n: n.lineno, reverse=True):
        first, last = node.lineno - 1, (node.end_lineno or node.lineno) - 1
        indent = lines[first][:node.col_offset]
        if indent.strip() or lines[last].rstrip().endswith(";"):  # shares a line with other code: leave it
            continue
        body = ["    " + line for line in lines[first:last + 1]]
        note = "optional: stock loads without it, and transformers' import check skips try blocks"
        lines[first:last + 1] = [f"{indent}try:  # {note}", *body, f"{indent}except ImportError:", f"{indent}    raise"]
    return "\n".join(lines)


def _optional(node: ast.Import | ast.ImportFrom) -> bool:
    """An absolute import of a package that is neither the standard library nor torch/transformers/numpy."""
    if isinstance(node, ast.ImportFrom):
        names = [node.module] if node.level == 0 and node.module else []
    else:
        names = [alias.name for alias in node.names]
    required = set(sys.stdlib_module_names) | {"torch", "transformers", "numpy"}
    return any(name.split(".")[0] not in required for name in names)


_RELATIVE_FROM = re.compile(r"from\s+(?P<dots>\.+)\s*(?P<module>[\w.]*)\s+import")


def config_fields(config: Any) -> dict[str, Any]:
    """A config's values without the keys that name its class or origin."""
    skip = {"model_type", "architectures", "transformers_version", "_name_or_path", "auto_map", "normswap"}
    return {k: v for k, v in config.to_dict().items() if k not in skip}
