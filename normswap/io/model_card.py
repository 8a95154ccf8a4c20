"""The short model card (README.md) written into every converted checkpoint."""

from __future__ import annotations

from typing import Any


def model_card(destination_name: str, provenance: dict[str, Any], plan_text: str, drift_summary: str,
               loads_natively: bool) -> str:
    load = ("from transformers import AutoModel\n"
            f'model = AutoModel.from_pretrained("{destination_name}")')
    if not loads_natively:
        load = load.replace('")', '", trust_remote_code=True)')
    exact = provenance.get("exact")
    healing = "" if exact else (
        "\nThis conversion is **not exact**: the converted model computes a different function. "
        "Heal it (distil it back toward the original) before use; `normswap heal` does that.\n")
    return f"""---
tags:
- normswap
---
# {destination_name}

Converted by [normswap](https://pypi.org/project/normswap/) {provenance.get("version")} from
`{provenance.get("source")}` ({provenance.get("source_model_type")}): {provenance.get("conversion")},
realised as {provenance.get("realisation")}.
{healing}
## Load

```python
{load}
```

## Drift on probe inputs

```text
{drift_summary}
```

## Plan

```text
{plan_text}
```

`normswap_report.json` holds the full figures.
"""
