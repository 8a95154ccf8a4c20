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
from ..codegen.edits import BuildAtSourceWidth, Edit
from ..codegen.package import GeneratedModule, config_fields, load_generated, package_module, repackage
from ..codegen.rewrite import apply_edits
from ..recipe import recipe_for
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
    previous = getattr(model, "normswap_generated", None)
    if previous is not None:  # a later pass of a composed conversion: edit the code the earlier passes wrote
        return _on_top(model, previous, edits, conversion, config_values, **helpers)
    head = head_stored_apart(model)
    if head is not None and untied_head is None:  # the head stays apart in the converted model too
        untied_head = head_untied_in_code(model, head)
        if untied_head is None:
            config_values = {**(config_values or {}), "tie_word_embeddings": False}
    source = modeling_file(model, topology).read_text(encoding="utf-8")
    original = sys.modules[type(model.get_submodule(topology.layers[0].path)).__module__]
    stacks = [stack.path for stack in topology.stacks]
    # a projector's owner (``BuildAtSourceWidth``) may be a wrapper class, copied into the generated file
    wrapper_edits = tuple(edit for edit in edits if isinstance(edit, BuildAtSourceWidth) and not (
        isinstance(vars(original).get(edit.class_name), type)
        and vars(original)[edit.class_name].__module__ == original.__name__))
    composite = composite_code(model, stacks, original, source, wrapper_edits)
    rewritten = apply_edits(source, [*(edit for edit in edits if edit not in wrapper_edits), *composite.text_edits])
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


def _on_top(model: nn.Module, previous: GeneratedModule, edits: list[Edit], conversion: str,
            config_values: dict[str, Any] | None, **helpers: bool) -> tuple[GeneratedModule, Any, Any]:
    """A later pass of a composed conversion: its edits go into the module the earlier passes generated (their
    lines are that module's, where detection of the intermediate model found them), which stays one module."""
    generated = repackage(previous, apply_edits(previous.source, edits), conversion, **helpers)
    module = load_generated(generated)
    cls = getattr(module, type(model).__name__)
    config = getattr(module, generated.config_class).from_dict({**config_fields(model.config), **(config_values or {})})
    config.architectures = [type(model).__name__]
    config.auto_map = generated.auto_map(model.normswap_source_model_type)
    return generated, cls, config


def head_untied_in_code(model: nn.Module, head_key: str) -> tuple[str, str] | None:
    """(class, key) of the LM head's entry in a model class's tied weights, where they also tie tensors other than
    the head (T5's stacks share ``shared`` as their ``embed_tokens``): transformers ties all of them or none by the
    one config flag, so untying the head there leaves the head's entry out of the class's map instead (the
    generated code's ``_tied_weights_keys``), and the shared embeddings stay one tensor, as the family trains them.
    None where the head is all the flag ties (Llama): there the converted config says tie_word_embeddings = False."""
    if all(head_key in pair for pair in _tied_weight_keys(model).items()):
        return None
    for prefix, module in model.named_modules():
        key = head_key.removeprefix(f"{prefix}.") if prefix else head_key
        if key in (getattr(type(module), "_tied_weights_keys", None) or {}):
            return type(module).__name__, key
    return None


def head_stored_apart(model: nn.Module) -> str | None:
    """The LM head's key where ``model`` holds it apart from the token embedding although its class ties the two
    (mT5, UMT5, T5 v1.1 and Flan-T5 checkpoints store a head of their own, which loading keeps): generated code
    that tied them would load the embedding in the head's place, silently another model."""
    try:
        output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # a vision model has no token embedding to ask
        return None
    if output is None or embedding is None or output.weight is embedding.weight:
        return None
    key = next((f"{path}.weight" for path, module in model.named_modules() if module is output), None)
    return key if key is not None and key in _tied_weight_keys(model) else None


def _tied_weight_keys(model: nn.Module) -> dict[str, str]:
    """Target -> source of every tie transformers makes in ``model`` as its classes and config ask."""
    expanded = getattr(model, "get_expanded_tied_weights_keys", None)
    return expanded(all_submodels=True) if callable(expanded) else {}


def generated_target(model: nn.Module, source: Topology, placement: str) -> tuple[GeneratedModule, Any, Any]:
    """The generated module, class and config for a placement change (with the config values the family's recipe
    says a model of that placement needs)."""
    recipe = recipe_for(source.model_type)
    return generate_family_code(model, source, placement_edits(model, source, placement),
                                f"placement {source.placement} -> {placement} (norm-shift mapping)",
                                recipe.config_for(placement) if recipe is not None else None)
