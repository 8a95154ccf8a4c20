"""Native realisation: the converted weights load into a stock transformers family.

The recipe names the family (BERT -> MegatronBERT, OPT -> OPT with ``do_layer_norm_before``
flipped). Norm paths on both sides come from detection, not from tables: the target's topology
is detected on a meta instance of the target class, and the plan maps one onto the other.
"""

from __future__ import annotations

from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn

from ..errors import NormswapError
from ..recipe import NativeTarget, recipe_for

_NOT_CARRIED_CONFIG_KEYS = ("model_type", "architectures", "transformers_version", "_name_or_path", "auto_map",
                            "normswap")


def target_config(source_config: Any, target: NativeTarget) -> Any:
    """The source config re-expressed for the target family, with the recipes' config values set (the target's, and
    those the source family's recipe says any model of the target placement needs)."""
    from transformers import CONFIG_MAPPING

    data = {k: v for k, v in source_config.to_dict().items() if k not in _NOT_CARRIED_CONFIG_KEYS}
    data.update(dict(target.config))
    recipe = recipe_for(source_config.model_type)
    data.update(recipe.config_for(target.placement) if recipe is not None else {})
    try:
        config = CONFIG_MAPPING[target.model_type].from_dict(data)
    except (ValueError, StrictDataclassError) as error:  # its validators refuse the values (a width made one wider)
        raise NormswapError(f"the stock {target.model_type} config refuses this model's values: "
                            f"{str(error).splitlines()[-1].strip()}") from error
    architectures = getattr(source_config, "architectures", None) or []
    config.architectures = [target.target_class_name(name) for name in architectures] or None
    return config


def target_class(source_model: nn.Module, target: NativeTarget) -> type[nn.Module]:
    """The stock class that plays the source class's role (``BertForMaskedLM`` -> ``MegatronBertForMaskedLM``)."""
    import transformers

    name = target.target_class_name(type(source_model).__name__)
    cls = getattr(transformers, name, None)
    if cls is None:
        raise NormswapError(f"transformers has no class {name} for the native target {target.model_type}; "
                            "pass --no-native to generate modeling code instead")
    return cls


def meta_instance(cls: type[nn.Module], config: Any) -> nn.Module:
    """A weightless instance, to detect the target topology and list the tensors it expects."""
    with torch.device("meta"):
        return cls._from_config(config)  # type: ignore[attr-defined]


def build_with_weights(cls: type[nn.Module], config: Any, state: dict[str, torch.Tensor], dtype: torch.dtype,
                       device: torch.device) -> nn.Module:
    """An instance of ``cls`` holding exactly ``state``; no random initialisation is wasted."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = cls._from_config(config, dtype=dtype)  # type: ignore[attr-defined]
    model.load_state_dict(state, strict=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.to(device)


def meta_twin(model: nn.Module) -> nn.Module:
    """``model`` itself when it is weightless already, else a weightless copy of the same class and config."""
    if all(parameter.is_meta for parameter in model.parameters()):
        return model
    from ..detect.source import build_meta_model

    return build_meta_model(model).model
