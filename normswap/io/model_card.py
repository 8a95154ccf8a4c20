"""The model card (README.md) written into every converted or healed checkpoint.

It replaces the source's README.md, so it carries the source card along (``source_card``): the source's YAML
metadata (license, datasets, language, ...) stays in the front matter, with ``normswap`` added to its tags and
``base_model`` set to the source's Hub id where that is known, and the source's text follows below normswap's
own section. What in the metadata describes the source itself and would be wrong of DST is left out, and the
card says so: the source's own ``base_model`` (its parent), ``new_version``, and its evaluation results
(``model-index``) unless the conversion is exact.

``base_model_relation``: the Hub knows adapter, merge, quantized and finetune. A conversion trains nothing and
quantizes nothing (its weights are a fixed function of the source's), so none fits and it is left unset; a
healed model is trained from the original's weights toward the original's outputs: ``finetune``.

The card links nowhere: no package index page, no absolute path (the source is named as ``provenance`` names it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..version import __version__
from .source_card import SourceCard

HEALED_RELATION = "finetune"
_SOURCE_ONLY_KEYS = ("base_model", "base_model_relation", "new_version")
_RESULTS_KEY = "model-index"


def model_card(destination_name: str, provenance: dict[str, Any], plan_text: str, drift_summary: str,
               loads_natively: bool, source_card: SourceCard | None = None, base_model: str | None = None) -> str:
    """The card of a converted checkpoint."""
    exact = bool(provenance.get("exact"))
    metadata, notes = card_metadata(source_card, base_model, relation=None, keep_results=exact)
    exactness = ("\nThis conversion is **exact**: the converted model computes the source's function, up to "
                 "floating-point rounding; the drift below says how that was checked.\n" if exact else
                 "\nThis conversion is **not exact**: the converted model computes a different function. "
                 "Heal it (distil it back toward the original) before use; `normswap heal` does that.\n")
    return f"""{front_matter(metadata)}# {destination_name}

Converted by normswap {provenance.get("version")} from `{provenance.get("source")}`
({provenance.get("source_model_type")}): {provenance.get("conversion")}, realised as {provenance.get("realisation")}.
{exactness}{notes}
{_load_section(destination_name, loads_natively)}
## Drift on probe inputs

```text
{drift_summary}
```

## Plan

```text
{plan_text}
```

`normswap_report.json` holds the full figures.
{_source_section(source_card, provenance.get("source"), exact)}"""


def heal_card(destination_name: str, provenance: dict[str, Any], summary: str, loads_natively: bool,
              source_card: SourceCard | None = None, base_model: str | None = None) -> str:
    """The card of a healed checkpoint: the original's card carried as for a conversion."""
    metadata, notes = card_metadata(source_card, base_model, relation=HEALED_RELATION if base_model else None,
                                    keep_results=False)
    return f"""{front_matter(metadata)}# {destination_name}

Healed with normswap {__version__}: {provenance.get("conversion", "a converted model")} of
`{provenance.get("source")}` ({provenance.get("source_model_type", "the original")}), distilled back toward the
original.
{notes}
{_load_section(destination_name, loads_natively)}
## Healing

```text
{summary}
```

`normswap_report.json` holds the full figures.
{_source_section(source_card, provenance.get("source"), exact=False)}"""


def card_metadata(source_card: SourceCard | None, base_model: str | None, relation: str | None,
                  keep_results: bool) -> tuple[dict[str, Any], str]:
    """DST's metadata from the source card's, and a note on what was left out (or "")."""
    source = dict(source_card.metadata) if source_card is not None else {}
    metadata = {key: value for key, value in source.items() if key not in _SOURCE_ONLY_KEYS}
    left_out = []
    if source.get("base_model") and source.get("base_model") != base_model:
        left_out.append(f"`base_model` ({_inline(source['base_model'])}: what the source was made from)")
    if source.get("new_version"):
        left_out.append("`new_version` (a newer version of the source)")
    if not keep_results and metadata.pop(_RESULTS_KEY, None) is not None:
        left_out.append("`model-index` (the source's evaluation results: this model computes another function)")
    metadata["tags"] = _tags(source.get("tags"))
    if base_model:
        metadata["base_model"] = base_model
        if relation:
            metadata["base_model_relation"] = relation
    note = f"\nLeft out of the source card's metadata: {'; '.join(left_out)}.\n" if left_out else ""
    return metadata, note


def front_matter(metadata: Mapping[str, Any]) -> str:
    import yaml

    return f"---\n{yaml.safe_dump(dict(metadata), sort_keys=False, allow_unicode=True)}---\n"


def _tags(tags: object) -> list[Any]:
    listed = [tags] if isinstance(tags, str) else list(tags) if isinstance(tags, (list, tuple)) else []
    return [*listed, "normswap"] if "normswap" not in listed else listed


def _inline(value: object) -> str:
    values = value if isinstance(value, (list, tuple)) else [value]
    return ", ".join(f"`{item}`" for item in values)


def _load_section(destination_name: str, loads_natively: bool) -> str:
    if loads_natively:
        return f"""## Load

```python
from transformers import AutoModel, AutoTokenizer
model = AutoModel.from_pretrained("{destination_name}")
tokenizer = AutoTokenizer.from_pretrained("{destination_name}")
```
"""
    return f"""## Load

```python
from transformers import AutoModel, AutoTokenizer
model = AutoModel.from_pretrained("{destination_name}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{destination_name}", trust_remote_code=False)
```

`trust_remote_code=True` runs this folder's `modeling_normswap_*.py`, the modeling code normswap generated. The
tokenizer is the source's and needs no code; `trust_remote_code=False` keeps transformers from asking whether to
run the modeling code, which it otherwise does for a tokenizer too (it reads `config.json` first).
"""


def _source_section(source_card: SourceCard | None, source: object, exact: bool) -> str:
    if source_card is None or not source_card.text.strip():
        return ""
    caveat = "" if exact else "; what it says of the model's behaviour is of the source, not of this model"
    return f"""
## Source model card

The card of `{source}` as it came with the source{caveat}.

{source_card.text.strip()}
"""
