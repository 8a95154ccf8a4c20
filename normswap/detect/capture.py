"""Run the model once on the meta device and record what each layer is called with.

Layers take family-specific inputs (RoPE ``position_embeddings``, BLOOM's ``alibi``,
T5's ``position_bias``, cross-attention states). Rather than synthesising them per
family, we run the whole model on meta tensors and capture each layer's real
arguments, plus the order in which norms and layers run (which tells embedding
norms from final norms). Meta tensors cost no memory and no arithmetic.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SourceError, first_line
from .meta_answers import AnswerDataQuestions
from .real_run import REAL_RUN_BYTES, cpu_twin, real_run_bytes, to_meta
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
    watched_outputs: dict[str, Any] = field(default_factory=dict)  # each watched module's first output, as it is
    watched_inputs: dict[str, Any] = field(default_factory=dict)  # each watched module's first input, as it is
    layer_outputs: dict[str, Any] = field(default_factory=dict)  # each layer's stream output, as it is
    layer_streams: dict[str, Any] = field(default_factory=dict)  # each layer's first tensor input, as it came

    def reads_layer_output(self, module_path: str, layer_path: str) -> bool:
        """Whether the watched module's input is, as it is or laid out otherwise, the stream ``layer_path`` hands on
        (a stage's final norm that the module around the stage runs: MobileViT's ``layernorm`` after its
        transformer)."""
        given, output = self.watched_inputs.get(module_path), self.layer_outputs.get(layer_path)
        return given is not None and _same_elements(given, output)

    def feeds_layer(self, module_path: str, layer_path: str) -> bool:
        """Whether the watched module's output is, as it is or laid out otherwise, the stream ``layer_path``
        receives (no position embedding added and no projection between them: an embedding norm then feeds the
        stack directly; SqueezeBERT's encoder hands its layers the norm's output permuted to channels first)."""
        stream, output = self.layer_streams.get(layer_path), self.watched_outputs.get(module_path)
        if stream is None or output is None:
            return True  # nothing to tell it by
        return _same_elements(stream, output)

    def hands_on(self, module_path: str, layer_path: str) -> bool:
        """Whether the watched module's output is seen to be the stream ``layer_path`` receives: the norm of the
        patch merging that ends one stage (FocalNet's ``downsample``) feeds the next stage's layers; an encoder's
        final norm does not feed its decoder's."""
        stream, output = self.layer_streams.get(layer_path), self.watched_outputs.get(module_path)
        return stream is not None and output is not None and _same_elements(stream, output)


def _same_elements(seen: Any, tensor: Any) -> bool:
    """``seen`` is ``tensor``, or both are views of one storage that differ only in the order of their axes
    (``permute``, ``transpose``): each axis keeps its size and step, and the first element is the same."""
    if seen is tensor:
        return True
    if not isinstance(seen, torch.Tensor) or not isinstance(tensor, torch.Tensor):
        return False
    root = seen._base if seen._base is not None else seen
    if root is not (tensor._base if tensor._base is not None else tensor):
        return False
    return (seen.storage_offset() == tensor.storage_offset()
            and sorted(zip(seen.shape, seen.stride(), strict=True)) == sorted(zip(tensor.shape, tensor.stride(),
                                                                                 strict=True)))


def find_layer_stacks(model: nn.Module, containers: tuple[type[nn.Module], ...] = (nn.ModuleList,)
                      ) -> list[tuple[str, list[tuple[str, nn.Module]]]]:
    """The ``nn.ModuleList``s (or other ``containers``) that hold the model's residual layers, outermost only.

    A stack is a ModuleList of modules of one class that hold weight matrices; lists
    nested inside another stack's layers (MoE experts, T5's sublayer list) are not stacks.
    """
    stacks: list[tuple[str, list[tuple[str, nn.Module]]]] = []
    for path, module in model.named_modules():
        if not isinstance(module, containers) or len(module) == 0:
            continue
        if any(path.startswith(stack_path + ".") for stack_path, _ in stacks):
            continue
        classes = {type(child) for child in module}
        if classes & {nn.ModuleList, nn.Sequential}:
            continue  # a list of stages, each a list of layers (SegFormer): the stages' lists are the stacks
        if len(classes) != 1 and len({_stream_parameter(type(child)) for child in module} - {None}) != 1:
            continue  # several classes that take one input first: a hybrid stack (OLMo-Hybrid's layer kinds)
        holds_matrices = all(any(p.dim() >= 2 for p in child.parameters()) for child in module)
        has_children = all(any(True for _ in child.children()) for child in module)
        if holds_matrices and has_children:
            prefix = f"{path}." if path else ""
            stacks.append((path, [(f"{prefix}{index}", child) for index, child in enumerate(module)]))
    return stacks


def _stream_parameter(cls: type) -> str | None:
    """The name of ``cls.forward``'s first input (after ``self``): the layers of a hybrid stack all take the stream
    first under one name (``hidden_states``), whatever else each takes."""
    try:
        parameters = list(inspect.signature(inspect.unwrap(cls.forward)).parameters)
    except (TypeError, ValueError):
        return None
    return parameters[1] if len(parameters) > 1 else None


def synthetic_inputs(model: nn.Module, config: Any, device: str = "meta") -> dict[str, torch.Tensor]:
    """Inputs of the model's main input kind (tokens, pixels or audio features), on ``device``."""
    name = getattr(model, "main_input_name", "input_ids")
    if name == "input_ids":  # with a mask, as models expect (without one, BERT-likes check the ids for padding)
        inputs = {"input_ids": torch.zeros(_BATCH, _SEQUENCE, dtype=torch.long, device=device),
                  "attention_mask": torch.ones(_BATCH, _SEQUENCE, dtype=torch.long, device=device)}
    elif name == "pixel_values":
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        inputs = {"pixel_values": torch.zeros(_BATCH, getattr(config, "num_channels", 3), size, size, device=device)}
    elif name == "input_features":
        frames = 2 * getattr(config, "max_source_positions", 1500)
        channels = getattr(config, "num_mel_bins", None) or getattr(config, "input_feat_per_channel", 80)
        inputs = {"input_features": torch.zeros(_BATCH, channels, frames, device=device)}
    elif name == "input_values":
        inputs = {"input_values": torch.zeros(_BATCH, _AUDIO_SAMPLES, device=device)}
    else:
        raise SourceError(
            f"{type(model).__name__} takes '{name}' as its main input; tracing needs a synthetic example of it, "
            "and normswap makes only token ids, pixel values and audio features or samples"
        )
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = torch.zeros(_BATCH, _SEQUENCE, dtype=torch.long, device=device)
    return inputs


def synthetic_forward(model: nn.Module, device: str, output_hooks: list[tuple[str, Any]],
                      mode: Any = None) -> None:
    """One forward pass of ``model`` on synthetic inputs on ``device``, with ``hook(module, args, output)`` on the
    output of each ``(path, hook)``, inside ``mode`` (a TorchFunctionMode that follows tensors) where given, and
    the data questions meta tensors cannot answer answered. The hooks are removed afterwards, whatever happens."""
    handles = [model.get_submodule(path).register_forward_hook(hook) for path, hook in output_hooks]
    try:
        with torch.no_grad(), AnswerDataQuestions(), mode if mode is not None else contextlib.nullcontext():
            model(**synthetic_inputs(model, model.config, device))
    finally:
        for handle in handles:
            handle.remove()


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
        meta_failure = failed
    needed = real_run_bytes(model)
    if needed <= REAL_RUN_BYTES:
        try:
            return _real_run(model, config, layers, watched)
        except _MetaRunError as failed:
            raise _run_failure(model, layers, failed, "on CPU with drawn weights") from failed.__cause__
    error = meta_failure.__cause__
    raise SourceError(
        f"running {type(model).__name__} on meta tensors failed at {_where(error)} ({type(error).__name__}: "
        f"{first_line(error)}), a step that needs data, and a real run of it takes {needed / 1024**3:.1f} GiB, "
        f"above normswap's {REAL_RUN_BYTES / 1024**3:.0f} GiB bound for one; inspect a config with fewer layers "
        "(num_hidden_layers) to see the layout, which does not depend on the depth"
    ) from error


def _real_run(model: nn.Module, config: Any, layers: dict[str, tuple[int, nn.Module]],
              watched: dict[str, nn.Module]) -> CapturedRun:
    """The capture on a CPU twin of ``model``, with each layer's arguments turned back into meta tensors."""
    twin = cpu_twin(model, config)
    twin_layers = {path: (index, twin.get_submodule(path)) for path, (index, _) in layers.items()}
    twin_watched = {path: twin.get_submodule(path) for path in watched}
    run = _run_once(twin, config, twin_layers, twin_watched, answer_data_questions=False, device="cpu")
    run.layer_calls = {path: LayerCall(to_meta(call.args), to_meta(call.kwargs))
                       for path, call in run.layer_calls.items()}
    run.outputs.clear()
    return run


def _run_failure(model: nn.Module, layers: dict[str, tuple[int, nn.Module]], failed: _MetaRunError,
                 how: str) -> SourceError:
    missed = sorted(set(layers) - set(failed.run.layer_calls))
    error = failed.__cause__
    return SourceError(
        f"running {type(model).__name__} {how} failed at {_where(error)} ({type(error).__name__}: "
        f"{first_line(error)}) before layer {missed[0] if missed else '?'} ran, with normswap's synthetic "
        f"inputs ({', '.join(synthetic_inputs(model, model.config))}); a model that needs other inputs to run "
        "cannot be inspected from its config"
    )


def _where(error: BaseException | None) -> str:
    """The innermost frame of the model's own code in ``error``'s traceback, as ``file.py:line``."""
    frames = traceback.extract_tb(error.__traceback__) if error is not None else []
    own = [frame for frame in frames
           if not any(str(Path(frame.filename).resolve()).startswith(folder) for folder in _NOT_MODEL_CODE)]
    if not own:
        return "an unknown place"
    frame = own[-1]
    return f"{Path(frame.filename).name}:{frame.lineno}" + (f" (`{frame.line.strip()}`)" if frame.line else "")


# torch's and normswap's own files: the folders of the packages, not names a checkout's path may contain too
_NOT_MODEL_CODE = (str(Path(torch.__file__).resolve().parent) + os.sep,
                   str(Path(__file__).resolve().parent.parent) + os.sep)


class _MetaRunError(Exception):
    def __init__(self, run: CapturedRun) -> None:
        super().__init__("meta run failed")
        self.run = run


def _run_once(model: nn.Module, config: Any, layers: dict[str, tuple[int, nn.Module]],
              watched: dict[str, nn.Module], answer_data_questions: bool, device: str = "meta") -> CapturedRun:
    run = CapturedRun()
    handles = []
    for path, (index, module) in layers.items():
        module.forward = _reusing_forward(module, module_signature(module, index), run, _recorder(run, path, True),
                                          path)
    for path, module in watched.items():
        handles.append(module.register_forward_pre_hook(_recorder(run, path, capture=False), with_kwargs=True))
        handles.append(module.register_forward_hook(
            lambda _module, _args, output, path=path: run.watched_outputs.setdefault(path, output)))
    answers = AnswerDataQuestions() if answer_data_questions else contextlib.nullcontext()
    try:
        with torch.no_grad(), answers:
            model(**synthetic_inputs(model, config, device))
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


def _reusing_forward(module: nn.Module, signature: tuple[Any, ...], run: CapturedRun, record: Any,
                     path: str) -> Any:
    """The layer's forward, recorded where it runs (a stack may call ``layer.forward(...)`` itself, as
    SqueezeBERT's does, which no forward hook sees) and run once per signature and input shapes."""
    original = type(module).forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        record(module, args, kwargs)
        key = (signature, input_signature(args, kwargs))
        if key not in run.outputs:
            run.outputs[key] = original(module, *args, **kwargs)
        output = run.outputs[key]
        run.layer_outputs[path] = output[0] if isinstance(output, (tuple, list)) and output else output
        return output

    return forward


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The first tensor a module was called with: a layer's stream, a norm's input."""
    return next((value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)), None)


def _recorder(run: CapturedRun, path: str, capture: bool) -> Any:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        run.call_order.append(path)
        if not capture and path not in run.watched_inputs:
            run.watched_inputs[path] = _first_tensor(args, kwargs)
        if capture and path not in run.layer_calls:
            run.layer_calls[path] = LayerCall(args, dict(kwargs))  # a CPU twin's are made meta copies afterwards
            run.layer_streams[path] = _first_tensor(args, kwargs)

    return hook
