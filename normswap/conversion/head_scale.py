"""What a family's code does between its last final norm and its LM head, measured (docs/design.md §5).

The extra-dimension map reads the final norm's output into the LM head through ``E diag(g) U^T / s``, which is
exact only where the head reads that output as it is, or times a scale that one more dimension leaves alone. T5
multiplies the decoder's output by ``d_model ** -0.5`` before its head (where its config says so), and
``d_model`` is the stream's width, which the map makes d+1. So the scale is measured on both widths
(``measure_head_scale``) and their ratio folded into the head's weight. No family is named.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..detect.capture import synthetic_forward
from ..detect.real_run import on_meta_else_cpu
from ..errors import NormswapError, first_line


class _HeadReachedError(Exception):
    """Stops a probe at the LM head: what it computes is not needed."""


def measure_head_scale(meta: nn.Module, final_norm: str, head: str, family: str) -> float:
    """The factor between ``final_norm``'s output and what ``head`` reads, measured on ``meta``: ``head`` is the LM
    head, or the first linear map of a head with layers of its own (``head_chain.py``).

    How: ``meta`` (weightless, consumed: pass a model of its own) runs once on synthetic inputs, on the meta device
    (where its code cannot run there, on a CPU twin, as ``trace_stream_uses`` does); the final norm's output is
    replaced by one row of signed powers of two at every position, which any scale multiplies exactly, and the
    head's input is caught and the run stopped there. The row at every position keeps the measure whole where the
    code keeps only some positions (the last token's logits). In float64 on the meta device (float32 on a CPU
    twin) whatever the checkpoint's dtype: bf16 would round d ** -0.5 and (d+1) ** -0.5 alike.
    """
    norm_weight = getattr(meta.get_submodule(final_norm), "weight", None)  # the head may read it through layers
    width = int((norm_weight if norm_weight is not None else meta.get_output_embeddings().weight).shape[-1])
    row = _probe_row(width)

    def attempt(model: nn.Module, device: str) -> Any:
        captured: dict[str, Any] = {}

        def replace(module: nn.Module, args: tuple, output: Any) -> torch.Tensor:
            if not isinstance(output, torch.Tensor):
                raise NormswapError(f"{final_norm} in {family} returns a {type(output).__name__}, not the normed "
                                    "stream alone, so what its LM head reads of it cannot be measured")
            return row.to(_dtype(model)).expand(*output.shape[:-1], width).clone()

        def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured["input"] = args[0] if args else next(iter(kwargs.values()), None)
            raise _HeadReachedError

        handle = model.get_submodule(head).register_forward_pre_hook(stop, with_kwargs=True)
        try:
            synthetic_forward(model, device, [(final_norm, replace)])
        except _HeadReachedError:
            pass
        finally:
            handle.remove()
        if "input" not in captured:
            raise NormswapError(f"{head} did not run when {family} ran on synthetic inputs")
        return captured["input"]

    try:
        found = on_meta_else_cpu(meta.double().eval(), attempt)
    except NormswapError:
        raise
    except Exception as error:  # the family's own code failed on the probe: say which, and why
        raise NormswapError(f"cannot measure how {family} scales what {head} reads from {final_norm} "
                            f"({type(error).__name__}: {first_line(error)})") from error
    if not isinstance(found, torch.Tensor) or found.is_meta or found.shape[-1] != width:
        raise NormswapError(f"cannot measure how {family} scales what {head} reads: its input depends on more "
                            f"than {final_norm}'s output")
    values = found.detach().double().reshape(-1, width)
    scale = float((values / row).mean())
    expected = (scale * row).expand_as(values)
    if not math.isfinite(scale) or scale == 0.0 or not torch.allclose(values, expected, rtol=1e-6, atol=0.0):
        raise NormswapError(f"{head} in {family} does not read {final_norm}'s output times a scale, so one extra "
                            "dimension cannot carry what it reads exactly")
    return scale


def _dtype(model: nn.Module) -> torch.dtype:
    """The model's floating dtype: float64 on the meta device, float32 on a CPU twin."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float64)


def _probe_row(width: int) -> torch.Tensor:
    """Signed powers of two, float64: none zero, so each entry measures the scale."""
    generator = torch.Generator().manual_seed(0)
    magnitudes = torch.pow(2.0, torch.randint(-2, 3, (width,), generator=generator).double())
    signs = torch.randint(0, 2, (width,), generator=generator).double() * 2 - 1
    return signs * magnitudes
