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


class ToyLayer(nn.Module):
    def __init__(self, hidden_size: int, layout: str) -> None:
        super().__init__()
        self.layout = layout
        self.norm = nn.LayerNorm(hidden_size)
        self.mlp = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.layout == "pre":
            return hidden_states + self.mlp(self.norm(hidden_states))
        if self.layout == "post":
            return self.norm(hidden_states + self.mlp(hidden_states))
        if self.layout == "no-residual":
            return self.mlp(self.norm(hidden_states))
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
