"""Composite models: the wrapper classes around the edited language model, rebuilt in the generated file.

A vision-language or wrapper model (Llava, DeepseekVL, Fuyu, DPR) keeps its language model in another family's
module: normswap rewrites that module (modeling_llama), but the classes the checkpoint loads through
(LlavaModel, LlavaForConditionalGeneration) live in modeling_llava and would build the stock language model.
The generated file therefore also carries the wrapper module's model classes, copied from transformers'
source, where every name resolves in the generated file: a class it regenerates by its regenerated self, an
``AutoModel.from_config`` call that would build one of those by that class (``auto_calls``), anything else
imported from where transformers defines it. Only the generated config class is registered in transformers'
Auto mappings (package.py), never a stock config class or a model_type, so stock checkpoints of either family keep
loading into the stock classes in the same process.
"""

from __future__ import annotations

import ast
import inspect as pyinspect
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from .auto_calls import auto_redirects
from .derive import CodegenError
from .edits import Edit
from .package import absolute_imports
from .rewrite import apply_edits

# names the generated file's own code defines after the copied classes (package.py's footer)
_RESERVED = frozenset({"NormswapRemovedNorm", "NormswapRMSNorm", "NormswapLayerNorm", "NormswapPlainRMSNorm",
                       "_model_class", "_auto_class", "_normswap_auto_classes", "normswap_source_width_config",
                       "normswap_lift", "normswap_lift_output", "normswap_lifted_projector"})


@dataclass(frozen=True)
class CompositeCode:
    """What the generated file needs beyond the rewritten module of the layers: edits to that module (Aria's
    ``AutoModel.from_config`` of its own text model), the wrapper classes with their imports, and the name
    under which the top model's config class is bound there."""

    text_edits: tuple[Edit, ...]
    source: str  # imports and copied classes, placed after the rewritten module; "" when nothing wraps it
    model_classes: tuple[str, ...]  # the copied PreTrainedModel classes
    wrapped_files: tuple[str, ...]  # "models/llava/modeling_llava.py", for the header
    config_name: str  # the top config class as the generated file names it (ExaoneConfig, imported)
    family: str | None  # the top model's family, where its class lives outside the rewritten module

    @property
    def redirects(self) -> bool:
        """Whether the generated file builds its language model differently from the stock code: then the
        built model must be checked to hold the generated layers (``require_generated_path``)."""
        return bool(self.wrapped_files or self.text_edits)


def composite_code(model: nn.Module, stack_paths: list[str], text: ModuleType, text_source: str,
                   edits: tuple[Edit, ...] = ()) -> CompositeCode:
    """The composite parts for ``model`` whose layer stacks at ``stack_paths`` are classes of ``text``; ``edits``
    name wrapper classes (a projector's owner, ``BuildAtSourceWidth``) and apply to their copies."""
    wrappers = _wrapper_modules(model, stack_paths, text)
    copied = {wrapper: _copied_classes(model, stack_paths, wrapper) for wrapper in wrappers}
    regenerated = {value: name for name, value in vars(text).items()
                   if pyinspect.isclass(value) and value.__module__ == text.__name__}
    namespace = _Namespace(dict(vars(text)))
    for wrapper, names in copied.items():
        for name in names:
            namespace.define(name, getattr(wrapper, name), wrapper)
            regenerated[getattr(wrapper, name)] = name
    text_edits = tuple(auto_redirects(model, text, text_source, regenerated))
    classes = [_wrapper_classes(model, wrapper, copied[wrapper], regenerated, namespace,
                                tuple(edit for edit in edits if edit.class_name in copied[wrapper]))
               for wrapper in wrappers]
    unplaced = [edit for edit in edits if not any(edit.class_name in names for names in copied.values())]
    if unplaced:
        raise CodegenError(f"{unplaced[0].class_name}, which an edit names, is no class the generated file copies")
    config_class = type(model.config)
    config_name = namespace.reference(config_class.__name__, config_class, sys.modules[config_class.__module__])
    files = tuple(f"models/{_family(wrapper)}/{Path(wrapper.__file__ or '').name}" for wrapper in wrappers)
    source = _section(files, config_class, namespace.import_lines(), classes)
    model_classes = tuple(name for wrapper in wrappers for name in copied[wrapper]
                          if _is_pretrained_model(getattr(wrapper, name)))
    return CompositeCode(text_edits, source, model_classes, files, config_name,
                         _family(sys.modules[type(model).__module__]) if wrappers else None)


def _section(files: tuple[str, ...], config_class: type, imports: list[str], classes: list[str]) -> str:
    """The text placed after the rewritten module: why it is there, its imports, the copied classes."""
    if not imports and not classes:
        return ""
    why = (f"The model classes of {', '.join(files)}, rebuilt here so that they build this file's classes" if files
           else f"{config_class.__name__} is defined outside this family's module")
    return "\n".join(["", "", f"# {why}", *imports]) + "".join(f"\n\n\n{code}" for code in classes) + "\n"


def require_generated_path(built: nn.Module, paths: list[str], module_name: str) -> None:
    """Every module from the root to each of ``paths`` must be a class of the generated module, or the rewritten
    layers would not run; the refusal names the class that builds a stock one instead."""
    for path in paths:
        parts = path.split(".")
        for depth in range(1, len(parts) + 1):
            cls = type(built.get_submodule(".".join(parts[:depth])))
            if cls.__module__ == module_name or cls.__module__.startswith("torch."):
                continue
            owner = type(built.get_submodule(".".join(parts[:depth - 1]))).__name__
            raise CodegenError(f"{owner} builds its {parts[depth - 1]} as the stock {cls.__name__} other than by "
                               "`AutoModel.from_config(<its config>)` or a class its module names, so generated code "
                               "cannot make it build the rewritten layers")


def _wrapper_modules(model: nn.Module, stack_paths: list[str], text: ModuleType) -> list[ModuleType]:
    """The transformers modules, other than ``text``, of the classes between the root and the layer stacks;
    innermost first, since an outer wrapper's classes may name an inner one's."""
    modules: list[ModuleType] = []
    for path in stack_paths:
        parts = path.split(".")
        for depth in range(len(parts)):
            cls = type(model.get_submodule(".".join(parts[:depth])))
            module = sys.modules[cls.__module__]
            if module is text or cls.__module__.startswith("torch.") or module in modules:
                continue
            if not cls.__module__.startswith("transformers.models."):
                raise CodegenError(f"{cls.__name__}, which holds the layers at {path}, is defined in "
                                   f"{cls.__module__}, outside transformers' model families; generated code rebuilds "
                                   "only transformers' own classes")
            modules.append(module)
    return modules[::-1]


def _copied_classes(model: nn.Module, stack_paths: list[str], wrapper: ModuleType) -> tuple[str, ...]:
    """The classes of ``wrapper`` to rebuild, in source order: its PreTrainedModel classes (every head a
    checkpoint may load through), the classes between the root and the layers, and their bases there."""
    on_path = {type(model.get_submodule(".".join(path.split(".")[:depth])))
               for path in stack_paths for depth in range(len(path.split(".")))}
    defined = {name: value for name, value in vars(wrapper).items()
               if pyinspect.isclass(value) and value.__module__ == wrapper.__name__}
    wanted = {name for name, value in defined.items() if _is_pretrained_model(value) or value in on_path}
    pending = list(wanted)
    while pending:
        for base in defined[pending.pop()].__mro__[1:]:
            if defined.get(base.__name__) is base and base.__name__ not in wanted:
                wanted.add(base.__name__)
                pending.append(base.__name__)
    order = [node.name for node in ast.parse(_source(wrapper)).body if isinstance(node, ast.ClassDef)]
    missing = wanted - set(order)
    if missing:
        raise CodegenError(f"{wrapper.__name__} does not define {sorted(missing)[0]} in a class statement; generated "
                           "code copies classes from their source")
    return tuple(name for name in order if name in wanted)


def _wrapper_classes(model: nn.Module, wrapper: ModuleType, names: tuple[str, ...], regenerated: dict[type, str],
                     namespace: _Namespace, own_edits: tuple[Edit, ...] = ()) -> str:
    """The source of ``names`` from ``wrapper``, with Auto calls redirected, ``own_edits`` applied and every
    global name resolved."""
    source = _source(wrapper)
    edits = [*auto_redirects(model, wrapper, source, regenerated, set(names)), *own_edits]
    if edits:
        source = apply_edits(source, edits)
    source = absolute_imports(source, wrapper.__package__ or wrapper.__name__.rsplit(".", 1)[0])
    nodes = [node for node in ast.parse(source).body if isinstance(node, ast.ClassDef) and node.name in names]
    renames: dict[str, str] = {}
    for name in dict.fromkeys(node.id for node in _loaded_names(nodes)):
        if name in vars(wrapper) and name not in names and not name.startswith("__"):  # __name__: the file's own
            reference = namespace.reference(name, vars(wrapper)[name], wrapper)
            if reference != name:
                renames[name] = reference
    lines = source.split("\n")  # ast counts lines by newline only
    _rename(lines, nodes, renames, wrapper)
    return "\n\n\n".join("\n".join(lines[_first_line(node) - 1:node.end_lineno or node.lineno]) for node in nodes)


def _rename(lines: list[str], nodes: list[ast.ClassDef], renames: dict[str, str], wrapper: ModuleType) -> None:
    """Rename global names in place, right to left on each line (ast's columns are UTF-8 byte offsets)."""
    bound_locally = {name for node in nodes for name in _locally_bound(node)} & set(renames)
    if bound_locally:
        raise CodegenError(f"{wrapper.__name__} uses {sorted(bound_locally)[0]} both as a global, which the generated "
                           "file binds to another object, and as a local name; cannot rename it")
    targets = sorted(((node.lineno, node.col_offset, node.end_col_offset or 0, renames[node.id])
                      for node in _loaded_names(nodes) if node.id in renames), reverse=True)
    for line, start, end, new in targets:
        encoded = lines[line - 1].encode("utf-8")
        lines[line - 1] = (encoded[:start] + new.encode("utf-8") + encoded[end:]).decode("utf-8")


def _loaded_names(nodes: list[ast.ClassDef]) -> Iterator[ast.Name]:
    return (node for top in nodes for node in ast.walk(top) if isinstance(node, ast.Name)
            and isinstance(node.ctx, ast.Load))


def _locally_bound(node: ast.ClassDef) -> Iterator[str]:
    for inner in ast.walk(node):
        if isinstance(inner, ast.Name) and not isinstance(inner.ctx, ast.Load):
            yield inner.id
        elif isinstance(inner, ast.arg):
            yield inner.arg
        elif isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and inner is not node:
            yield inner.name
        elif isinstance(inner, ast.alias):
            yield inner.asname or inner.name.split(".")[0]


class _Namespace:
    """The generated file's global names (``name -> object``) and the imports added to bind more of them."""

    def __init__(self, bound: dict[str, Any]) -> None:
        self.bound = bound
        self.imports: dict[tuple[str, str], str] = {}  # (module, name) -> the name it is bound to here

    def define(self, name: str, value: Any, wrapper: ModuleType) -> None:
        """A copied class: the generated file binds ``name`` to its copy."""
        if name in self.bound or name in _RESERVED:
            raise CodegenError(f"{wrapper.__name__} and the module it wraps both define {name}; the generated file "
                               "holds both, so one would replace the other")
        self.bound[name] = value

    def reference(self, name: str, value: Any, wrapper: ModuleType) -> str:
        """The name by which the generated file reaches ``value`` (``wrapper``'s global ``name``), importing it
        under ``name`` or, where that name is taken by another object, under ``<name>_<family>``."""
        if self.bound.get(name) is value:
            return name
        home = value.__name__ if pyinspect.ismodule(value) else _home(name, value, wrapper)
        candidate = name
        while candidate in _RESERVED or (candidate in self.bound and self.bound[candidate] is not value):
            candidate = f"{candidate}_{_family(wrapper)}"
        if candidate not in self.bound:
            self.bound[candidate] = value
            self.imports[(home, name)] = candidate
        return candidate

    def import_lines(self) -> list[str]:
        by_module: dict[str, list[str]] = {}
        lines = []
        for (module, name), bound in sorted(self.imports.items()):
            if pyinspect.ismodule(self.bound[bound]):  # `import torch.nn as nn`
                lines.append(f"import {module}" + ("" if module == bound else f" as {bound}"))
            else:
                by_module.setdefault(module, []).append(name if bound == name else f"{name} as {bound}")
        return lines + [_from_import(module, names) for module, names in by_module.items()]


def _from_import(module: str, names: list[str]) -> str:
    """``from module import a, b``, one name a line where that would be longer than 120 characters."""
    line = f"from {module} import {', '.join(names)}"
    return line if len(line) <= 120 else f"from {module} import (\n" + "".join(f"    {name},\n" for name in names) + ")"


def _home(name: str, value: Any, wrapper: ModuleType) -> str:
    """Where to import ``value`` from: the module that defines it under ``name``, else ``wrapper``."""
    module_name = getattr(value, "__module__", None) if pyinspect.isclass(value) or pyinspect.isfunction(value) \
        else None
    if module_name and getattr(sys.modules.get(module_name), name, None) is value:
        return module_name
    return wrapper.__name__


def _first_line(node: ast.ClassDef) -> int:
    return min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)])


def _source(module: ModuleType) -> str:
    return Path(module.__file__ or "").read_text(encoding="utf-8")


def _family(module: ModuleType) -> str:
    return module.__name__.rsplit(".", 2)[-2]


def _is_pretrained_model(value: type) -> bool:
    from transformers import PreTrainedModel

    return issubclass(value, PreTrainedModel)
