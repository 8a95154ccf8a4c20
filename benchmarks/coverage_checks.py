"""The worker side of the coverage matrix: which families there are, building them tiny, checking each cell.

Families are found in transformers' own auto mappings and built tiny from a config.

Every model type transformers registers is a candidate. Its config is shrunk by overriding whichever of the
common size fields its config class has (hidden 64, 2 layers, 4 heads, vocabulary 128); the preferred head
class is built from it and kept if it builds in a few seconds and runs a forward pass on normswap's own probe
inputs. A candidate that fails is skipped with the reason, so the document can list it. No hand list decides
what is covered: the hand configs of ``tests/tiny_configs.py`` are only a second try for a model type whose
generic sizing failed, and the source of four layout variants (``VARIANTS``) that no default config shows.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from normswap.conversion.repeatable import same_random_draws

ROOT = Path(__file__).resolve().parent.parent
BUILD_SECONDS = 20  # "builds from a config in a few seconds": slower candidates are skipped
MAX_PARAMETERS = 20_000_000  # a tiny config that is still this large did not shrink (a fixed-size part)
VOCAB = 128
# layouts that only a config flag shows: taken from the tests' hand configs, named as there
VARIANTS = ("opt_post", "gpt_neox_sequential", "falcon_sequential", "falcon_new", "stablelm_parallel")

_SIZES: dict[int, tuple[str, ...]] = {
    64: ("hidden_size", "d_model", "n_embd", "n_embed", "dim", "embed_dim", "embedding_size", "word_embed_proj_dim",
         "max_position_embeddings", "n_positions", "n_ctx", "max_target_positions"),
    2: ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers", "decoder_layers",
        "num_encoder_layers", "num_decoder_layers", "num_experts_per_tok", "n_group", "topk_group"),
    4: ("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
        "decoder_attention_heads", "num_local_experts", "num_experts", "n_routed_experts"),
    16: ("head_dim", "d_kv", "kv_channels", "v_head_dim", "qk_nope_head_dim"),
    8: ("rotary_dim", "qk_rope_head_dim"),
    32: ("kv_lora_rank", "q_lora_rank", "max_source_positions"),
    128: ("intermediate_size", "ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "d_ff", "n_inner", "hidden_dim",
          "ffn_hidden_size", "moe_intermediate_size", "shared_expert_intermediate_size", "vocab_size"),
}
_OPTIONAL = {"num_key_value_heads": 2, "n_shared_experts": 1}  # set only where the default is a number
_TOKENS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 2,
           "sep_token_id": 2, "cls_token_id": 1, "mask_token_id": 3, "unk_token_id": 0}


# a refusal that names this flag as the fix (tied embeddings: the flag costs a copy of them) is followed, as a user
# would, and the cell says so
FOLLOWED_FLAG = "--untie"
CELL_SECONDS = 300  # one conversion of a tiny model takes ~10 s; one that runs past this is a crash
LOAD_SECONDS = 120
EXACT_BOUND = 1e-4  # max abs difference relative to max |reference|: normswap's own fp32 bound
CATEGORIES = ("crash", "bad output", "usage", "refused", "no-op", "approximate", "exact")


@dataclass(frozen=True)
class Cell:
    """One cell's outcome: its category, the figure behind it and the message a user saw."""

    family: str
    cell: str  # "inspect", "placement pre", "norm layernorm --exact", ...
    category: str  # "ok" (inspect only) or one of CATEGORIES
    figure: float | None = None  # relative difference (exact) or output cosine (approximate)
    message: str = ""
    seconds: float = 0.0


@dataclass(frozen=True)
class Candidate:
    """One row of the matrix before it is built: a model type, or a hand-configured layout variant of one."""

    name: str
    model_type: str


@dataclass(frozen=True)
class Built:
    """A family that built: the model, the auto class that loads it, and how its config was found."""

    name: str
    model: nn.Module
    auto_class: str
    hand_config: bool
    seconds: float


class Expired(BaseException):
    """A deadline passed: not an ``Exception``, so that no handler in between (normswap's command line reports
    every ``Exception`` as one line, a ``TimeoutError`` as a refusal) takes it for an ordinary failure."""


class SkipError(Exception):
    """The candidate cannot be a row: the message says why (too large, slow, needs other inputs, fails)."""


def candidates() -> list[Candidate]:
    """Every model type that some auto mapping names a model class for, then the layout variants."""
    from transformers.models.auto import modeling_auto

    types: set[str] = set()
    for mapping in (*_MAPPINGS, "MODEL_MAPPING_NAMES"):
        types.update(getattr(modeling_auto, mapping))
    hand = _hand_configs()
    return [Candidate(t, t) for t in sorted(types)] + [Candidate(v, hand[v]["model_type"]) for v in VARIANTS]


def candidate(name: str) -> Candidate:
    """The candidate called ``name`` (a model type or a variant)."""
    if name in VARIANTS:
        return Candidate(name, _hand_configs()[name]["model_type"])
    return Candidate(name, name.replace("_", "-") if _is_dashed(name) else name)


def build(item: Candidate) -> Built:
    """The tiny model of ``item``, perturbed, or ``SkipError`` with the reason."""
    from transformers import CONFIG_MAPPING

    started = time.monotonic()
    if item.model_type not in CONFIG_MAPPING:
        raise SkipError(f"no config class registered for {item.model_type}")
    hand = _hand_config(item)
    tries: list[tuple[Callable[[], Any], bool]] = []
    if item.name not in VARIANTS:  # with 2 key-value heads, then without (families that insist on plain heads)
        tries += [(lambda: _generic_config(item.model_type, True), False),
                  (lambda: _generic_config(item.model_type, False), False)]
    if hand is not None:
        tries.append((lambda: CONFIG_MAPPING[item.model_type](**hand), True))
    errors: list[str] = []
    for config, hand_made in tries:
        try:
            return _built(item, config(), hand_made, started)
        except Exception as error:  # noqa: BLE001 - whatever fails, the next way may do
            errors.append(str(error) if isinstance(error, SkipError) else _one_line(error))
    # the generic sizing's last word (plain heads), which a missing key-value head count cannot explain
    raise SkipError(errors[min(1, len(errors) - 1)] if errors else "no hand config")


def perturb(model: nn.Module, seed: int) -> None:
    """Add 0.1 · N(0, 1) to every parameter, so that no weight keeps an initial value a folding bug could hide
    behind (unit norm weights, zero biases, Gemma's zero offsets)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.is_floating_point():
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator).to(parameter.dtype))


def inputs_for(model: nn.Module) -> dict[str, torch.Tensor]:
    """Inputs of the structure normswap's probe gives, with token ids of their own (other shape, other seed),
    so the check does not only repeat the conversion's own verification."""
    from normswap.conversion.verify import probe_inputs

    inputs = probe_inputs(model, None, None)
    generator = torch.Generator().manual_seed(1234)
    for name in ("input_ids", "decoder_input_ids"):
        if name in inputs:
            vocab = model.get_input_embeddings().num_embeddings if name == "input_ids" else VOCAB
            ids = torch.randint(3, min(vocab, VOCAB), (2, 12), generator=generator)
            inputs[name] = ids
            mask = name.replace("input_ids", "attention_mask")
            if mask in inputs:
                inputs[mask] = torch.ones_like(ids)
    return inputs


def main_output(output: Any) -> torch.Tensor:
    """What a user reads from the model: the logits where it has a head, else the last hidden state."""
    for name in ("logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value.detach().double()
    value = output[0] if isinstance(output, (tuple, list)) or hasattr(output, "to_tuple") else output
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{type(output).__name__} holds no output tensor")
    return value.detach().double()


@contextlib.contextmanager
def deadline(seconds: int, what: str) -> Iterator[None]:
    """Raise ``Expired`` in the main thread once ``seconds`` have passed (a stuck build, load or forward)."""

    def expire(signum: int, frame: object) -> None:
        raise Expired(f"{what} took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


_MAPPINGS = ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
             "MODEL_FOR_MASKED_LM_MAPPING_NAMES", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
             "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES")
_AUTO = {"MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES": "AutoModelForSeq2SeqLM",
         "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES": "AutoModelForSpeechSeq2Seq",
         "MODEL_FOR_MASKED_LM_MAPPING_NAMES": "AutoModelForMaskedLM",
         "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": "AutoModelForCausalLM",
         "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES": "AutoModelForImageTextToText",
         "MODEL_MAPPING_NAMES": "AutoModel"}


def preferred_mapping(model_type: str, encoder_decoder: bool) -> str | None:
    """Which mapping's class to build: the class its checkpoints are published as, with their head. A causal LM
    head, else a masked LM head, else an image-text-to-text head (a vision-language model's language model with
    its LM head: LLaVA's checkpoints are ``LlavaForConditionalGeneration``), else seq2seq, else the base model.

    Two refinements of that order: an encoder-decoder takes its seq2seq head (its causal-LM class, where it has
    one, is the decoder alone), and a family with both a masked-LM and a causal-LM head takes the masked one
    (those are encoders: BERT's causal class is a decoder variant the checkpoints were not trained as)."""
    from transformers.models.auto import modeling_auto

    order = (_MAPPINGS if encoder_decoder else
             ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
              "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", *_MAPPINGS[:2]))
    for mapping in (*order, "MODEL_MAPPING_NAMES"):
        if model_type in getattr(modeling_auto, mapping):
            return mapping
    return None


def _built(item: Candidate, config: Any, hand: bool, started: float) -> Built:
    import transformers
    from transformers.models.auto import modeling_auto

    mapping = preferred_mapping(item.model_type, bool(getattr(config, "is_encoder_decoder", False)))
    if mapping is None:
        raise SkipError("no model class in the auto mappings")
    names = getattr(modeling_auto, mapping)[item.model_type]
    class_name = names[0] if isinstance(names, (list, tuple)) else names
    try:  # imported before the deadline: an alarm inside an import leaves transformers half-imported, and
        # every later candidate of this process then fails with "Could not import module"
        model_class = getattr(transformers, class_name)
    except Exception as error:  # noqa: BLE001 - a family whose code does not import is no row
        raise SkipError(f"{class_name}: {_one_line(error)}") from None
    try:
        with deadline(BUILD_SECONDS, "building"):
            main_input = getattr(model_class, "main_input_name", "input_ids")
            if main_input not in ("input_ids", "pixel_values", "input_features"):
                raise SkipError(f"{class_name} takes '{main_input}', which normswap's probe cannot provide")
            with torch.device("meta"):
                size = sum(p.numel() for p in model_class(config).parameters())
            if size > MAX_PARAMETERS:
                raise SkipError(f"{size / 1e6:.0f}M parameters at the tiny sizes (a part the size fields "
                                   "do not reach)")
            torch.manual_seed(0)
            model = model_class(config).eval()
            perturb(model, seed=0)
            inputs = inputs_for(model)
            with torch.no_grad():
                main_output(model(**inputs))
    except SkipError:
        raise
    except (Exception, Expired) as error:  # noqa: BLE001 - any failure to build or run skips the candidate
        raise SkipError(f"{class_name}: {_one_line(error)}") from None
    seconds = time.monotonic() - started
    return Built(item.name, model, _AUTO[mapping], hand, seconds)


def _generic_config(model_type: str, optional: bool) -> Any:
    """The config class of ``model_type`` built with every common size field it has set small, in its sub-configs
    too (a vision-language model's text and vision parts); ``optional``: with the key-value head count too."""
    from transformers import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    try:
        default = config_class()
    except Exception as error:  # noqa: BLE001 - a config that needs arguments has no generic tiny form
        raise SkipError(f"its config class needs arguments: {_one_line(error)}") from None
    overrides = _overrides(default, optional)
    for name in getattr(config_class, "sub_configs", {}):
        sub = _attribute(default, name)
        if sub is not None and hasattr(sub, "to_dict"):
            # only the sizes and the type: derived per-layer lists (layer_types) are derived again
            overrides[name] = {"model_type": sub.model_type, **_overrides(sub, optional)}
    try:
        return config_class(**overrides)
    except Exception as error:  # noqa: BLE001
        raise SkipError(f"the tiny sizes are not a valid config: {_one_line(error)}") from None


def _overrides(default: Any, optional: bool = True) -> dict[str, Any]:
    """The size and token-id fields of ``default`` that exist on it, set small (tokens inside the vocabulary)."""
    overrides: dict[str, Any] = {}
    for value, names in _SIZES.items():
        for name in names:
            current = _attribute(default, name)
            if isinstance(current, int) and not isinstance(current, bool):
                overrides[name] = value
    if "qk_rope_head_dim" in overrides and "head_dim" in overrides:  # multi-head latent attention: rope's size
        overrides["head_dim"] = overrides["qk_rope_head_dim"]
    for name, value in _OPTIONAL.items():
        if optional and isinstance(_attribute(default, name), int):
            overrides[name] = value
    for name, token in _TOKENS.items():
        current = _attribute(default, name)
        if isinstance(current, int) and current >= VOCAB:
            overrides[name] = token
        elif isinstance(current, list):
            overrides[name] = [t if t < VOCAB else token for t in current if isinstance(t, int)]
    return overrides


def _attribute(config: Any, name: str) -> Any:
    """``getattr`` that gives None where a config refuses the question (per-layer attributes of heterogeneous
    configs raise)."""
    try:
        return getattr(config, name, None)
    except Exception:  # noqa: BLE001
        return None


def _hand_configs() -> dict[str, dict[str, Any]]:
    spec = importlib.util.spec_from_file_location("normswap_tiny_configs", ROOT / "tests" / "tiny_configs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TINY_CONFIGS


def _hand_config(item: Candidate) -> dict[str, Any] | None:
    """The tests' hand config of this candidate: by name, else the one for its model type."""
    configs = _hand_configs()
    found = configs.get(item.name) or next(
        (c for c in configs.values() if c["model_type"] == item.model_type), None)
    return None if found is None else {k: v for k, v in found.items() if k != "model_type"}


def _is_dashed(name: str) -> bool:
    from transformers import CONFIG_MAPPING

    return name not in CONFIG_MAPPING and name.replace("_", "-") in CONFIG_MAPPING


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or "no message"
    return f"{type(error).__name__}: {text[:300]}"


# --- the cells ---

@dataclass(frozen=True)
class Source:
    """The saved source of one family and what the converted models are held to."""

    name: str
    folder: Path
    auto_class: str
    inputs: dict[str, torch.Tensor]
    reference: torch.Tensor
    tokens: torch.Tensor | None  # greedy generate() of a causal LM
    placement: str


def conversion_cells(placement: str, norm: str) -> list[str]:
    """The cells of a family whose inspection said ``placement`` and ``norm``: the other placement (both for a
    layout that is neither pre nor post, or unknown), and the norm kinds its norms can change to."""
    cells = {"pre": ["placement post"], "post": ["placement pre"]}.get(placement, ["placement pre", "placement post"])
    if norm.startswith("layernorm"):
        return [*cells, "norm rmsnorm"]
    if norm in ("rmsnorm", "rmsnorm-noaffine"):
        return [*cells, "norm layernorm", "norm layernorm --exact"]
    if norm == "rmsnorm-offset":
        return [*cells, "norm rmsnorm", "norm layernorm", "norm layernorm --exact"]
    return [*cells, "norm rmsnorm", "norm layernorm"]


def check_family(name: str, folder: Path, emit: Callable[[dict[str, Any]], None],
                 only: Iterable[str] | None = None) -> None:
    """Build, save, inspect and convert one family, emitting a header line and one line per cell; ``only``: run
    these conversion cells instead of those its layout calls for."""
    import transformers

    try:
        built = build(candidate(name))
        source_folder = folder / "src"
        built.model.save_pretrained(source_folder)
        auto = getattr(transformers, built.auto_class)
        with deadline(LOAD_SECONDS, "loading the saved source"):
            model = auto.from_pretrained(source_folder).eval()
        inputs = inputs_for(model)
        with torch.no_grad(), same_random_draws():  # ViTMAE masks random patches on every forward
            reference = main_output(model(**inputs))
        tokens = _source_tokens(model, inputs) if built.auto_class == "AutoModelForCausalLM" else None
    except SkipError as error:
        emit({"kind": "skip", "skipped": str(error)})
        return
    except (Exception, Expired) as error:  # noqa: BLE001 - transformers' own round trip failed: no row
        emit({"kind": "skip", "skipped": f"the saved source does not load and run back: {_one_line(error)}"})
        return
    inspected = _inspect(name, source_folder)
    topology = json.loads(inspected.message) if inspected.category == "ok" else {}
    placement, norm = topology.get("placement", "?"), topology.get("norm", "?")
    emit({"kind": "family", "model_type": built.model.config.model_type, "model_class": type(built.model).__name__,
          "auto_class": built.auto_class,
          "hand_config": built.hand_config, "placement": placement, "norm": norm,
          "branch_output_norm": any(norm["slot"] == "out" for layer in topology.get("layers", ())
                                    for sublayer in layer["sublayers"] for norm in sublayer["norms"]),
          "encoder_decoder": bool(getattr(built.model.config, "is_encoder_decoder", False))})
    summary = f"{placement}, {norm}" if inspected.category == "ok" else inspected.message
    emit({"kind": "cell", "cell": asdict(Cell(name, "inspect", inspected.category, None, summary,
                                               inspected.seconds))})
    source = Source(name, source_folder, built.auto_class, inputs, reference, tokens, placement)
    for cell in conversion_cells(placement, norm) if only is None else only:
        emit({"kind": "start", "cell": cell})
        emit({"kind": "cell", "cell": asdict(convert_cell(source, cell))})


def _inspect(name: str, source: Path) -> Cell:
    """``normswap inspect SRC --json``, run in this process (the command line's own ``main``); the message holds
    the JSON when it succeeds."""
    from normswap.cli import main

    started = time.monotonic()
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), deadline(CELL_SECONDS, "inspect"):
            code = main(["inspect", str(source), "--json"])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 2
    except Expired as expired:
        return Cell(name, "inspect", "crash", None, f"timed out: {expired}", time.monotonic() - started)
    seconds = time.monotonic() - started
    if code == 0:
        try:
            json.loads(out.getvalue())
            return Cell(name, "inspect", "ok", None, out.getvalue(), seconds)
        except json.JSONDecodeError:
            return Cell(name, "inspect", "crash", None, "exit 0 without JSON on stdout", seconds)
    category, message = _failure(code, err.getvalue(), {source: "SRC"})
    return Cell(name, "inspect", category, None, message, seconds)


def convert_cell(source: Source, cell: str) -> Cell:
    """``python -m normswap convert SRC DST <cell flags> --quiet --json`` in a subprocess, then the checks of
    what it wrote: load, forward, generate, re-inspect."""
    # a name of its own: transformers caches generated code by folder name, across the processes of a run
    destination = source.folder.parent / re.sub(r"\W+", "-", f"{source.name} {cell}").strip("-")
    flags = f"--{cell}".split()  # "norm layernorm --exact" -> --norm layernorm --exact
    started = time.monotonic()
    followed = ""
    try:
        done = _convert(source.folder, destination, flags)
        if done.returncode == 1 and FOLLOWED_FLAG in done.stderr:  # the refusal says to pass it: a user would
            done, followed = _convert(source.folder, destination, [*flags, FOLLOWED_FLAG]), f"with {FOLLOWED_FLAG}: "
    except subprocess.TimeoutExpired:
        return Cell(source.name, cell, "crash", None, f"timed out after {CELL_SECONDS} s",
                    time.monotonic() - started)
    seconds = time.monotonic() - started
    paths = {source.folder: "SRC", destination: "DST"}
    if done.returncode != 0:
        category, message = _failure(done.returncode, done.stderr, paths)
        return Cell(source.name, cell, category, None, followed + message, seconds)
    try:
        result = json.loads(done.stdout)
    except json.JSONDecodeError:
        return Cell(source.name, cell, "crash", None, "exit 0 without JSON on stdout", seconds)
    if result.get("destination") is None:
        notes = result.get("plan", {}).get("notes") or ["nothing written"]
        return Cell(source.name, cell, "no-op", None, _clean(str(notes[0]), paths), seconds)
    try:
        category, figure, message = _judge(source, cell, destination, bool(result["plan"].get("exact")))
    finally:
        shutil.rmtree(destination, ignore_errors=True)
    return Cell(source.name, cell, category, figure, followed + _clean(message, paths), seconds)


def _convert(source: Path, destination: Path, flags: list[str]) -> subprocess.CompletedProcess[str]:
    """One ``normswap convert`` as a user runs it (``TimeoutExpired`` past ``CELL_SECONDS``)."""
    command = [sys.executable, "-m", "normswap", "convert", str(source), str(destination), *flags, "--quiet", "--json"]
    return subprocess.run(command, capture_output=True, text=True, timeout=CELL_SECONDS, check=False)


def _judge(source: Source, cell: str, destination: Path, exact: bool) -> tuple[str, float | None, str]:
    """Exact or approximate with its figure, or a bad output with what went wrong."""
    import transformers

    import normswap

    remote = "auto_map" in json.loads((destination / "config.json").read_text())
    loader = f"{source.auto_class}.from_pretrained(DST{', trust_remote_code=True' if remote else ''})"
    try:
        with deadline(LOAD_SECONDS, "loading DST"):
            model = getattr(transformers, source.auto_class).from_pretrained(destination,
                                                                             trust_remote_code=remote).eval()
    except (Exception, Expired) as error:  # noqa: BLE001 - every load failure is a bad output
        return "bad output", None, f"{loader} fails: {_one_line(error)}"
    try:
        with deadline(LOAD_SECONDS, "the forward pass"), torch.no_grad(), same_random_draws():
            output = main_output(model(**source.inputs))
    except (Exception, Expired) as error:  # noqa: BLE001
        return "bad output", None, f"forward fails: {_one_line(error)}"
    if output.shape != source.reference.shape:
        return "bad output", None, f"output shape {tuple(output.shape)}, not {tuple(source.reference.shape)}"
    if not torch.isfinite(output).all():
        return "bad output", None, "NaN or Inf in the output"
    relative = float((output - source.reference).abs().max() / source.reference.abs().max())
    cosine = float(torch.nn.functional.cosine_similarity(output.flatten(0, -2), source.reference.flatten(0, -2),
                                                         dim=-1).mean())
    if exact and relative > EXACT_BOUND:
        return "bad output", relative, f"claims exact but differs by {relative:.2g} × max|reference|"
    if source.tokens is not None:
        try:
            tokens = _generate(model, source.inputs)
        except (Exception, Expired) as error:  # noqa: BLE001
            return "bad output", None, f"generate() fails: {_one_line(error)}"
        if exact and not torch.equal(tokens, source.tokens):
            return "bad output", relative, "claims exact but generate() picks other tokens than the source"
    try:
        with deadline(LOAD_SECONDS, "re-inspection"):
            topology = normswap.inspect(str(destination), trust_remote_code=remote)
    except (Exception, Expired) as error:  # noqa: BLE001
        return "bad output", None, f"re-inspection fails: {_one_line(error)}"
    kinds = {norm.kind for norm in topology.all_norms if norm.kind != "identity"}
    wrong = _wrong_layout(cell, topology.placement, kinds, source.placement)
    if wrong:
        return "bad output", None, f"re-inspected as {topology.placement}, {topology.norm}: {wrong}"
    return ("exact", relative, "") if exact else ("approximate", cosine, "")


def _wrong_layout(cell: str, placement: str, kinds: set[str], source_placement: str) -> str:
    """What the re-inspected layout (its placement, and its norms' kinds) lacks of the cell's target ('' when it
    has it). A norm-kind target is met when every norm is of that kind, with or without weights or bias."""
    flag, target = cell.split()[:2]
    if flag == "placement":
        return "" if placement == target else f"not {target}"
    if placement != source_placement:
        return f"the placement changed from {source_placement}"
    if target == "rmsnorm":
        return "" if kinds <= {"rmsnorm", "rmsnorm-noaffine"} else "not all RMSNorm"
    return "" if all(kind.startswith("layernorm") for kind in kinds) else "not all LayerNorm"


def _source_tokens(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The source's greedy tokens, or None where the stock model cannot generate (then neither is asked to)."""
    try:
        return _generate(model, inputs)
    except (Exception, Expired):  # noqa: BLE001
        return None


def _generate(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Three greedy tokens after the first probe row."""
    with deadline(LOAD_SECONDS, "generate()"), torch.no_grad():
        ids = inputs["input_ids"][:1]
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                             pad_token_id=0)
    if out.shape[-1] <= ids.shape[-1]:
        raise RuntimeError("no new tokens")
    return out[:, ids.shape[-1]:]


def _failure(code: int, stderr: str, paths: dict[Path, str]) -> tuple[str, str]:
    """The category and message of a run that did not exit 0: refused, usage, or crash."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    error = next((line for line in reversed(lines) if line.startswith("Error: ")), None)
    message = _clean((error or (lines[-1] if lines else "no message")).removeprefix("Error: "), paths)
    if "Traceback (most recent call last)" in stderr:
        return "crash", f"traceback: {message}"
    if code == 2:
        return "usage", message
    if code == 1 and error is not None:
        return ("crash" if "this is a normswap bug" in error else "refused"), message
    return "crash", f"exit {code}: {message}"


def _clean(message: str, paths: dict[Path, str]) -> str:
    """The message without this run's temporary paths, so equal messages of different families group."""
    for path, name in sorted(paths.items(), key=lambda item: -len(str(item[0]))):
        message = message.replace(str(path.resolve()), name).replace(str(path), name)
    return message
