"""Recipes: per-family facts that detection cannot see, as TOML data shipped in the wheel.

A recipe (``recipes/<family>.toml``) is optional: a family without one still inspects.
Schema (all keys optional except ``model_types``)::

    model_types = ["opt"]                       # transformers model_type values it covers
    notes = ["..."]                             # caveats shown by `normswap inspect`
    [placement_flags]                           # config flags that switch norm placement
    do_layer_norm_before = { true = "pre", false = "post" }
    [native.pre]                                # a stock family that expresses the Pre-Norm layout
    model_type = "megatron-bert"
    class_prefix = ["Bert", "MegatronBert"]     # BertForMaskedLM -> MegatronBertForMaskedLM
    config = { some_key = 1 }                   # config values to set
    requires = { use_sliding_window = false }   # source config values the stock family's code assumes
    [native.sandwich]                           # also [native."post-sublayer"]: families with branch output norms
    [target_config.post]                        # config values any converted model of this placement needs
    rescale_every = 0
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

_KNOWN_KEYS = frozenset({"model_types", "notes", "placement_flags", "native", "target_config"})
_NATIVE_KEYS = frozenset({"model_type", "class_prefix", "config", "requires"})
_NATIVE_PLACEMENTS = ("pre", "post", "sandwich", "post-sublayer")
_PLACEMENTS = frozenset({"pre", "post", "parallel", "sandwich", "post-sublayer"})


@dataclass(frozen=True)
class PlacementFlag:
    """A config key whose values switch the norm placement within one family."""

    key: str
    placements: tuple[tuple[str, str], ...]  # (config value as TOML key, placement)


@dataclass(frozen=True)
class NativeTarget:
    """A stock transformers family that loads the converted weights with no custom code."""

    placement: str
    model_type: str
    class_prefix: tuple[str, str] | None = None  # (source prefix, target prefix) of model class names
    config: tuple[tuple[str, Any], ...] = ()  # config values the target needs
    # source config values the target's code assumes (Qwen3 -> Exaone 4: no attention bias, no sliding window):
    # a source config that has other values is no model of this target, and converts through generated code
    requires: tuple[tuple[str, Any], ...] = ()

    def unmet(self, source_config: Any) -> tuple[str, ...]:
        """``key = value (the source has other)`` for each required value ``source_config`` does not hold (a key
        it lacks counts as None)."""
        return tuple(f"{key} = {value!r} (the source has {getattr(source_config, key, None)!r})"
                     for key, value in self.requires if getattr(source_config, key, None) != value)

    def target_class_name(self, source_class_name: str) -> str:
        """``BertForMaskedLM`` -> ``MegatronBertForMaskedLM``; unchanged without a prefix rule."""
        if self.class_prefix is None:
            return source_class_name
        old, new = self.class_prefix
        if not source_class_name.startswith(old):
            raise RecipeError(f"native target {self.model_type}: class {source_class_name} does not start with "
                              f"{old!r}; fix class_prefix in the recipe")
        return new + source_class_name[len(old):]


@dataclass(frozen=True)
class Recipe:
    """What one family's recipe file says."""

    name: str
    model_types: tuple[str, ...]
    notes: tuple[str, ...] = ()
    placement_flags: tuple[PlacementFlag, ...] = ()
    native: tuple[NativeTarget, ...] = ()
    # (placement, ((key, value), ...)): config values a converted model of that placement needs, natively loaded
    # or generated (RWKV halves its stream every rescale_every layers in eval mode, harmless only while every
    # branch reads the stream through a norm)
    target_config: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()

    def native_target(self, placement: str) -> NativeTarget | None:
        return next((target for target in self.native if target.placement == placement), None)

    def config_for(self, placement: str) -> dict[str, Any]:
        """The config values any converted model of ``placement`` needs."""
        return dict(next((values for where, values in self.target_config if where == placement), ()))


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
    native = tuple(_parse_native(where, placement, table) for placement, table in data.get("native", {}).items())
    return Recipe(name, tuple(model_types), tuple(notes), tuple(flags), native,
                  _parse_target_config(where, data.get("target_config", {})))


def _parse_target_config(where: str, tables: Any) -> tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]:
    if not isinstance(tables, dict) or not all(p in _PLACEMENTS and isinstance(t, dict) for p, t in tables.items()):
        raise RecipeError(f"{where}: target_config must hold [target_config.<placement>] tables of config values, "
                          f"the placement one of {sorted(_PLACEMENTS)}")
    return tuple((placement, tuple(sorted(values.items()))) for placement, values in sorted(tables.items()))


def _parse_native(where: str, placement: str, table: Any) -> NativeTarget:
    if placement not in _NATIVE_PLACEMENTS or not isinstance(table, dict):
        raise RecipeError(f"{where}: [native.{placement}] must be a [native.<placement>] table, the placement one of "
                          f"{', '.join(_NATIVE_PLACEMENTS)}")
    unknown = set(table) - _NATIVE_KEYS
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {sorted(unknown)} in [native.{placement}]; "
                          f"allowed: {sorted(_NATIVE_KEYS)}")
    if not isinstance(table.get("model_type"), str):
        raise RecipeError(f"{where}: [native.{placement}] needs model_type, the stock family's model_type")
    prefix = table.get("class_prefix")
    if prefix is not None and (not isinstance(prefix, list) or len(prefix) != 2
                               or not all(isinstance(p, str) for p in prefix)):
        raise RecipeError(f"{where}: [native.{placement}] class_prefix must be [source prefix, target prefix]")
    config = table.get("config", {})
    if not isinstance(config, dict):
        raise RecipeError(f"{where}: [native.{placement}] config must be a table of config values")
    requires = table.get("requires", {})
    if not isinstance(requires, dict):
        raise RecipeError(f"{where}: [native.{placement}] requires must be a table of source config values")
    return NativeTarget(placement, table["model_type"], tuple(prefix) if prefix else None,
                        tuple(sorted(config.items())), tuple(sorted(requires.items())))


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
