"""Non-weight files that travel with a converted checkpoint: tokenizer, generation config, licence, and the
files the source itself lists.

The rule (documented in docs/safety.md, "What DST copies from SRC"):

- By name, only the files a checkpoint has: tokenizer and processor files, the generation config, chat
  templates, licence and notice files, sentence-transformers' configs; plus what the source lists itself:
  the module folders named in sentence-transformers' ``modules.json``, and the code files that a support
  config's ``auto_map`` names (a custom tokenizer's ``tokenization_x.py``). Anything else in SRC (notes,
  training logs, optimizer states) stays behind and is listed in the report.
- A file that is a symbolic link is copied (as a regular file) only if it resolves inside SRC, or inside the
  ``blobs`` folder of the Hugging Face cache repository that SRC is a snapshot of (the Hub cache is made of
  such links). A link anywhere else (``tokenizer.json -> /home/me/.ssh/id_rsa`` in a cloned repository) is
  not followed: DST must never carry a file from outside the checkpoint.
- Folders are entered only when listed, never through a link, and at most a few levels deep, so a link loop
  cannot make the copy run away.

The generation config is copied as it is: a conversion changes weights and layout, never decoding defaults.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .shard_names import is_plain_file_name

logger = logging.getLogger("normswap")

# file names (glob patterns) that checkpoints carry beside their weights and config
SUPPORT_FILE_PATTERNS = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "*.model", "*.tiktoken", "tiktoken.model", "spm.model", "bpe.codes",
    "source.spm", "target.spm", "vocab-*.json", "entity_vocab.json", "chat_template.jinja", "chat_template.json",
    "generation_config.json", "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
    "feature_extractor_config.json", "image_processor_config.json", "modules.json", "sentence_bert_config.json",
    "config_sentence_transformers.json", "LICENSE", "LICENSE.*", "LICENCE", "LICENCE.*", "NOTICE", "NOTICE.*",
    "USE_POLICY.md", "COPYING", "COPYING.*",
)
SUPPORT_FOLDERS = ("additional_chat_templates",)
_MAX_DEPTH = 4
_MAX_FILE_BYTES = 2 * 2**30  # a support file larger than this is not one (tokenizers are MBs)


@dataclass(frozen=True)
class CopiedSupportFiles:
    """What was copied, and what was left behind with the reason (the report lists both)."""

    copied: tuple[str, ...]
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, object]:
        return {"copied": list(self.copied), "skipped": dict(self.skipped)}


def copy_support_files(source: Path, destination: Path) -> CopiedSupportFiles:
    """Copy the support files of ``source`` (see the module docstring) into ``destination``."""
    source = source.resolve()
    allowed_roots = _allowed_roots(source)
    listed_folders = set(SUPPORT_FOLDERS) | _sentence_transformers_modules(source)
    listed_code = _auto_map_code_files(source)
    copied: list[str] = []
    skipped: dict[str, str] = {}
    for entry in sorted(source.iterdir()):
        name = entry.name
        if _is_support_file(name) or name in listed_code:
            _copy_file(entry, destination / name, allowed_roots, name, copied, skipped)
        elif name in listed_folders:
            _copy_folder(entry, destination / name, allowed_roots, name, copied, skipped, depth=1)
        elif not _written_anew(name):
            skipped[name] = "not a checkpoint support file"
    linked = {name: reason for name, reason in skipped.items() if reason.startswith("a link")}
    for name, reason in linked.items():
        logger.warning("not copying %s: %s", name, reason)
    return CopiedSupportFiles(tuple(copied), skipped)


def readable_source_file(source: Path, name: str) -> Path | None:
    """The file to read for ``source / name`` under the same link rule as the copy (the source's model card
    is read, not copied: its metadata and text go into DST's card), or None."""
    source = source.resolve()
    entry = source / name
    if not (entry.is_file() or entry.is_symlink()):
        return None
    real, _ = _link_target(entry, _allowed_roots(source))
    return real if real is not None and real.is_file() else None


def _is_support_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in SUPPORT_FILE_PATTERNS)


def _written_anew(name: str) -> bool:
    """Weights, their indexes, the config, the card and normswap's own files: never copied, no need to say."""
    return (name in ("config.json", "README.md") or name.startswith((".", "normswap_", "modeling_normswap_"))
            or name.endswith((".safetensors", ".bin", ".index.json", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")))


def _allowed_roots(source: Path) -> tuple[Path, ...]:
    """SRC, and the ``blobs`` folder of the Hub cache repository whose ``snapshots/<revision>`` holds SRC."""
    roots = [source]
    for ancestor in source.parents:
        if ancestor.name == "snapshots":
            roots.append(ancestor.parent / "blobs")
            break
    return tuple(roots)


def _link_target(entry: Path, allowed_roots: tuple[Path, ...]) -> tuple[Path | None, str]:
    """The file to read for ``entry``, or None with the reason it is not copied."""
    try:
        target = entry.resolve(strict=True)
    except (OSError, RuntimeError) as error:  # a dangling link or a loop (RuntimeError before Python 3.13)
        return None, f"a link that cannot be followed ({getattr(error, 'strerror', None) or error})"
    if entry.is_symlink() and not any(target == root or root in target.parents for root in allowed_roots):
        return None, f"a link to {target}, outside the checkpoint"
    return target, ""


def _copy_file(entry: Path, target: Path, allowed_roots: tuple[Path, ...], shown: str, copied: list[str],
               skipped: dict[str, str]) -> None:
    real, reason = _link_target(entry, allowed_roots)
    if real is None:
        skipped[shown] = reason
        return
    if not real.is_file():
        skipped[shown] = "not a regular file"
        return
    if real.stat().st_size > _MAX_FILE_BYTES:
        skipped[shown] = f"{real.stat().st_size} bytes, larger than any support file"
        return
    shutil.copyfile(real, target)
    shutil.copymode(real, target)
    copied.append(shown)


def _copy_folder(entry: Path, target: Path, allowed_roots: tuple[Path, ...], shown: str, copied: list[str],
                 skipped: dict[str, str], depth: int) -> None:
    if entry.is_symlink():
        skipped[shown] = "a link to a folder (folders are copied only as real folders)"
        return
    if not entry.is_dir():
        if entry.is_file():
            _copy_file(entry, target, allowed_roots, shown, copied, skipped)
        return
    if depth > _MAX_DEPTH:
        skipped[shown] = f"nested deeper than {_MAX_DEPTH} folders"
        return
    target.mkdir()
    copied.append(shown + "/")
    for child in sorted(entry.iterdir()):
        _copy_folder(child, target / child.name, allowed_roots, f"{shown}/{child.name}", copied, skipped,
                     depth + 1)


def _sentence_transformers_modules(source: Path) -> set[str]:
    """The module folders ``modules.json`` names (``1_Pooling``): plain names inside SRC only."""
    data = _small_json(source / "modules.json")
    if not isinstance(data, list):
        return set()
    paths = {module.get("path") for module in data if isinstance(module, dict)}
    return {path for path in paths if is_plain_file_name(path)}


def _auto_map_code_files(source: Path) -> set[str]:
    """``tokenization_x.py`` for ``"auto_map": {"AutoTokenizer": ["tokenization_x.XTokenizer", null]}`` in a
    support config (never in config.json: the converted model's code is normswap's or stock)."""
    names: set[str] = set()
    for config in ("tokenizer_config.json", "preprocessor_config.json", "processor_config.json"):
        data = _small_json(source / config)
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if not isinstance(auto_map, dict):
            continue
        for value in auto_map.values():
            for reference in value if isinstance(value, list) else [value]:
                if isinstance(reference, str) and "--" not in reference and "." in reference:
                    module = reference.rsplit(".", 1)[0] + ".py"
                    if is_plain_file_name(module):
                        names.add(module)
    return names


def _small_json(path: Path) -> object:
    try:
        if path.stat().st_size > 8 * 2**20:
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
