"""Turn what the user points at (a checkpoint folder, a config.json, a loaded model) into a meta model.

Detection never needs weights: the model is built on the meta device from its config,
so an 80-layer, 8192-wide config inspects in seconds with almost no memory.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SourceError


@dataclass(frozen=True)
class MetaModel:
    """A weightless model and the config it was built from."""

    model: nn.Module
    config: Any
    model_type: str


def load_config(source: str | Path, trust_remote_code: bool = False) -> Any:
    """Read a config from a checkpoint folder or a config.json, with one-line errors for bad input."""
    path = Path(source)
    if path.is_dir():
        config_path = path / "config.json"
        if not config_path.is_file():
            found = ", ".join(sorted(p.name for p in path.iterdir())[:6]) or "nothing"
            raise SourceError(
                f"{path} has no config.json (found: {found}); point normswap at a Hugging Face checkpoint "
                "folder or at its config.json"
            )
    elif path.is_file():
        config_path = path
    else:
        raise SourceError(f"{path} does not exist; pass a checkpoint folder or a config.json file")

    try:
        data = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise SourceError(
            f"{config_path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
            "fix or regenerate the file"
        ) from None
    except UnicodeDecodeError:
        raise SourceError(f"{config_path} is not a UTF-8 text file; pass a config.json") from None
    if not isinstance(data, dict):
        raise SourceError(f"{config_path} holds a JSON {type(data).__name__}, not an object; pass a config.json")
    if "auto_map" in data and trust_remote_code:
        from transformers import AutoConfig

        with _quiet_transformers():
            return AutoConfig.from_pretrained(str(config_path.parent), trust_remote_code=True)
    return config_from_dict(data, str(config_path), trust_remote_code)


def config_from_dict(data: dict[str, Any], origin: str, trust_remote_code: bool = False) -> Any:
    from transformers import CONFIG_MAPPING

    model_type = data.get("model_type")
    if "auto_map" in data and not trust_remote_code:
        raise SourceError(
            f"{origin} asks for custom modeling code (auto_map); normswap runs it only with --trust-remote-code"
        )
    if not model_type:
        raise SourceError(f"{origin} has no 'model_type' key; add the model family, e.g. \"model_type\": \"llama\"")
    if model_type not in CONFIG_MAPPING:
        raise SourceError(
            f"{origin} has model_type '{model_type}', which this transformers version does not know; "
            "upgrade transformers, fix the model_type, or pass --trust-remote-code for a custom model"
        )
    fields = {key: value for key, value in data.items() if key != "model_type"}
    try:
        with _quiet_transformers():
            return CONFIG_MAPPING[model_type].from_dict(fields)
    except Exception as error:  # config classes validate with many exception types
        raise SourceError(
            f"{origin} is not a valid {model_type} config ({type(error).__name__}: {_first_line(error)}); "
            "fix the named value"
        ) from error


def build_meta_model(source: str | Path | nn.Module, trust_remote_code: bool = False) -> MetaModel:
    """A weightless copy of the model: from its config for paths, of the same class for loaded models."""
    from transformers import AutoModel

    if isinstance(source, nn.Module):
        config = getattr(source, "config", None)
        if config is None:
            raise SourceError(f"{type(source).__name__} has no .config; pass a transformers PreTrainedModel")
        config = copy.deepcopy(config)  # building a model writes to its config; the user's stays as it is
        model_class: Any = type(source)
        model_type = getattr(config, "model_type", type(source).__name__)
    else:
        config = load_config(source, trust_remote_code)
        model_class = AutoModel
        model_type = config.model_type
    # mixture-of-experts kernels have no meta implementation; the eager loop is the same topology
    options = {"experts_implementation": "eager"}
    try:
        with torch.device("meta"), _quiet_transformers():
            if model_class is AutoModel:
                model = AutoModel.from_config(config, trust_remote_code=trust_remote_code, **options)
            else:
                model = model_class._from_config(config, **options)
    except Exception as error:  # any failure here means the config does not describe a model
        raise SourceError(
            f"transformers cannot build a {model_type} model from this config "
            f"({type(error).__name__}: {_first_line(error)}); check the config values"
        ) from error
    model.eval()
    return MetaModel(model, config, model_type)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Config and init chatter from transformers is noise for a topology report."""
    from transformers.utils import logging

    previous = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(previous)


def _first_line(error: Exception) -> str:
    """Exception texts can span many lines; errors here are one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:2])[:300] if lines else type(error).__name__
