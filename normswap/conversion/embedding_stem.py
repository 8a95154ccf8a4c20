"""What a family's code does to the token embeddings before the first layer, measured (docs/design.md §5).

The extra-dimension map needs the stream entering the first layer to be exactly U times the original one. Code
that scales the embeddings by a function of ``hidden_size`` (Gemma: sqrt(d)) changes that with the extra
dimension, so the stem is measured on both widths (``measure_embedding_stem``) and the stems folded into the
embedding rows (``EmbeddingStem.fold``). No family is named.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import NormswapError, first_line

_PROBE_TOKENS = 6  # rows of the probe's token table: zero-mean, all-ones, four random


@dataclass(frozen=True)
class EmbeddingStem:
    """What a family's code does between the token embedding and the first layer, measured.

    The stream entering the first layer is ``scale * e + mean_gain * sum(e) * 1`` for an embedding row e: a
    scale (Gemma: sqrt(hidden_size); most families: 1) and, for code that centres the stream (normswap's own
    LayerNorm -> RMSNorm output), a pull along the all-ones vector.
    """

    scale: float
    mean_gain: float = 0.0

    @property
    def unscaled(self) -> bool:
        """The stream starts as the embedding rows themselves (most families)."""
        return math.isclose(self.scale, 1.0, rel_tol=1e-6) and self.mean_gain == 0.0

    def fold(self, rows: torch.Tensor, wider: EmbeddingStem, lift: torch.Tensor) -> torch.Tensor:
        """Embedding rows (float64) for the wider code, whose stream must be U times this code's stream.

        The lifted rows have zero mean, where the wider code's stem is its scale alone, so
        ``e' = U (scale e + mean_gain sum(e) 1) / wider.scale``.
        """
        stream = self.scale * rows
        if self.mean_gain:
            stream = stream + self.mean_gain * rows.sum(-1, keepdim=True)
        return stream @ lift.T.to(stream.device) / wider.scale

    def describe(self, wider: EmbeddingStem) -> str:
        """The plan's note, empty where the rows are only lifted."""
        if self.scale == wider.scale and not self.mean_gain:
            return ""
        centred = " and its centring" if self.mean_gain else ""
        return f"; the code's embedding scale {self.scale:.6g} -> {wider.scale:.6g}{centred} folded into the rows"


class _FirstLayerReachedError(Exception):
    """Stops a probe at the first layer: everything after it has no weights and is not needed."""


def measure_embedding_stem(meta: nn.Module, first_layer: str, family: str) -> EmbeddingStem:
    """How the stream entering ``first_layer`` follows from the token embedding rows, measured on ``meta``.

    Why measure: a family may scale its embeddings in code by a function of ``hidden_size`` (Gemma multiplies
    by sqrt(hidden_size), as a buffer), which one more dimension changes; measured on both widths, the stems
    fold into the embedding rows (``EmbeddingStem.fold``), so the wider stream is exactly U times the original
    one. No family is named.

    How: ``meta`` (weightless, consumed: pass a model of its own) gets its computed buffers back as transformers
    gives them when it loads a checkpoint (NaN first, then ``initialize_weights``, so an unset one shows), and a
    token table of a few rows of signed powers of two, which any scale multiplies exactly: a zero-mean row gives
    the scale, an all-ones row the pull along the all-ones vector, and random rows check that the stem is that
    map. The first layer's input is captured and the run stopped there. Measured in float32 whatever the
    checkpoint's dtype: bf16 rounds sqrt(2048) and sqrt(2049) alike, which would hide the scale from the fold.
    """
    embedding = meta.get_input_embeddings()
    width = int(embedding.weight.shape[-1])
    table = _probe_rows(width)
    captured: dict[str, Any] = {}

    def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["stream"] = args[0] if args else kwargs.get("hidden_states")
        raise _FirstLayerReachedError

    ids = torch.arange(table.shape[0]).unsqueeze(0)
    handles = [meta.get_submodule(first_layer).register_forward_pre_hook(stop, with_kwargs=True)]
    try:
        _restore_computed_buffers(meta.float())  # the code's own scale, not its rounding in a bf16 checkpoint
        _report_cpu_device(meta)
        handles += _probe_tables(meta, embedding.weight, table)
        _zero_other_parameters(meta)
        _run_to_first_layer(meta, ids, captured)
    except Exception as error:  # the family's own code failed on the probe: say which, and why
        if "stream" not in captured:
            raise NormswapError(f"cannot measure how {family} scales its token embeddings before {first_layer} "
                                f"({type(error).__name__}: {first_line(error)})") from error
    finally:
        for handle in handles:
            handle.remove()
    stream = captured.get("stream")
    if (not isinstance(stream, torch.Tensor) or stream.is_meta or stream.shape[-1] != width
            or stream.numel() < table.numel()):
        raise NormswapError(f"cannot measure how {family} scales its token embeddings: the stream entering "
                            f"{first_layer} depends on weights other than the token embedding")
    # tokens the code adds come first (CPM-Ant prepends its prompt): the probe's own are the last positions
    stream = stream.detach().double().reshape(-1, width)[-table.shape[0]:]
    rows = table.double()
    zero_mean, nonzero = rows[0], rows[0] != 0
    scale = float((stream[0][nonzero] / zero_mean[nonzero]).mean())
    stem = EmbeddingStem(scale, float(stream[1].mean() - scale) / width)  # row 1 is all ones: scale + width * gain
    expected = stem.scale * rows + stem.mean_gain * rows.sum(-1, keepdim=True)
    if not (math.isfinite(scale) and math.isfinite(stem.mean_gain) and scale != 0.0) or not torch.allclose(
            stream, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max())):
        raise NormswapError(f"{family}'s stream entering {first_layer} is not its token embedding rows times a "
                            "scale (less their mean), so one extra dimension cannot carry it exactly")
    return stem


def _probe_tables(meta: nn.Module, token_weight: torch.Tensor, table: torch.Tensor) -> list[Any]:
    """Every embedding of ``meta`` made to look up values on the CPU, through its own class's forward (Gemma's
    scales its rows): the token embedding (and its tied copies, T5's ``embed_tokens``) the probe ``table``, with a
    zero row for any id past it, which the code adds itself (CPM-Ant prepends prompt tokens numbered past its
    vocabulary); every other embedding (CPM-Ant's segments, learned positions) a zero row: each writes the stream
    apart from the token rows and is lifted on its own. Returns the hooks that map the ids, to remove."""
    probe = nn.Parameter(torch.cat([table, table.new_zeros(1, table.shape[1])]), requires_grad=False)
    handles = []
    for module in [module for module in meta.modules() if isinstance(module, nn.Embedding)]:
        if module.weight is token_weight:
            module.weight, rows = probe, table.shape[0]
        else:
            module.weight, rows = nn.Parameter(table.new_zeros(1, module.embedding_dim), requires_grad=False), 0
        module.padding_idx = None  # only gradients read it; the probe tables have fewer rows than the vocabulary

        def known_ids(_module: nn.Module, args: tuple, rows: int = rows) -> tuple:
            ids, *rest = args
            return (torch.where((ids >= 0) & (ids < rows), ids, rows), *rest)

        handles.append(module.register_forward_pre_hook(known_ids))
    return handles


def _zero_other_parameters(meta: nn.Module) -> None:
    """Every parameter the probe tables left on the meta device made zero on the CPU: a learned vector outside the
    layers (HRM-Text's initial low-level state ``z_L_init``, added to the scaled embeddings) writes the stream apart
    from the token rows and is lifted on its own, as other embeddings are; a parameter that multiplies the rows
    zeroes the stream, which the measurement refuses (scale 0). Only what runs before the first layer is reached."""
    for name, parameter in list(meta.named_parameters()):
        if parameter.is_meta:
            owner, _, leaf = name.rpartition(".")
            setattr(meta.get_submodule(owner), leaf,
                    nn.Parameter(torch.zeros_like(parameter, device="cpu"), requires_grad=False))


def _run_to_first_layer(meta: nn.Module, ids: torch.Tensor, captured: dict[str, Any]) -> None:
    """Run until the hook stops the run at the first layer: with an all-ones attention mask, else (T5's mask
    helpers ask a meta tensor for its values: a mask of ones lets them skip the mask) without one."""
    for inputs in ({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, {"input_ids": ids}):
        try:
            with torch.no_grad():
                meta.eval()(**inputs)
        except _FirstLayerReachedError:
            return
        except Exception:
            if "attention_mask" not in inputs or "stream" in captured:
                raise


def _report_cpu_device(meta: nn.Module) -> None:
    """Every transformers model in ``meta`` says it is on the CPU, where the probe runs: code that moves the
    embeddings to ``self.device`` (Idefics3) would otherwise send the probe to the meta device, where it has no
    values. ``meta`` is consumed by the measurement, so its classes are not restored."""
    from transformers import PreTrainedModel

    on_cpu: dict[type, type] = {}  # one subclass per class, whatever the number of its modules
    for module in meta.modules():
        if isinstance(module, PreTrainedModel):
            cls = type(module)
            if cls not in on_cpu:
                on_cpu[cls] = type(cls.__name__, (cls,), {"device": property(lambda _: torch.device("cpu"))})
            module.__class__ = on_cpu[cls]


def _probe_rows(width: int) -> torch.Tensor:
    """A zero-mean row, an all-ones row and random rows, all of signed powers of two (any scale is exact)."""
    generator = torch.Generator().manual_seed(0)
    magnitudes = torch.pow(2.0, torch.randint(-2, 3, (_PROBE_TOKENS, width), generator=generator).float())
    signs = torch.randint(0, 2, (_PROBE_TOKENS, width), generator=generator) * 2 - 1
    rows = signs * magnitudes
    pairs = width // 2
    rows[0] = 0.0
    rows[0, :pairs], rows[0, pairs:2 * pairs] = magnitudes[0, :pairs], -magnitudes[0, :pairs]
    rows[1] = 1.0
    return rows


def _restore_computed_buffers(meta: nn.Module) -> None:
    """Non-persistent buffers (embedding scales, rotary frequencies) onto the CPU with their computed values."""
    persistent = set(meta.state_dict())
    for name, buffer in list(meta.named_buffers()):
        if name in persistent or not buffer.is_meta:
            continue
        owner, _, leaf = name.rpartition(".")
        fill = float("nan") if buffer.is_floating_point() else 0
        setattr(meta.get_submodule(owner), leaf, torch.full_like(buffer, fill, device="cpu"))
    initialize = getattr(meta, "initialize_weights", None)
    if callable(initialize):
        initialize()  # parameters stay on the meta device, where initialisation does nothing
