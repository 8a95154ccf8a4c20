"""Which stock family computes a family's function with its norms moved: native targets found by behaviour.

A native target for (source family A, placement P) is a stock family B whose code, loaded with A's converted
weights, computes exactly what A's code computes once its residual norms sit in placement P. Names decide
nothing here: every model type transformers registers is built tiny on the meta device and inspected, and pairs
are proposed from the detected topology and the layer modules' tensors, then confirmed or rejected numerically.

1. Scan. Each family with a causal-LM or masked-LM head (no encoder-decoders) is built from the coverage
   benchmark's tiny config (``coverage_checks._generic_config``) on the meta device and inspected. Kept: one stack
   whose layers all have one placement among pre, sandwich (pre + out norm on each branch) and post-sublayer (out
   norm only). Recorded: the placement, the slot norms' kinds, the sublayers' branch kinds, and the tensors of
   the layers (names relative to the layer) and of the model outside the layers, less the slot norms.
2. Candidates. (A, B) with different placements, the same head class suffix, the same branch kinds, the same slot
   norm kind up to the ``(1 + w)`` offset, and the same tensor names once the slot norms are set aside. B is then
   built (meta) from A's config re-expressed for B exactly as a native conversion does it
   (``normswap.conversion.native.target_config``) and its tensors must have A's shapes.
3. Confirmation. What must hold is: B(weights W') = A_P(weights W) for the converted weights, where A_P is A's own
   code with its norms moved to P. A_P is realised on A itself, without any generated code, by hooks: a slot
   norm that P drops becomes ``nn.Identity``, a slot norm that P adds is a copy of one of A's own norm modules
   called on the branch module's input (pre) or on its output (out). Every slot norm of P gets a random gain
   ``g = 1 + 0.1 N(0, 1)``, stored in each side's convention (``g`` or ``g - 1`` for ``(1 + w)`` norms); all
   other tensors are A's, perturbed away from their initial values (``coverage_checks.perturb``), copied into B
   under the same names. Both run in float32 with eager attention on random ids (2 x 16 tokens), with any
   sliding window of A's config shrunk to 4 tokens so that windowing differences show, and the pair is confirmed
   when ``max |A_P - B| / max |A_P| <= 1e-5`` on the logits. Because the norms that P adds are A's own norm
   modules with gains that B reads from the same stored values, this checks the branches, q/k norms, rotary
   embeddings, scalings, softcaps and heads of the two codes at once, and the slot norms' kinds and eps too.
   A rejection names the first module (in B's call order) whose output differs and the config fields that
   differ between A's config and B's effective config (fields of A that B drops, and values B changes or adds).

Post-Norm (norm on the stream after the add) is out of scope: it cannot be realised by hooks on a branch, and
its native pairs (BERT/MegatronBERT, BART/mBART, RoBERTa/XLM-RoBERTa-XL, OPT) move the embedding norm as well;
their recipes are tested in tests/test_convert_native.py.

Usage: ``PYTHONPATH=. python benchmarks/native_pairs.py [--json OUT.json] [--only A,B,...]``; ~3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from coverage_checks import _generic_config, perturb, preferred_mapping

PLACEMENTS = ("pre", "sandwich", "post-sublayer")
SLOTS = {"pre": ("pre",), "sandwich": ("pre", "out"), "post-sublayer": ("out",)}
HEADS = {"MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": "ForCausalLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES": "ForMaskedLM"}
TOLERANCE = 1e-5  # max abs difference relative to max |reference|, float32
WINDOW = 4  # a sliding window shrunk below the probe length, so that windowing differences show
TOKENS = 16


@dataclass(frozen=True)
class Family:
    """What the scan records of one family: its placement, slot norms, branches and tensors."""

    model_type: str
    class_name: str
    placement: str
    norm_kind: str  # the slot norms' kind (one kind: families mixing kinds in their slots are not kept)
    branch_kinds: tuple[str, ...]  # per layer 0 sublayer
    layer_keys: tuple[tuple[str, ...], ...]  # each layer's tensor names relative to the layer, less its slot norms
    outer_keys: tuple[str, ...]  # tensors outside the layers

    @property
    def prefix(self) -> str:
        return self.class_name.removesuffix(self.head)

    @property
    def head(self) -> str:
        return next(h for h in HEADS.values() if self.class_name.endswith(h))


@dataclass(frozen=True)
class Outcome:
    """One candidate pair and what the numeric check said."""

    source: str
    placement: str
    target: str
    confirmed: bool
    figure: float | None  # relative logit difference
    reason: str = ""
    slot_keys: tuple[tuple[str, str], ...] = ()  # (A's key or "new", B's key) for the slot norms of layer 0
    config_differences: tuple[str, ...] = ()
    class_prefix: tuple[str, str] = ("", "")
    needs: tuple[str, ...] = ()  # A's config values the pair holds only with (a variant that breaks it)


@dataclass(frozen=True)
class ScanResult:
    families: tuple[Family, ...]
    skipped: dict[str, str] = field(default_factory=dict)


def _offset(kind: str) -> bool:
    return kind.endswith("-offset")


def _base_kind(kind: str) -> str:
    return kind.removesuffix("-offset")


def _slot_norms(topology: Any) -> dict[tuple[int, int, str], Any]:
    """(layer index, sublayer index, slot) -> the NormSite, for the pre and out slots."""
    return {(layer.index, position, norm.slot): norm
            for layer in topology.layers for position, sublayer in enumerate(layer.sublayers)
            for norm in sublayer.norms if norm.slot in ("pre", "out")}


def _layer_keys(model: nn.Module, layer_path: str, slot_paths: set[str]) -> tuple[str, ...]:
    names = list(model.get_submodule(layer_path).state_dict())  # what a checkpoint stores: no computed buffers
    return tuple(sorted(n for n in names if not any(f"{layer_path}.{n}".startswith(p + ".") for p in slot_paths)))


def _outer_keys(model: nn.Module, stack: str) -> tuple[str, ...]:
    return tuple(sorted(n for n in model.state_dict() if not n.startswith(stack + ".")))


def _model_class(model_type: str) -> tuple[type[nn.Module], str] | None:
    import transformers
    from transformers.models.auto import modeling_auto

    mapping = preferred_mapping(model_type, False)
    if mapping not in HEADS:
        return None
    names = getattr(modeling_auto, mapping)[model_type]
    name = names[0] if isinstance(names, (list, tuple)) else names
    cls = getattr(transformers, name, None)
    return (cls, name) if cls is not None and name.endswith(HEADS[mapping]) else None


def tiny_config(model_type: str) -> Any:
    """The coverage benchmark's tiny config (with key-value heads, else without)."""
    try:
        return _generic_config(model_type, True)
    except Exception:  # noqa: BLE001 - the plain-heads form is the second try, as in coverage_checks.build
        return _generic_config(model_type, False)


def meta_build(cls: type[nn.Module], config: Any) -> nn.Module:
    from normswap.detect.source import quiet_transformers

    with torch.device("meta"), quiet_transformers():
        return cls._from_config(copy.deepcopy(config), attn_implementation="eager")  # type: ignore[attr-defined]


def describe(model: nn.Module) -> tuple[Any, str]:
    """The topology of ``model`` and its one placement among PLACEMENTS, or a ValueError naming why not."""
    import normswap

    topology = normswap.inspect(model)
    if len(topology.stacks) != 1:
        raise ValueError(f"{len(topology.stacks)} stacks")
    placements = {layer.placement for layer in topology.layers}
    if len(placements) != 1 or (placement := placements.pop()) not in PLACEMENTS:
        raise ValueError(f"placement {topology.placement}")
    if any(len(sublayer.branches) != 1 for layer in topology.layers for sublayer in layer.sublayers):
        raise ValueError("a sublayer with several branches")
    return topology, placement


def scan_family(model_type: str) -> Family:
    found = _model_class(model_type)
    if found is None:
        raise ValueError("no causal-LM or masked-LM head class")
    cls, name = found
    config = tiny_config(model_type)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError("encoder-decoder")
    if getattr(type(config), "sub_configs", None):
        raise ValueError("a composite config (its text model is a family of its own)")
    model = meta_build(cls, config)
    topology, placement = describe(model)
    slots = _slot_norms(topology)
    kinds = {norm.kind for norm in slots.values()}
    if len(kinds) != 1:
        raise ValueError(f"slot norm kinds {sorted(kinds)}")
    layer0 = topology.layers[0]
    stack = topology.stacks[0].path
    slot_paths = {n.path for n in slots.values()}
    return Family(model_type, name, placement, kinds.pop(), tuple(s.kind for s in layer0.sublayers),
                  tuple(_layer_keys(model, layer.path, slot_paths) for layer in topology.layers),
                  _outer_keys(model, stack))


def scan(model_types: list[str]) -> ScanResult:
    from normswap.detect.source import quiet_transformers

    families: list[Family] = []
    skipped: dict[str, str] = {}
    for model_type in model_types:
        try:
            with quiet_transformers(), _silenced():
                families.append(scan_family(model_type))
        except Exception as error:  # noqa: BLE001 - a family that does not build or inspect is no candidate
            skipped[model_type] = _one_line(error)
    return ScanResult(tuple(families), skipped)


@contextlib.contextmanager
def _silenced() -> Iterator[None]:
    import io
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def structural_candidates(families: tuple[Family, ...]) -> list[tuple[Family, Family]]:
    """(A, B): different placements, same head, branch kinds, slot norm kind up to the offset and tensor names."""
    return [(a, b) for a in families for b in families
            if a.model_type != b.model_type and a.placement != b.placement and a.head == b.head
            and a.branch_kinds == b.branch_kinds and _base_kind(a.norm_kind) == _base_kind(b.norm_kind)
            and a.layer_keys == b.layer_keys and a.outer_keys == b.outer_keys]


# --- the numeric check ---

def target_for(a: Family, b: Family, config: Any) -> Any:
    """B's config from A's, as a native conversion writes it."""
    from normswap.conversion.native import target_config
    from normswap.recipe import NativeTarget

    return target_config(config, NativeTarget(b.placement, b.model_type, (a.prefix, b.prefix)))


def source_config(a: Family, overrides: dict[str, Any] | None = None) -> Any:
    """A's tiny config with ``overrides``, any sliding window shrunk below the probe length and windowed from the
    second layer on (per-layer attention types are derived again from these)."""
    from transformers import CONFIG_MAPPING

    data = tiny_config(a.model_type).to_dict()
    data.pop("layer_types", None)
    if data.get("sliding_window") is None and isinstance(getattr(CONFIG_MAPPING[a.model_type], "sliding_window", None),
                                                           int):
        data["sliding_window"] = WINDOW  # a config that drops its window unless a flag asks for one: the flag decides
    data.update(overrides or {})
    if isinstance(data.get("sliding_window"), int):
        data["sliding_window"] = WINDOW
    if isinstance(data.get("max_window_layers"), int):
        data["max_window_layers"] = 1
    data.pop("model_type", None)
    return CONFIG_MAPPING[a.model_type].from_dict(data)


def variants(a: Family, b: Family) -> list[dict[str, Any]]:
    """Config changes that a confirmed pair must survive, or else be conditional on: each flag of A's config flipped,
    and each number that A's config has and B's config class lacks moved off its value."""
    config = source_config(a).to_dict()
    known = set(_config_class(b.model_type)().to_dict())
    flags = [{k: not v} for k, v in sorted(config.items()) if isinstance(v, bool) and k not in _IGNORED]
    numbers = [{k: v * 2 if isinstance(v, int) else v * 1.5 + 0.25} for k, v in sorted(config.items())
               if k not in known and k not in _IGNORED and isinstance(v, (int, float)) and not isinstance(v, bool)
               and not k.endswith(("_id", "_token_id"))]
    # per-layer lists B does not know (SmolLM3's no_rope_layers): the first layer's entry changed
    lists = [{k: [1 - v[0] if v[0] in (0, 1) else v[0] * 2, *v[1:]]} for k, v in sorted(config.items())
             if k not in known and k not in _IGNORED and isinstance(v, list) and v
             and all(isinstance(x, int) and not isinstance(x, bool) for x in v)]
    window = [{"sliding_window": WINDOW}] if "sliding_window" in config and config["sliding_window"] is None else []
    return flags + numbers + lists + window


def _config_class(model_type: str) -> Any:
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type]


def conditions(a: Family, b: Family, base_overrides: dict[str, Any]) -> tuple[str, ...]:
    """The variants under which a confirmed pair no longer holds, as ``field=value`` of A's config it needs."""
    needed = [f"{key}={value!r}" for key, value in base_overrides.items()]
    base = source_config(a, base_overrides).to_dict()
    for change in variants(a, b):
        if set(change) & set(base_overrides):
            continue
        try:
            with _silenced():
                held = check_pair(a, b, overrides={**base_overrides, **change}).confirmed
        except Exception:  # noqa: BLE001 - a variant that does not build is no model to convert
            continue
        if not held:
            ((key, _),) = change.items()
            needed.append(f"{key}={base[key]!r}")
    return tuple(needed)


def check_pair(a: Family, b: Family, seed: int = 0, overrides: dict[str, Any] | None = None) -> Outcome:
    """Build A_P by hooks and B from A's weights; compare their logits (module docstring, step 3)."""
    import transformers

    config = source_config(a, overrides)
    a_cls = getattr(transformers, a.class_name)
    b_config = target_for(a, b, config)
    b_cls = getattr(transformers, b.class_name)
    base = dict(source=a.model_type, placement=b.placement, target=b.model_type, class_prefix=(a.prefix, b.prefix),
                config_differences=config_differences(config, b_config))
    try:
        b_meta = meta_build(b_cls, b_config)
        b_topology, b_placement = describe(b_meta)
    except Exception as error:  # noqa: BLE001
        return Outcome(**base, confirmed=False, figure=None,
                       reason=f"{b.model_type} from {a.model_type}'s config: {_one_line(error)}")
    if b_placement != b.placement:
        return Outcome(**base, confirmed=False, figure=None,
                       reason=f"{b.model_type} from {a.model_type}'s config has {b_placement} placement")
    torch.manual_seed(seed)
    model_a = a_cls._from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    perturb(model_a, seed)
    a_topology, _ = describe(model_a)
    state = model_a.state_dict()
    a_slots, b_slots = _slot_norms(a_topology), _slot_norms(b_topology)
    b_shapes = {k: tuple(v.shape) for k, v in b_meta.state_dict().items()}
    mismatch = _shape_mismatch(state, b_shapes, a_slots, b_slots)
    if mismatch:
        return Outcome(**base, confirmed=False, figure=None, reason=mismatch)
    target_state = {k: v for k, v in state.items() if not _under(k, [n.path for n in a_slots.values()])}
    generator = torch.Generator().manual_seed(seed + 1)
    slot_keys: list[tuple[str, str]] = []
    realised = model_a  # A_P: A itself, its slot norms moved by the edits below
    for key, b_norm in sorted(b_slots.items()):
        a_norm = a_slots.get(key)
        template = realised.get_submodule((a_norm or next(iter(a_slots.values()))).path)
        gain = 1 + 0.1 * torch.randn(b_norm.dim, generator=generator)
        norm = template if a_norm is not None else copy.deepcopy(template)
        with torch.no_grad():
            norm.weight.copy_(gain - 1 if _offset(a.norm_kind) else gain)
        for name, tensor in norm.state_dict().items():
            target_state[f"{b_norm.path}.{name}"] = tensor.clone()
        if _offset(b.norm_kind) != _offset(a.norm_kind):
            target_state[f"{b_norm.path}.weight"] = gain - 1 if _offset(b.norm_kind) else gain
        if key[0] == 0:
            slot_keys.append((a_norm.path if a_norm else "new", b_norm.path))
        if a_norm is None:
            _attach(realised, a_topology, key, norm)
    for key, a_norm in a_slots.items():
        if key not in b_slots:
            parent, _, name = a_norm.path.rpartition(".")
            setattr(realised.get_submodule(parent), name, nn.Identity())
    model_b = _loaded(b_cls, b_config, target_state)
    if isinstance(model_b, str):
        return Outcome(**base, confirmed=False, figure=None, reason=model_b, slot_keys=tuple(slot_keys))
    ids = torch.randint(3, min(config.vocab_size, 128), (2, TOKENS), generator=generator)
    with torch.no_grad():
        reference, outputs_a = _run(realised, ids)
        result, outputs_b = _run(model_b, ids)
    figure = float((reference - result).abs().max() / reference.abs().max())
    confirmed = figure <= TOLERANCE
    reason = "" if confirmed else _first_difference(outputs_a, outputs_b)
    return Outcome(**base, confirmed=confirmed, figure=figure, reason=reason, slot_keys=tuple(slot_keys))


def _under(key: str, paths: list[str]) -> bool:
    return any(key.startswith(p + ".") for p in paths)


def _shape_mismatch(state: dict[str, torch.Tensor], b_shapes: dict[str, tuple[int, ...]], a_slots: dict[Any, Any],
                    b_slots: dict[Any, Any]) -> str:
    a_keys = {k for k in state if not _under(k, [n.path for n in a_slots.values()])}
    b_keys = {k for k in b_shapes if not _under(k, [n.path for n in b_slots.values()])}
    if a_keys != b_keys:
        return (f"tensors differ: only {sorted(a_keys - b_keys)[:3]} in the source, "
                f"only {sorted(b_keys - a_keys)[:3]} in the target")
    wrong = [k for k in sorted(a_keys) if tuple(state[k].shape) != b_shapes[k]]
    if wrong:
        return f"shapes differ: {wrong[0]} {tuple(state[wrong[0]].shape)} vs {b_shapes[wrong[0]]}"
    if {(k[0], k[1]) for k in a_slots} != {(k[0], k[1]) for k in b_slots}:
        return "sublayers differ"
    return ""


def _attach(model: nn.Module, topology: Any, key: tuple[int, int, str], norm: nn.Module) -> None:
    """Call ``norm`` on the input (pre) or output (out) of the branch module of sublayer ``key``."""
    layer_index, position, slot = key
    branch = topology.layers[layer_index].sublayers[position].branches[0]
    module = model.get_submodule(_common_prefix(branch.modules))
    holder = f"_native_pairs_{slot}_norm"
    setattr(module, holder, norm)  # registered, so that .to() and dtype changes reach it

    if slot == "pre":
        def before(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
            if args:
                return (norm(args[0]), *args[1:]), kwargs
            name = "hidden_states" if "hidden_states" in kwargs else next(
                k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.is_floating_point())
            return args, {**kwargs, name: norm(kwargs[name])}

        module.register_forward_pre_hook(before, with_kwargs=True)
    else:
        def after(_: nn.Module, __: Any, output: Any) -> Any:
            if isinstance(output, tuple):
                return (norm(output[0]), *output[1:])
            return norm(output)

        module.register_forward_hook(after)


def _common_prefix(paths: tuple[str, ...]) -> str:
    parts = [p.split(".") for p in paths]
    common: list[str] = []
    for pieces in zip(*parts, strict=False):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    if len(paths) == 1:
        return paths[0]
    return ".".join(common)


def _loaded(cls: type[nn.Module], config: Any, state: dict[str, torch.Tensor]) -> nn.Module | str:
    from transformers.initialization import no_init_weights

    with no_init_weights(), _silenced():
        model = cls._from_config(copy.deepcopy(config), attn_implementation="eager")  # type: ignore[attr-defined]
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if "lm_head" in k}
    if set(missing) - tied or unexpected:
        return f"weights do not load: missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}"
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


def _run(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    """The logits and every named module's first output tensor, in call order."""
    seen: list[tuple[str, torch.Tensor]] = []
    handles = []
    for name, module in model.named_modules():
        if name and not name.split(".")[-1].startswith("_native_pairs"):
            def record(_: nn.Module, __: Any, output: Any, name: str = name) -> None:
                tensor = output[0] if isinstance(output, tuple) and output else output
                if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                    seen.append((name, tensor.detach().clone()))

            handles.append(module.register_forward_hook(record))
    try:
        output = model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return output.logits.detach().float(), seen


def _first_difference(outputs_a: list[tuple[str, torch.Tensor]], outputs_b: list[tuple[str, torch.Tensor]]) -> str:
    """The first module, in B's call order, whose output differs from A_P's module of the same name."""
    first_a: dict[str, torch.Tensor] = {}
    for name, tensor in outputs_a:
        first_a.setdefault(name, tensor)
    for name, tensor in outputs_b:
        other = first_a.get(name)
        if other is None or other.shape != tensor.shape:
            continue
        scale = max(float(other.abs().max()), 1e-12)
        difference = float((other - tensor).abs().max()) / scale
        if difference > TOLERANCE:
            return f"first differing output: {name} (relative {difference:.2g})"
    return "logits differ, no named module's output does (code in a model-level forward)"


_IGNORED = frozenset({"model_type", "architectures", "transformers_version", "_name_or_path", "auto_map", "dtype",
                      "torch_dtype", "_attn_implementation_autoset", "output_attentions", "output_hidden_states",
                      "return_dict", "use_cache", "id2label", "label2id", "is_decoder", "is_encoder_decoder",
                      "add_cross_attention", "tie_encoder_decoder", "chunk_size_feed_forward", "problem_type",
                      "use_return_dict", "pretraining_tp"})


def config_differences(source: Any, target: Any) -> tuple[str, ...]:
    """Fields of A's config that B's config class does not know (carried, unread), and the values B's effective
    config changes or adds."""
    a, b = source.to_dict(), target.to_dict()
    known = set(type(target)().to_dict())
    dropped = [f"-{k}={a[k]!r}" for k in sorted(set(a) - known - _IGNORED) if a[k] not in (None, False, [], {})]
    changed = [f"{k}: {a[k]!r} -> {b[k]!r}" for k in sorted(set(a) & set(b) - _IGNORED) if a[k] != b[k]]
    added = [f"+{k}={b[k]!r}" for k in sorted(set(b) - set(a) - _IGNORED) if b[k] not in (None, False, [], {})]
    return tuple(dropped + changed + added)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or "no message"
    return f"{type(error).__name__}: {text[:200]}"


def confirm(a: Family, b: Family) -> Outcome:
    """The pair checked on A's tiny config, else without A's sliding window (most checkpoints of windowed families
    have none); a confirmed pair is then checked on the variants, which name the values it needs."""
    overrides: dict[str, Any] = {}
    with _silenced():
        outcome = check_pair(a, b)
        if not outcome.confirmed and isinstance(getattr(source_config(a), "sliding_window", None), int):
            config = source_config(a)
            overrides = {"sliding_window": None}
            if hasattr(config, "use_sliding_window"):
                overrides["use_sliding_window"] = False
            if isinstance(getattr(config, "layer_types", None), list):  # Exaone 4 derives them from the window
                overrides["layer_types"] = ["full_attention"] * len(config.layer_types)
            try:
                windowless = check_pair(a, b, overrides=overrides)
            except Exception:  # noqa: BLE001 - a family that needs its window: the first outcome stands
                windowless = outcome
            if windowless.confirmed:
                outcome = windowless
            elif windowless is not outcome:
                outcome = replace(outcome, reason=f"{outcome.reason}; without the window: {windowless.reason}")
    if not outcome.confirmed:
        return outcome
    return replace(outcome, needs=conditions(a, b, overrides))


def all_model_types() -> list[str]:
    from transformers import CONFIG_MAPPING

    return sorted(CONFIG_MAPPING.keys())


def run(model_types: list[str]) -> dict[str, Any]:
    started = time.monotonic()
    scanned = scan(model_types)
    scan_seconds = time.monotonic() - started
    outcomes = []
    for a, b in structural_candidates(scanned.families):
        try:
            outcomes.append(confirm(a, b))
        except Exception as error:  # noqa: BLE001 - a pair whose check fails is a rejection with the reason
            outcomes.append(Outcome(a.model_type, b.placement, b.model_type, False, None,
                                    f"check failed: {_one_line(error)}"))
    return {"families": [asdict(f) for f in scanned.families], "skipped": scanned.skipped,
            "outcomes": [asdict(o) for o in outcomes], "scan_seconds": round(scan_seconds, 1),
            "seconds": round(time.monotonic() - started, 1)}


def markdown(result: dict[str, Any]) -> str:
    """The outcomes as the tables of docs/native_pairs.md: confirmed pairs, then rejected candidates."""
    lines = ["| source | to | stock family | figure | slot norms of layer 0 (source -> target) | needs |",
             "| --- | --- | --- | --- | --- | --- |"]
    outcomes = sorted(result["outcomes"], key=lambda o: (o["source"], o["placement"], o["target"]))
    for o in (o for o in outcomes if o["confirmed"]):
        slots = "<br>".join(f"{a.removeprefix('model.layers.0.')} -> {b.removeprefix('model.layers.0.')}"
                            for a, b in o["slot_keys"])
        lines.append(f"| {o['source']} | {o['placement']} | {o['target']} | {o['figure']:.1g} | {slots} | "
                     f"{', '.join(o['needs']) or '-'} |")
    lines += ["", "| source | to | stock family | figure | why not |", "| --- | --- | --- | --- | --- |"]
    for o in (o for o in outcomes if not o["confirmed"]):
        figure = "-" if o["figure"] is None else f"{o['figure']:.2g}"
        fields = [d for d in o["config_differences"] if not d.startswith("+")][:4]
        why = o["reason"].replace("|", "/") + (f"; config: {', '.join(fields)}" if fields else "")
        lines.append(f"| {o['source']} | {o['placement']} | {o['target']} | {figure} | {why} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the families, skips and outcomes here")
    parser.add_argument("--only", help="comma-separated model types to scan instead of all")
    parser.add_argument("--markdown", type=Path, help="write the outcome tables (docs/native_pairs.md's) here")
    args = parser.parse_args()
    torch.set_num_threads(2)
    result = run(args.only.split(",") if args.only else all_model_types())
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.markdown:
        args.markdown.write_text(markdown(result))
    by_placement: dict[str, list[str]] = {}
    for family in result["families"]:
        by_placement.setdefault(family["placement"], []).append(family["model_type"])
    for placement, names in sorted(by_placement.items()):
        print(f"{placement}: {', '.join(names)}")
    for outcome in result["outcomes"]:
        verdict = "CONFIRMED" if outcome["confirmed"] else "rejected"
        figure = "-" if outcome["figure"] is None else f"{outcome['figure']:.2g}"
        needs = f" needs {', '.join(outcome['needs'])}" if outcome["needs"] else ""
        print(f"{outcome['source']} -> {outcome['placement']} as {outcome['target']}: {verdict} ({figure}) "
              f"{outcome['reason']}{needs}")
    print(f"{len(result['families'])} families kept, {len(result['skipped'])} skipped, "
          f"{len(result['outcomes'])} candidates; {result['seconds']} s (scan {result['scan_seconds']} s)")


if __name__ == "__main__":
    main()
