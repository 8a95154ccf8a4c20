"""Which ``AutoModel.from_config(...)`` calls of a modeling file build a class the generated file regenerates.

Composite models (Aria, Llava, Fuyu, DeepseekVL) build their language model with
``AutoModel.from_config(config.text_config)``; transformers resolves that through its global mappings to the
stock class, so without an edit the generated layers would never run. Each such call is found in the source,
its config argument evaluated on the model's own config, and the class transformers would build looked up the
way ``from_config`` does; where that class is one the generated file rebuilds, the call is redirected to it.
"""

from __future__ import annotations

import ast
import inspect as pyinspect
from collections.abc import Collection, Mapping
from types import ModuleType
from typing import Any

from torch import nn

from .edits import BuildSubmodelDirectly


def auto_redirects(model: nn.Module, module: ModuleType, source: str, regenerated: Mapping[type, str],
                   class_names: Collection[str] | None = None) -> list[BuildSubmodelDirectly]:
    """The edits that make ``module``'s classes (``class_names``, or all) build regenerated classes directly.

    ``source`` is the module's source text; ``regenerated`` maps each stock class the generated file rebuilds
    to its name there. Calls whose class cannot be known from ``model`` (a class it does not instantiate and
    whose config it does not hold) are left alone.
    """
    edits: list[BuildSubmodelDirectly] = []
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef) or (class_names is not None and node.name not in class_names):
            continue
        calls = [(function, call, name) for function in node.body
                 if isinstance(function, ast.FunctionDef) and function.name == "__init__"
                 for call in ast.walk(function) if (name := _auto_class_name(call, module)) is not None]
        stock = vars(module).get(node.name)
        config = _config_of(model, stock) if calls and pyinspect.isclass(stock) else None
        for function, call, auto_name in calls if config is not None else ():
            built = _resolved_class(vars(module)[auto_name], _config_argument(call, function, config))
            if built is not None and built in regenerated:
                edits.append(BuildSubmodelDirectly(node.name, call.lineno, auto_name, regenerated[built]))
    return list(dict.fromkeys(edits))


def _config_of(model: nn.Module, stock: type) -> Any:
    """The config an instance of ``stock`` is built with: that of one in ``model``, else ``model``'s own where
    ``stock`` reads that class of config (a sibling head such as ``LlavaForConditionalGeneration``)."""
    for module in model.modules():
        if type(module) is stock:
            return getattr(module, "config", None)
    config_class = getattr(stock, "config_class", None)
    config = getattr(model, "config", None)
    return config if pyinspect.isclass(config_class) and isinstance(config, config_class) else None


def _auto_class_name(node: ast.AST, module: ModuleType) -> str | None:
    """``X`` for a call ``X.from_config(...)`` where ``module`` binds ``X`` to one of transformers' Auto classes."""
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "from_config"
            and isinstance(node.func.value, ast.Name)):
        return None
    value = vars(module).get(node.func.value.id)
    return node.func.value.id if pyinspect.isclass(value) and issubclass(value, _BaseAutoModelClass) else None


def _config_argument(call: ast.Call, function: ast.FunctionDef, config: Any) -> Any:
    """The config ``call`` passes, evaluated on ``config`` (the one ``__init__`` receives), or None."""
    argument = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == "config"), None)
    return _evaluate(argument, function, config, call.lineno, follow_local=True)


def _evaluate(expression: ast.expr | None, function: ast.FunctionDef, config: Any, line: int,
              follow_local: bool) -> Any:
    """``config``, ``self.config``, ``config.text_config``, ``config.get_text_config()`` ... and one local
    assigned from them before ``line``."""
    if (isinstance(expression, ast.Call) and not expression.args and not expression.keywords
            and isinstance(expression.func, ast.Attribute) and expression.func.attr == "get_text_config"):
        base = _evaluate(expression.func.value, function, config, line, follow_local)
        return base.get_text_config() if _is_config(base) else None
    if isinstance(expression, ast.Attribute):
        if isinstance(expression.value, ast.Name) and expression.value.id == "self" and expression.attr == "config":
            return config
        base = _evaluate(expression.value, function, config, line, follow_local)
        return getattr(base, expression.attr, None) if base is not None else None
    if isinstance(expression, ast.Name):
        if expression.id == "config":
            return config
        assigned = _last_assignment(function, expression.id, line) if follow_local else None
        return _evaluate(assigned, function, config, line, follow_local=False) if assigned is not None else None
    return None


def _last_assignment(function: ast.FunctionDef, name: str, line: int) -> ast.expr | None:
    """The value of the last ``<name> = value`` in ``function`` before ``line`` (``text_config = config.x``)."""
    found = [node for node in ast.walk(function) if isinstance(node, ast.Assign) and node.lineno < line
             and any(isinstance(target, ast.Name) and target.id == name for target in node.targets)]
    return max(found, key=lambda node: node.lineno).value if found else None


def _resolved_class(auto_class: Any, config: Any) -> type | None:
    """The class ``auto_class.from_config(config)`` builds when that is exactly ``<class>._from_config(config)``:
    a stock config, without remote code or the text-config special case."""
    from transformers.models.auto.auto_factory import _get_model_class

    if not _is_config(config):
        return None
    mapping = auto_class._model_mapping
    if auto_class.__name__ in (getattr(config, "auto_map", None) or {}) or type(config) not in mapping:
        return None
    model_class = _get_model_class(config, mapping)
    text_config_class = config.sub_configs.get("text_config")
    if text_config_class is not None and getattr(model_class, "config_class", None) == text_config_class:
        return None  # from_config would build it from config.get_text_config() instead
    return model_class


def _is_config(value: Any) -> bool:
    from transformers import PreTrainedConfig

    return isinstance(value, PreTrainedConfig)
