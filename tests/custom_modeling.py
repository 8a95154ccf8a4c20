"""A small custom transformers model, used both in memory and as remote code (``auto_map``).

``layout`` selects what each layer does, so the tests can build models that detection must
reject (no residual add, data-dependent control flow) or report as ``mixed``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


class ToyConfig(PretrainedConfig):
    model_type = "normswap-toy"

    def __init__(self, hidden_size: int = 16, layouts: tuple[str, ...] = ("pre", "pre"), **kwargs: object) -> None:
        self.hidden_size = hidden_size
        self.layouts = list(layouts)
        super().__init__(**kwargs)


class ToyAttention(nn.Module):
    """Holds a q norm and branches on data, so tracing inside it fails and it must become one node."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.q_norm = nn.RMSNorm(hidden_size, eps=1e-6)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        query = self.q_norm(self.q_proj(hidden_states))
        if query.amax() > 100:
            query = query.clamp(max=100)
        return query


class ToyLayer(nn.Module):
    def __init__(self, hidden_size: int, layout: str) -> None:
        super().__init__()
        self.layout = layout
        self.norm = nn.LayerNorm(hidden_size)
        self.mlp = nn.Linear(hidden_size, hidden_size)
        if layout == "opaque-attention":
            self.attn = ToyAttention(hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.layout == "pre":
            return hidden_states + self.mlp(self.norm(hidden_states))
        if self.layout == "post":
            return self.norm(hidden_states + self.mlp(hidden_states))
        if self.layout == "no-residual":
            return self.mlp(self.norm(hidden_states))
        if self.layout == "opaque-attention":
            return hidden_states + self.attn(self.norm(hidden_states))
        if self.layout == "data-dependent":
            if hidden_states.sum() > 0:
                hidden_states = -hidden_states
            return hidden_states + self.mlp(self.norm(hidden_states))
        raise ValueError(self.layout)


class ToyModel(PreTrainedModel):
    config_class = ToyConfig
    main_input_name = "input_ids"

    def __init__(self, config: ToyConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(32, config.hidden_size)
        self.layers = nn.ModuleList([ToyLayer(config.hidden_size, layout) for layout in config.layouts])
        self.post_init()

    def forward(self, input_ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
        hidden_states = self.embed(input_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return hidden_states
