"""Generated-code realisation: the family's own modeling source, rewritten for the target layout.

Used where no stock family expresses the target (Llama, GPT-2, Qwen2, GPT-NeoX as Post-Norm; every
norm-kind change) or when the user asks for it (``--no-native``). The target classes are the family's
classes, regenerated, so everything the original code does (KV cache, ``generate()``, attention backends,
gradient checkpointing) still works. A composite model (Llava, Aria, DPR) brings its wrapper classes along,
made to build the regenerated language model (``codegen/composite.py``), and is then checked to hold it.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

from torch import nn

from ..codegen.composite import composite_code, require_generated_path
from ..codegen.derive import modeling_file, placement_edits
from ..codegen.edits import Edit
from ..codegen.package import GeneratedModule, config_fields, load_generated, package_module
from ..codegen.rewrite import apply_edits
from ..topology import Topology
from .native import meta_instance


def generate_family_code(model: nn.Module, topology: Topology, edits: list[Edit], conversion: str,
                         config_values: dict[str, Any] | None = None, wider_sub_config: tuple[str, type] | None = None,
                         untied_head: tuple[str, str] | None = None, **helpers: bool
                         ) -> tuple[GeneratedModule, Any, Any]:
    """Rewrite the family's modeling source with ``edits`` and load it.

    Returns the generated module, the class that plays ``model``'s role in it, and the converted config
    (``config_values`` set on top of the model's own); ``helpers`` name the normswap norm classes to ship;
    ``wider_sub_config`` and ``untied_head`` are ``package_module``'s.
    """
    source = modeling_file(model, topology).read_text(encoding="utf-8")
    original = sys.modules[type(model.get_submodule(topology.layers[0].path)).__module__]
    stacks = [stack.path for stack in topology.stacks]
    composite = composite_code(model, stacks, original, source)
    rewritten = apply_edits(source, [*edits, *composite.text_edits])
    generated = package_module(original, rewritten, type(model.config), conversion, composite=composite,
                               wider_sub_config=wider_sub_config, untied_head=untied_head, **helpers)
    module = load_generated(generated)
    cls = getattr(module, type(model).__name__)
    fields = {**config_fields(model.config), **(config_values or {})}
    config = getattr(module, generated.config_class).from_dict(fields)
    config.architectures = [type(model).__name__]
    config.auto_map = generated.auto_map(topology.model_type)
    if composite.redirects:  # the language model is built through code normswap changed: it must hold our layers
        require_generated_path(meta_instance(cls, copy.deepcopy(config)),
                               [*stacks, *(layer.path for layer in topology.layers[:1])], module.__name__)
    return generated, cls, config


def generated_target(model: nn.Module, source: Topology, placement: str) -> tuple[GeneratedModule, Any, Any]:
    """The generated module, class and config for a placement change."""
    return generate_family_code(model, source, placement_edits(model, source, placement),
                                f"placement {source.placement} -> {placement} (norm-shift mapping)")
