"""Non-weight files that travel with a converted checkpoint: tokenizer, generation config, and the rest.

The generation config is copied as it is: a conversion changes weights and layout, never decoding defaults.
"""

from __future__ import annotations

import shutil
from pathlib import Path

# written anew for the converted model, never copied from the source
_REPLACED = frozenset({"config.json", "README.md", "normswap_report.json", "normswap_carried.safetensors"})
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx")


def copy_support_files(source: Path, destination: Path) -> list[str]:
    """Copy everything from ``source`` except weights, their indexes and files written anew; returns names."""
    copied = []
    for entry in sorted(source.iterdir()):
        name = entry.name
        if (name in _REPLACED or name.startswith((".", "modeling_normswap_")) or name.endswith(_WEIGHT_SUFFIXES)
                or name.endswith(".index.json")):
            continue
        target = destination / name
        if entry.is_dir():
            shutil.copytree(entry, target)
        else:
            shutil.copy2(entry, target)
        copied.append(name)
    return copied
