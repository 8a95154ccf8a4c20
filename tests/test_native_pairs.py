"""Native targets of the branch-norm placements, re-checked numerically (``benchmarks/native_pairs.py``).

Each recipe that names a stock family for ``pre``, ``sandwich`` or ``post-sublayer`` is held to what the
benchmark confirmed: the source family's own code with its norms moved to that placement (by hooks, on a tiny
perturbed model) and the stock family loaded with the same weights compute the same logits to 1e-5, and a
required source value the recipe lists breaks the equivalence when it is changed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from normswap.recipe import NativeTarget, load_recipes, parse_recipe

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
BRANCH_NORM_PLACEMENTS = ("pre", "sandwich", "post-sublayer")


def _pairs_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("normswap_native_pairs", BENCHMARKS / "native_pairs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def _recipe_pairs() -> list[tuple[str, NativeTarget]]:
    """(source model_type, target) for every branch-norm-placement native target whose source has such a layout."""
    return sorted(((model_type, target) for model_type, recipe in load_recipes().items() for target in recipe.native
                   if target.placement in ("sandwich", "post-sublayer")
                   or (target.placement == "pre" and model_type in _BRANCH_NORM_SOURCES)),
                  key=lambda pair: (pair[0], pair[1].placement))


# sources of a branch-norm placement whose [native.pre] the benchmark confirmed (other [native.pre] targets are
# Post-Norm or parallel sources, tested in test_convert_native.py)
_BRANCH_NORM_SOURCES = ("glm4", "gemma2", "hyperclovax", "flex_olmo")


@pytest.fixture(scope="module")
def pairs() -> ModuleType:
    return _pairs_module()


def test_recipes_name_the_confirmed_pairs() -> None:
    found = {(source, target.placement, target.model_type) for source, target in _recipe_pairs()}
    assert found == {("glm", "sandwich", "glm4"), ("glm4", "pre", "glm"), ("gemma2", "pre", "vaultgemma"),
                     ("vaultgemma", "sandwich", "gemma2"), ("qwen3", "post-sublayer", "exaone4"),
                     ("olmoe", "post-sublayer", "flex_olmo"), ("flex_olmo", "pre", "olmoe"),
                     ("llama", "sandwich", "hyperclovax"), ("exaone", "sandwich", "hyperclovax"),
                     ("internlm3", "sandwich", "hyperclovax"), ("iquestcoder", "sandwich", "hyperclovax"),
                     ("granite", "sandwich", "hyperclovax"),
                     ("hyperclovax", "pre", "granite")}


@pytest.mark.parametrize(("source", "target"), _recipe_pairs(), ids=lambda x: getattr(x, "model_type", x))
def test_native_pair_computes_the_moved_norms(pairs: ModuleType, source: str, target: NativeTarget) -> None:
    a, b = pairs.scan_family(source), pairs.scan_family(target.model_type)
    assert b.placement == target.placement and a.placement != b.placement
    outcome = pairs.check_pair(a, b, overrides=dict(target.requires))
    assert outcome.confirmed, outcome.reason
    assert outcome.figure <= 1e-5


@pytest.mark.parametrize(("source", "target"), [p for p in _recipe_pairs() if p[1].requires],
                         ids=lambda x: getattr(x, "model_type", x))
def test_required_values_are_needed(pairs: ModuleType, source: str, target: NativeTarget) -> None:
    """Each value a recipe requires breaks the pair when changed: the check can fail, and the list is not padded."""
    a, b = pairs.scan_family(source), pairs.scan_family(target.model_type)
    for key, value in target.requires:
        changed = {**dict(target.requires), key: (not value) if isinstance(value, bool) else value * 1.5 + 0.25}
        assert not pairs.check_pair(a, b, overrides=changed).confirmed, f"{source}: {key} is not needed"


def test_the_check_sees_the_moved_norms(pairs: ModuleType, monkeypatch: Any) -> None:
    """GLM with its norms left where they are is not GLM-4: the check reads the norms it moves, not only the rest."""
    a, b = pairs.scan_family("glm"), pairs.scan_family("glm4")
    assert pairs.check_pair(a, b).confirmed
    monkeypatch.setattr(pairs, "_attach", lambda *args: None)
    outcome = pairs.check_pair(a, b)
    assert not outcome.confirmed and "model.layers.0." in outcome.reason


def test_native_branch_norm_placements_parse() -> None:
    recipe = parse_recipe("x", {"model_types": ["x"], "native": {
        "sandwich": {"model_type": "y", "class_prefix": ["X", "Y"]},
        "post-sublayer": {"model_type": "z", "requires": {"use_sliding_window": False}}}})
    assert recipe.native_target("sandwich").model_type == "y"
    target = recipe.native_target("post-sublayer")
    assert target.requires == (("use_sliding_window", False),)

    class Config:
        use_sliding_window = True

    assert target.unmet(Config()) == ("use_sliding_window = False (the source has True)",)
    assert recipe.native_target("pre") is None
