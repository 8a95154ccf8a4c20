"""What a family's code multiplies the final norm's output by before the LM head reads it, measured.

MiniCPM3 divides the final hidden states by ``hidden_size / dim_model_base``: a factor that one more hidden
dimension changes, so the extra-dimension map's LM head (``E diag(g) U^T``) reads a stream scaled differently
in the wider code. Measured on both codes, the ratio folds into the LM head's weight. No family is named; where
the code does more than scale (or the probe cannot reach the head), nothing is folded and the exactness check
has the last word.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..detect.meta_answers import AnswerDataQuestions
from .repeatable import same_random_draws


class _HeadReachedError(Exception):
    """Stops a probe at the LM head: the head's own weights are not needed."""


def head_scale(meta: nn.Module, final_norm: str) -> float | None:
    """The scalar by which ``meta``'s code multiplies ``final_norm``'s output before its LM head reads it, or None
    where the head reads something else than a scaled copy (or the probe cannot get there).

    ``meta`` (weightless; consumed) runs on meta tensors up to the final norm, whose output is replaced by a CPU
    tensor of powers of two, which any scale multiplies exactly; the head's input is captured and the run stopped.
    """
    head = meta.get_output_embeddings()
    if head is None:
        return None
    captured: dict[str, Any] = {}

    def replace(module: nn.Module, args: tuple, output: Any) -> Any:
        tensor = output[0] if isinstance(output, tuple) else output
        probe = _probe(tuple(tensor.shape))
        captured["probe"] = probe
        return (probe, *output[1:]) if isinstance(output, tuple) else probe

    def stop(module: nn.Module, args: tuple) -> None:
        captured["read"] = args[0] if args else None
        raise _HeadReachedError

    handles = [meta.get_submodule(final_norm).register_forward_hook(replace),
               head.register_forward_pre_hook(stop)]
    ids = torch.zeros(1, 4, dtype=torch.long)
    try:
        with torch.no_grad(), same_random_draws(), AnswerDataQuestions():  # mask checks ask meta tensors
            meta.eval()(input_ids=ids, attention_mask=torch.ones_like(ids))
    except _HeadReachedError:
        pass
    except Exception:  # noqa: BLE001 - the code did something the probe cannot follow: nothing to fold
        return None
    finally:
        for handle in handles:
            handle.remove()
    probe, read = captured.get("probe"), captured.get("read")
    if not isinstance(read, torch.Tensor) or read.is_meta or probe is None or read.shape[-1] != probe.shape[-1]:
        return None
    read = read.double().reshape(-1, probe.shape[-1])
    rows = probe.double().reshape(-1, probe.shape[-1])[-read.shape[0]:]  # the head may read the last tokens only
    scale = float((read / rows).mean())
    if not math.isfinite(scale) or not torch.allclose(read, scale * rows, rtol=1e-6, atol=0.0):
        return None
    return scale


def _probe(shape: tuple[int, ...]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    magnitudes = torch.pow(2.0, torch.randint(-2, 3, shape, generator=generator).float())
    return magnitudes * (torch.randint(0, 2, shape, generator=generator) * 2 - 1)
