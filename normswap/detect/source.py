"""Turn what the user points at (a checkpoint folder, a config.json, a loaded model) into a meta model.

Detection never needs weights: the model is built on the meta device from its config,
so an 80-layer, 8192-wide config inspects in seconds with almost no memory.
"""

from __future__ import annotations

import contextlib
import copy
import heapq
import json
import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SourceError, first_line
from ..failures import printable_path

MAX_CONFIG_BYTES = 8 * 1024 * 1024
"""config.json files above this are refused before they are read: a real config is a few KB, and a
2 GB one would take twice its size in memory to parse."""


@dataclass(frozen=True)
class MetaModel:
    """A weightless model and the config it was built from."""

    model: nn.Module
    config: Any
    model_type: str


def load_config(source: str | Path, trust_remote_code: bool = False) -> Any:
    """Read a config from a checkpoint folder or a config.json, with one-line errors for bad input.

    Custom code (``auto_map``) runs only with ``trust_remote_code``; without it, a normswap-generated
    checkpoint whose modeling file is byte for byte this normswap's own gets a config of normswap's own
    copy of that code (``own_code``), and every other one is refused naming the flag.
    """
    path = Path(source)
    config_path = _config_file(path)
    data = _parse_config_json(config_path, _read_config_bytes(config_path))
    if "auto_map" in data and trust_remote_code:
        from transformers import AutoConfig

        from .own_code import shadowed_code

        if (shadowed := shadowed_code(config_path, data)) is not None:
            raise SourceError(shadowed)
        try:
            with quiet_transformers():
                return AutoConfig.from_pretrained(str(config_path.parent), trust_remote_code=True)
        except Exception as error:  # custom config code fails in its own ways
            raise SourceError(
                f"{config_path} cannot be loaded with its custom code ({type(error).__name__}: "
                f"{first_line(error)}); fix the config or its configuration module"
            ) from error
    from .own_code import claims_own_code, own_generated_config

    if claims_own_code(data):  # normswap-generated: its code runs only if it is byte for byte normswap's own
        return own_generated_config(config_path, data)
    return config_from_dict(data, str(config_path), trust_remote_code)


def _config_file(path: Path) -> Path:
    """The config.json that ``path`` names: the path itself, or the file of that name in a folder."""
    try:
        if path.is_dir():
            config_path = path / "config.json"
            if not config_path.exists() and not config_path.is_symlink():
                found = ", ".join(_printable(name) for name in heapq.nsmallest(6, (p.name for p in path.iterdir())))
                raise SourceError(
                    f"{path} has no config.json (found: {found or 'nothing'}); point normswap at a Hugging Face "
                    "checkpoint folder or at its config.json"
                )
        else:
            config_path = path
            if path.suffix in WEIGHT_SUFFIXES:
                raise SourceError(f"{path} is a weights file; pass the checkpoint folder that holds it and its "
                                  f"config.json ({printable_path(path.parent)})")
        if config_path.exists():
            return config_path
        if config_path.is_symlink():
            raise SourceError(f"{config_path} is a link whose target does not exist; fix the link or replace it with "
                              "the checkpoint's config.json")
    except OSError as error:
        raise SourceError(_unreadable(path, error)) from None
    raise SourceError(f"{path} does not exist; pass a checkpoint folder or a config.json file")


WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx"})


def _read_config_bytes(config_path: Path) -> bytes:
    """At most ``MAX_CONFIG_BYTES`` + 1 bytes of a regular file: a huge, growing or special file is refused unread.

    The file is opened non-blocking so that a FIFO without a writer does not hang the open; its
    type and size are then checked on the open descriptor, so a swap after the check cannot slip past.
    """
    try:
        descriptor = os.open(config_path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        raise SourceError(_unreadable(config_path, error)) from None
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            raise SourceError(
                f"{config_path} is {_file_kind(info.st_mode)}, not a regular file; pass the checkpoint's "
                "config.json file"
            )
        if info.st_size > MAX_CONFIG_BYTES:
            raise SourceError(_too_large(config_path, f"is {info.st_size} bytes"))
        with os.fdopen(descriptor, "rb", closefd=False) as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise SourceError(_unreadable(config_path, error)) from None
    finally:
        os.close(descriptor)
    if len(raw) > MAX_CONFIG_BYTES:
        raise SourceError(_too_large(config_path, "grew past that size while it was read"))
    return raw


def _parse_config_json(config_path: Path, raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw.decode("utf-8"))
    except json.JSONDecodeError as error:
        raise SourceError(
            f"{config_path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg}); "
            "fix or regenerate the file"
        ) from None
    except UnicodeDecodeError:
        raise SourceError(f"{config_path} is not a UTF-8 text file; pass a config.json") from None
    except RecursionError:
        raise SourceError(
            f"{config_path} nests JSON arrays or objects too deeply to parse (a real config nests a few levels); "
            "pass the checkpoint's own config.json"
        ) from None
    except (ValueError, MemoryError) as error:  # e.g. an integer of more digits than Python converts
        raise SourceError(
            f"{config_path} cannot be parsed as JSON ({type(error).__name__}: {first_line(error)}); "
            "fix or regenerate the file"
        ) from None
    if not isinstance(data, dict):
        raise SourceError(f"{config_path} holds a JSON {type(data).__name__}, not an object; pass a config.json")
    return data


def config_from_dict(data: dict[str, Any], origin: str, trust_remote_code: bool = False) -> Any:
    from transformers import CONFIG_MAPPING

    model_type = data.get("model_type")
    if "auto_map" in data and not trust_remote_code:
        raise SourceError(
            f"{origin} asks for custom modeling code (auto_map); normswap runs it only with --trust-remote-code"
        )
    if model_type is None or model_type == "":
        raise SourceError(f"{origin} has no 'model_type' key; add the model family, e.g. \"model_type\": \"llama\"")
    if not isinstance(model_type, str) or not model_type.strip():
        raise SourceError(
            f"{origin} has \"model_type\": {_json_excerpt(model_type)}, which is not a model family name; "
            "make it a string such as \"model_type\": \"llama\""
        )
    architectures = data.get("architectures")
    if architectures is not None and not (
        isinstance(architectures, list) and all(isinstance(name, str) for name in architectures)
    ):
        raise SourceError(
            f"{origin} has \"architectures\": {_json_excerpt(architectures)}, which is not a list of class names; "
            "make it a list of strings such as [\"LlamaForCausalLM\"] or remove the key"
        )
    if model_type not in CONFIG_MAPPING:
        raise SourceError(
            f"{origin} has model_type '{_printable(model_type)}', which this transformers version does not know; "
            "upgrade transformers, fix the model_type, or pass --trust-remote-code for a custom model"
        )
    fields = {key: special_floats(value) for key, value in data.items() if key != "model_type"}
    try:
        with quiet_transformers():
            return CONFIG_MAPPING[model_type].from_dict(fields)
    except Exception as error:  # config classes validate with many exception types
        raise SourceError(
            f"{origin} is not a valid {model_type} config ({type(error).__name__}: {first_line(error)}); "
            "fix the named value"
        ) from error


_SPECIAL_FLOATS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def special_floats(value: Any) -> Any:
    """``value`` with transformers' JSON tags for floats that JSON cannot hold (``{"__float__": "Infinity"}``,
    as ``save_pretrained`` writes Mamba-2's ``time_step_limit``) turned back into those floats."""
    if isinstance(value, dict):
        if set(value) == {"__float__"} and value["__float__"] in _SPECIAL_FLOATS:
            return _SPECIAL_FLOATS[value["__float__"]]
        return {key: special_floats(item) for key, item in value.items()}
    if isinstance(value, list):
        return [special_floats(item) for item in value]
    return value


def build_meta_model(source: str | Path | nn.Module, trust_remote_code: bool = False) -> MetaModel:
    """A weightless copy of the model: from its config for paths, of the same class for loaded models."""
    if isinstance(source, nn.Module):
        config = getattr(source, "config", None)
        if config is None:
            raise SourceError(f"{type(source).__name__} has no .config; pass a transformers PreTrainedModel")
        config = copy.deepcopy(config)  # building a model writes to its config; the user's stays as it is
        model_type = getattr(config, "model_type", type(source).__name__)
        return _build(type(source), config, model_type, trust_remote_code)
    return meta_model_from_config(load_config(source, trust_remote_code), trust_remote_code)


def meta_model_from_config(config: Any, trust_remote_code: bool = False) -> MetaModel:
    """The ``AutoModel`` of ``config`` on the meta device; building writes to ``config``, so pass one you own.
    A normswap-generated checkpoint's config that ``load_config`` verified builds normswap's own class."""
    from transformers import AutoModel

    from .own_code import own_model_class

    own = own_model_class(config, "AutoModel")
    return _build(own or AutoModel, config, config.model_type, trust_remote_code)


def _build(model_class: Any, config: Any, model_type: str, trust_remote_code: bool) -> MetaModel:
    from transformers import AutoModel

    # mixture-of-experts kernels have no meta implementation; the eager loop is the same topology
    options = {"experts_implementation": "eager"}
    try:
        with torch.device("meta"), quiet_transformers():
            if model_class is AutoModel:
                model = _auto_model(config, trust_remote_code, options)
            else:
                model = model_class._from_config(config, **options)
    except Exception as error:  # any failure here means the config does not describe a model
        raise SourceError(
            f"transformers cannot build a {model_type} model from this config "
            f"({type(error).__name__}: {first_line(error)}); check the config values"
        ) from error
    model.eval()
    return MetaModel(model, config, model_type)


def _auto_model(config: Any, trust_remote_code: bool, options: dict[str, Any]) -> nn.Module:
    """``AutoModel`` of ``config``, else the model its own metadata names: wrappers such as
    ``EncoderDecoderModel`` (and their generated twins) have no ``AutoModel`` entry, only a head class."""
    import transformers
    from transformers import AutoModel

    try:
        return AutoModel.from_config(config, trust_remote_code=trust_remote_code, **options)
    except ValueError as error:
        if "Unrecognized configuration class" not in str(error):
            raise
        auto_map = getattr(config, "auto_map", None) or {}
        for auto_name in auto_map if trust_remote_code and isinstance(auto_map, dict) else ():
            auto_class = getattr(transformers, auto_name, None) if auto_name.startswith("AutoModel") else None
            if auto_class is not None:
                return auto_class.from_config(config, trust_remote_code=True, **options)
        for name in getattr(config, "architectures", None) or []:
            stock = getattr(transformers, name, None) if isinstance(name, str) and name.isidentifier() else None
            if isinstance(stock, type) and issubclass(stock, transformers.PreTrainedModel) \
                    and isinstance(config, stock.config_class):
                return stock._from_config(config, **options)
        raise


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Config and init chatter from transformers is noise for a topology report."""
    from transformers.utils import logging

    previous = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(previous)


def _unreadable(path: Path, error: OSError) -> str:
    """The one-line message for a path the operating system would not let us read."""
    if isinstance(error, PermissionError):
        return f"cannot read {path}: permission denied; make it readable (chmod) or run as a user who can read it"
    if isinstance(error, FileNotFoundError):
        return f"{path} does not exist (it may have been removed while normswap read it); pass an existing path"
    reason = error.strerror or type(error).__name__
    return f"cannot read {path}: {reason}; check that the path is a readable file or folder on a working disk"


def _too_large(path: Path, what: str) -> str:
    return (f"{path} {what}; normswap reads config.json files up to {MAX_CONFIG_BYTES // (1024 * 1024)} MiB "
            "(a real config is a few KB): pass the checkpoint's own config.json")


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "a special file")


def _json_excerpt(value: Any) -> str:
    """A JSON value as it appears in the file, cut short: the message stays one readable line."""
    try:
        text = json.dumps(value, ensure_ascii=True)
    except (RecursionError, ValueError):  # nested deeper than json re-encodes, or an integer too long to print
        text = f"(a {type(value).__name__} too large to show)"
    return text if len(text) <= 60 else text[:57] + "..."


def _printable(text: str) -> str:
    """Names from the file system or a config may hold newlines or control characters; errors are one line."""
    if text.isprintable() and len(text) <= 100:
        return text
    escaped = ascii(text)[1:-1]
    return escaped if len(escaped) <= 100 else escaped[:97] + "..."
