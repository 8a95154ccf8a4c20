"""Recipes: per-family facts that detection cannot see, as TOML data shipped in the wheel.

A recipe (``recipes/<family>.toml``) is optional: a family without one still inspects.
Schema (all keys optional except ``model_types``)::

    model_types = ["opt"]                       # transformers model_type values it covers
    notes = ["..."]                             # caveats shown by `normswap inspect`
    [placement_flags]                           # config flags that switch norm placement
    do_layer_norm_before = { true = "pre", false = "post" }
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from importlib import resources
from typing import Any

from .errors import RecipeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

_KNOWN_KEYS = frozenset({"model_types", "notes", "placement_flags"})
_PLACEMENTS = frozenset({"pre", "post", "parallel", "sandwich", "post-sublayer"})


@dataclass(frozen=True)
class PlacementFlag:
    """A config key whose values switch the norm placement within one family."""

    key: str
    placements: tuple[tuple[str, str], ...]  # (config value as TOML key, placement)


@dataclass(frozen=True)
class Recipe:
    """What one family's recipe file says."""

    name: str
    model_types: tuple[str, ...]
    notes: tuple[str, ...] = ()
    placement_flags: tuple[PlacementFlag, ...] = ()


def parse_recipe(name: str, data: dict[str, Any]) -> Recipe:
    """Validate one recipe's TOML table; unknown or mistyped keys are errors that name the file."""
    where = f"recipes/{name}.toml"
    unknown = set(data) - _KNOWN_KEYS
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_KNOWN_KEYS)}")
    model_types = data.get("model_types")
    if not isinstance(model_types, list) or not model_types or not all(isinstance(t, str) for t in model_types):
        raise RecipeError(f"{where}: 'model_types' must be a non-empty list of model_type strings")
    notes = data.get("notes", [])
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise RecipeError(f"{where}: 'notes' must be a list of strings")
    flags = []
    for key, table in data.get("placement_flags", {}).items():
        if not isinstance(table, dict) or not all(v in _PLACEMENTS for v in table.values()):
            raise RecipeError(
                f"{where}: placement_flags.{key} must map config values to one of {sorted(_PLACEMENTS)}"
            )
        flags.append(PlacementFlag(key, tuple(sorted(table.items()))))
    return Recipe(name, tuple(model_types), tuple(notes), tuple(flags))


@functools.cache
def load_recipes() -> dict[str, Recipe]:
    """All shipped recipes, keyed by model_type."""
    by_type: dict[str, Recipe] = {}
    for entry in resources.files("normswap.recipes").iterdir():
        if not entry.name.endswith(".toml"):
            continue
        name = entry.name.removesuffix(".toml")
        try:
            data = tomllib.loads(entry.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as error:
            raise RecipeError(f"recipes/{entry.name} is not valid TOML: {error}") from None
        recipe = parse_recipe(name, data)
        for model_type in recipe.model_types:
            if model_type in by_type:
                raise RecipeError(f"model_type '{model_type}' is claimed by recipes {by_type[model_type].name} "
                                  f"and {name}; keep one")
            by_type[model_type] = recipe
    return by_type


def recipe_for(model_type: str) -> Recipe | None:
    """The recipe covering ``model_type``, or None: recipes are optional."""
    return load_recipes().get(model_type)
