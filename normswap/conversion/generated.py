"""Generated-code realisation: the family's own modeling source, rewritten for the target placement.

Used where no stock family expresses the target (Llama, GPT-2, Qwen2, GPT-NeoX as Post-Norm) or
when the user asks for it (``--no-native``). The target classes are the family's classes,
regenerated, so everything the original code does (KV cache, ``generate()``, attention backends,
gradient checkpointing) still works.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

from ..codegen.derive import modeling_file, placement_edits
from ..codegen.package import GeneratedModule, config_fields, load_generated, package_module
from ..codegen.rewrite import apply_edits
from ..topology import Topology


def generated_target(model: nn.Module, source: Topology, placement: str) -> tuple[GeneratedModule, Any, Any]:
    """The generated module, the class that plays ``model``'s role in it, and the converted config."""
    edits = placement_edits(model, source, placement)
    path = modeling_file(model, source)
    rewritten = apply_edits(path.read_text(encoding="utf-8"), edits)
    layer_class = type(model.get_submodule(source.layers[0].path))
    original = sys.modules[layer_class.__module__]
    conversion = f"placement {source.placement} -> {placement} (norm-shift mapping)"
    generated = package_module(original, rewritten, type(model.config), conversion)
    module = load_generated(generated)
    cls = getattr(module, type(model).__name__)
    config = getattr(module, generated.config_class).from_dict(config_fields(model.config))
    config.architectures = [type(model).__name__]
    config.auto_map = generated.auto_map(source.model_type)
    return generated, cls, config
