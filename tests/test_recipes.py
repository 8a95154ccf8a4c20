"""Recipes: the schema, the shipped files, their agreement with detection, and their place in the wheel."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from tiny_configs import TINY_CONFIGS

import normswap
from normswap.recipe import load_recipes, parse_recipe

ROOT = Path(__file__).parent.parent
SHIPPED = sorted(p.name for p in (ROOT / "recipes").glob("*.toml"))


def test_shipped_recipes_load_and_name_known_families() -> None:
    from transformers import CONFIG_MAPPING

    recipes = load_recipes()
    assert len({r.name for r in recipes.values()}) == len(SHIPPED) >= 8
    unknown = [t for t in recipes if t not in CONFIG_MAPPING]
    assert not unknown, f"recipes name model_types transformers does not know: {unknown}"


def _placement_flag_cases() -> list[tuple[str, str, str, str]]:
    cases = []
    for model_type, recipe in sorted(load_recipes().items()):
        for flag in recipe.placement_flags:
            for value, placement in flag.placements:
                cases.append((model_type, flag.key, value, placement))
    return cases


@pytest.mark.parametrize(("model_type", "key", "value", "placement"), _placement_flag_cases())
def test_placement_flags_agree_with_detection(model_type: str, key: str, value: str, placement: str,
                                              write_config: Any) -> None:
    base = next(config for config in TINY_CONFIGS.values() if config["model_type"] == model_type)
    config = {**base, key: {"true": True, "false": False}.get(value, value)}
    assert normswap.inspect(write_config(config)).placement == placement


def test_recipe_notes_reach_the_topology(write_config: Any) -> None:
    topology = normswap.inspect(write_config(TINY_CONFIGS["opt_post"]))
    assert any("do_layer_norm_before" in note for note in topology.notes)


def test_family_without_recipe_still_inspects(write_config: Any) -> None:
    assert "qwen2" not in load_recipes()
    topology = normswap.inspect(write_config(TINY_CONFIGS["qwen2"]))
    assert topology.notes == () and topology.placement == "pre"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"model_types": ["x"], "natives": "y"}, r"recipes/bad.toml: unknown key\(s\) \['natives'\]"),
        ({"model_types": ["x"], "native": {"sideways": {"model_type": "y"}}},
         r"recipes/bad.toml: \[native.sideways\] must be a \[native.<placement>\] table, the placement one of pre, "
         r"post, sandwich, post-sublayer"),
        ({"model_types": ["x"], "native": {"sandwich": {"model_type": "y", "requires": 1}}},
         r"\[native.sandwich\] requires must be a table"),
        ({"model_types": ["x"], "native": {"pre": {"class": "y"}}},
         r"recipes/bad.toml: unknown key\(s\) \['class'\] in \[native.pre\]"),
        ({"model_types": ["x"], "native": {"pre": {"config": {}}}}, r"\[native.pre\] needs model_type"),
        ({"model_types": ["x"], "native": {"pre": {"model_type": "y", "class_prefix": ["A"]}}},
         r"class_prefix must be \[source prefix, target prefix\]"),
        ({"notes": []}, "recipes/bad.toml: 'model_types' must be a non-empty list"),
        ({"model_types": ["x"], "notes": "one"}, "recipes/bad.toml: 'notes' must be a list of strings"),
        ({"model_types": ["x"], "placement_flags": {"flag": {"true": "upside-down"}}},
         "recipes/bad.toml: placement_flags.flag must map config values to one of"),
        ({"model_types": ["x"], "target_config": {"sideways": {"k": 0}}},
         r"recipes/bad.toml: target_config must hold \[target_config.<placement>\] tables"),
        ({"model_types": ["x"], "target_config": {"post": 0}}, r"target_config must hold"),
    ],
)
def test_schema_errors_name_the_file_and_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(normswap.RecipeError, match=message):
        parse_recipe("bad", data)


def test_recipes_are_inside_the_built_wheel(tmp_path: Path) -> None:
    """Build the wheel, install it into a fresh folder, and read the recipes from that installed copy."""
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"),
                    str(ROOT)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("normswap-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "normswap").rglob("*.py"))
    missing = [path for path in sources if path not in names]
    assert not missing, f"modules missing from the wheel (add their package to pyproject.toml): {missing}"
    assert sorted(n.removeprefix("normswap/recipes/") for n in names if n.startswith("normswap/recipes/")
                  and n.endswith(".toml")) == SHIPPED

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    probe = (
        "import importlib.resources, normswap, normswap.recipe as r\n"
        f"assert normswap.__file__.startswith({str(target)!r}), normswap.__file__\n"
        "print(sorted(x.name for x in importlib.resources.files('normswap.recipes').iterdir()"
        " if x.name.endswith('.toml')))\n"
        "print(sorted(r.load_recipes()))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                            env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    files_line, types_line = result.stdout.strip().splitlines()
    assert files_line == str(SHIPPED)
    assert "'opt'" in types_line and "'gpt_neox'" in types_line


def test_native_targets_name_real_families_and_classes() -> None:
    import transformers
    from transformers import CONFIG_MAPPING

    targets = [(model_type, target) for model_type, recipe in load_recipes().items() for target in recipe.native]
    assert {t.model_type for _, t in targets} >= {"megatron-bert", "xlm-roberta-xl", "mbart", "opt", "bert"}
    for model_type, target in targets:
        assert target.model_type in CONFIG_MAPPING
        if target.class_prefix:
            source_prefix, _ = target.class_prefix
            base = getattr(transformers, f"{source_prefix}Model", None)
            assert base is not None, f"{model_type}: no class {source_prefix}Model"
            assert getattr(transformers, target.target_class_name(base.__name__), None) is not None
