"""DST's tokenizer loads as SRC's did: ``tokenizer_config.json`` names the class explicitly.

``AutoTokenizer`` picks a tokenizer class from ``tokenizer_config.json``'s ``tokenizer_class`` and, failing that
or where transformers overrides it, from the config's ``model_type``. DST's ``model_type`` is not SRC's (a stock
target family, or ``normswap-<family>-<digest>``, which transformers knows only once the generated module is
imported: otherwise it reads the config as a bare ``PreTrainedConfig`` with no type at all), so a source that
relied on its ``model_type`` gets another class from
DST: a GPT-2 whose tokenizer_config.json names no class (as on the Hub) loads as ``GPT2Tokenizer`` from SRC and
as a generic ``TokenizersBackend`` without its special tokens from DST, and a BERT with only ``vocab.txt``
does not load at all. So DST's copy names the class SRC's tokenizer actually loads as, found by loading it
with ``trust_remote_code=False`` (no code of the checkpoint runs).

A tokenizer that is itself custom code (``auto_map`` in tokenizer_config.json) is left as the source had it,
as is one whose class transformers cannot find by name.

This does not stop transformers from asking, on a terminal, whether to run the custom code of a generated-code
output: ``AutoTokenizer.from_pretrained`` loads the model config (``AutoConfig``) before it reads
``tokenizer_config.json``, and that config's ``auto_map`` names normswap's code. Passing
``trust_remote_code=False`` loads the same tokenizer without the question (the card says so).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import first_line

logger = logging.getLogger("normswap")

TOKENIZER_CONFIG = "tokenizer_config.json"
_TOKENIZER_FILES = ("tokenizer.json", TOKENIZER_CONFIG, "vocab.txt", "vocab.json", "spiece.model",
                    "tokenizer.model", "sentencepiece.bpe.model")
_MAX_CONFIG_BYTES = 8 * 2**20


def pin_tokenizer_class(source: Path, destination: Path) -> str | None:
    """Name in ``destination``'s tokenizer_config.json the class ``source``'s tokenizer loads as, where the file
    does not already lead there; the class name written, or None when nothing was written."""
    if not any((destination / name).is_file() for name in _TOKENIZER_FILES):
        return None
    target = destination / TOKENIZER_CONFIG
    settings = _read_settings(target)
    if settings is None or "auto_map" in settings:
        return None  # unreadable, or a custom tokenizer: as the source had it
    loaded = _loaded_class(source)
    if loaded is None or _class_named(settings.get("tokenizer_class")) is loaded:
        return None
    settings["tokenizer_class"] = loaded.__name__
    target.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return loaded.__name__


def _read_settings(path: Path) -> dict[str, object] | None:
    """The tokenizer config as a dict: {} when there is none (one is written), None when it cannot be read."""
    if not path.exists():
        return {}
    try:
        if path.stat().st_size > _MAX_CONFIG_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _loaded_class(source: Path) -> type | None:
    """The class ``AutoTokenizer`` gives ``source``, when transformers can find it again by its name."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError, RecursionError) as error:
        logger.info("the tokenizer in %s did not load (%s); its files are copied as they are", source.name,
                    first_line(error))
        return None
    loaded = type(tokenizer)
    return loaded if _class_named(loaded.__name__) is loaded else None


def _class_named(name: object) -> type | None:
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    if not isinstance(name, str) or not name:
        return None
    try:
        return tokenizer_class_from_name(name)
    except (ValueError, KeyError, ImportError, AttributeError):
        return None
