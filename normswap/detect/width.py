"""The residual width a config names, for probing norms whose weights do not tell their size.

Most configs name it at the top (``hidden_size``, ``d_model``...). A model built of sub-models keeps it in the
config of the sub-model that holds the layers: SAM 3's vision model keeps its ViT's width in
``backbone_config.hidden_size``, and its ``backbone`` module carries that config as ``.config``. So the modules
that hold each layer list are asked, innermost first, after the top-level config.
"""

from __future__ import annotations

from typing import Any

from torch import nn

WIDTH_NAMES = ("hidden_size", "d_model", "n_embd", "dim", "embed_dim")


def named_width(model: nn.Module, config: Any, stack_paths: list[str]) -> int | None:
    """The residual width the configs name, or None where none does (a convnet names channel counts only)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    width = _width_in(text_config)
    if width is not None:
        return width
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # vision models have no token embedding to ask
        embeddings = None
    if isinstance(embeddings, nn.Embedding):
        return embeddings.embedding_dim
    for stack_path in stack_paths:
        width = _holder_width(model, stack_path)
        if width is not None:
            return width
    widths = [value for name in ("hidden_sizes", *WIDTH_NAMES)
              if isinstance(value := getattr(text_config, name, None), (list, tuple))]
    if widths and widths[0] and all(isinstance(width, int) for width in widths[0]):
        return widths[0][0]  # stages of several widths: each stack's own width comes from its trace
    return None


def unnamed_width_message(config: Any) -> str:
    return (f"{type(config).__name__} names no hidden size ({', '.join(WIDTH_NAMES)}), nor does the config of the "
            "module holding its layers, and it has no token embedding to read it from; normswap needs the residual "
            "width to probe its norms that have no weight")


def _width_in(config: Any) -> int | None:
    for name in WIDTH_NAMES:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _holder_width(model: nn.Module, stack_path: str) -> int | None:
    """The width named by the config of the nearest module above the layer list that carries one of its own."""
    parts = stack_path.split(".")[:-1]
    for end in range(len(parts), 0, -1):
        config = getattr(model.get_submodule(".".join(parts[:end])), "config", None)
        if config is not None and (width := _width_in(config)) is not None:
            return width
    return None
