"""Run the model once on the meta device and record what each layer is called with.

Layers take family-specific inputs (RoPE ``position_embeddings``, BLOOM's ``alibi``,
T5's ``position_bias``, cross-attention states). Rather than synthesising them per
family, we run the whole model on meta tensors and capture each layer's real
arguments, plus the order in which norms and layers run (which tells embedding
norms from final norms). Meta tensors cost no memory and no arithmetic.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import SourceError
from .meta_answers import AnswerDataQuestions
from .signature import input_signature, module_signature

_BATCH, _SEQUENCE = 1, 8
_AUDIO_SAMPLES = 4000  # a quarter second at 16 kHz: enough frames for wav2vec2-style feature encoders


@dataclass
class LayerCall:
    """The positional and keyword arguments one layer module was called with."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class CapturedRun:
    """Per-layer inputs and the order of module calls (by module path) during one meta forward."""

    layer_calls: dict[str, LayerCall] = field(default_factory=dict)
    call_order: list[str] = field(default_factory=list)
    outputs: dict[Any, Any] = field(default_factory=dict)  # layer output by (signature, input shapes)


def find_layer_stacks(model: nn.Module) -> list[tuple[str, list[tuple[str, nn.Module]]]]:
    """The ``nn.ModuleList``s that hold the model's residual layers, outermost only.

    A stack is a ModuleList of modules of one class that hold weight matrices; lists
    nested inside another stack's layers (MoE experts, T5's sublayer list) are not stacks.
    """
    stacks: list[tuple[str, list[tuple[str, nn.Module]]]] = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if any(path.startswith(stack_path + ".") for stack_path, _ in stacks):
            continue
        classes = {type(child) for child in module}
        if len(classes) != 1:
            continue
        holds_matrices = all(any(p.dim() >= 2 for p in child.parameters()) for child in module)
        has_children = all(any(True for _ in child.children()) for child in module)
        if holds_matrices and has_children:
            prefix = f"{path}." if path else ""
            stacks.append((path, [(f"{prefix}{index}", child) for index, child in enumerate(module)]))
    return stacks


def synthetic_inputs(model: nn.Module, config: Any) -> dict[str, torch.Tensor]:
    """Meta inputs of the model's main input kind (tokens, pixels or audio features)."""
    name = getattr(model, "main_input_name", "input_ids")
    if name == "input_ids":  # with a mask, as models expect (without one, BERT-likes check the ids for padding)
        inputs = {"input_ids": torch.zeros(_BATCH, _SEQUENCE, dtype=torch.long, device="meta"),
                  "attention_mask": torch.ones(_BATCH, _SEQUENCE, dtype=torch.long, device="meta")}
    elif name == "pixel_values":
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        inputs = {"pixel_values": torch.zeros(_BATCH, getattr(config, "num_channels", 3), size, size, device="meta")}
    elif name == "input_features":
        frames = 2 * getattr(config, "max_source_positions", 1500)
        channels = getattr(config, "num_mel_bins", None) or getattr(config, "input_feat_per_channel", 80)
        inputs = {"input_features": torch.zeros(_BATCH, channels, frames, device="meta")}
    elif name == "input_values":
        inputs = {"input_values": torch.zeros(_BATCH, _AUDIO_SAMPLES, device="meta")}
    else:
        raise SourceError(
            f"{type(model).__name__} takes '{name}' as its main input; tracing needs a synthetic example of it, "
            "and normswap makes only token ids, pixel values and audio features or samples"
        )
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = torch.zeros(_BATCH, _SEQUENCE, dtype=torch.long, device="meta")
    return inputs


def capture_run(model: nn.Module, config: Any, layers: dict[str, tuple[int, nn.Module]],
                watched: dict[str, nn.Module]) -> CapturedRun:
    """Run ``model`` on meta inputs; record layer arguments and the call order of ``watched`` modules.

    ``layers`` maps each layer's path to its index in its stack and its module. A layer that
    equals one already run (same signature, same input shapes) is not run again: its
    predecessor's output is passed on, since on meta tensors only shapes flow anyway.
    The run goes plain first; only if the model asks a data-dependent question (``.item()``,
    ``nonzero()``) is it repeated with those questions answered, which costs a Python
    dispatch per operation.
    """
    try:
        return _run_once(model, config, layers, watched, answer_data_questions=False)
    except Exception:  # noqa: BLE001 - retried with data questions answered; a second failure is reported
        pass
    try:
        return _run_once(model, config, layers, watched, answer_data_questions=True)
    except _MetaRunError as failed:
        missed = sorted(set(layers) - set(failed.run.layer_calls))
        error = failed.__cause__
        raise SourceError(
            f"running {type(model).__name__} on meta tensors failed ({type(error).__name__}: {error}) "
            f"before layer {missed[0] if missed else '?'} ran; the model may need inputs normswap cannot synthesise"
        ) from error


class _MetaRunError(Exception):
    def __init__(self, run: CapturedRun) -> None:
        super().__init__("meta run failed")
        self.run = run


def _run_once(model: nn.Module, config: Any, layers: dict[str, tuple[int, nn.Module]],
              watched: dict[str, nn.Module], answer_data_questions: bool) -> CapturedRun:
    run = CapturedRun()
    handles = []
    for path, (index, module) in layers.items():
        handles.append(module.register_forward_pre_hook(_recorder(run, path, capture=True), with_kwargs=True))
        module.forward = _reusing_forward(module, module_signature(module, index), run)
    for path, module in watched.items():
        handles.append(module.register_forward_pre_hook(_recorder(run, path, capture=False), with_kwargs=True))
    answers = AnswerDataQuestions() if answer_data_questions else contextlib.nullcontext()
    try:
        with torch.no_grad(), answers:
            model(**synthetic_inputs(model, config))
    except SourceError:
        raise
    except Exception as error:
        raise _MetaRunError(run) from error
    finally:
        for handle in handles:
            handle.remove()
        for _, module in layers.values():
            del module.forward
    return run


def _reusing_forward(module: nn.Module, signature: tuple[Any, ...], run: CapturedRun) -> Any:
    original = type(module).forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        key = (signature, input_signature(args, kwargs))
        if key not in run.outputs:
            run.outputs[key] = original(module, *args, **kwargs)
        return run.outputs[key]

    return forward


def _recorder(run: CapturedRun, path: str, capture: bool) -> Any:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        run.call_order.append(path)
        if capture and path not in run.layer_calls:
            run.layer_calls[path] = LayerCall(args, dict(kwargs))

    return hook
