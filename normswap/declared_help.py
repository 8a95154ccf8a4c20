"""``normswap convert --help`` lists the conversions the files of ``normswap.conversion`` declare, so a new
placement or norm kind (a new file, ``conversion/registry.py``) is described where the user looks for it, not
only accepted. The declarations are read only when help is asked for: they import torch and transformers."""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

WIDTH = 100


def declared_conversions() -> str:
    """The declared placements, the steps between them and the norm kinds, as text for the end of the help."""
    from .conversion.registry import norm_kinds, placement_edges, placements, source_placements

    sources = sorted(source_placements() - set(placements()))
    reached = ", ".join(placements()) + (f" (also from {', '.join(sources)})" if sources else "")
    lines = ["declared conversions (normswap/conversion/registry.py):", f"  --placement: {reached}",
             "  steps a route is made of (the cheapest route is taken; docs/design.md §9):"]
    for edge in placement_edges():
        option = f" [with --{edge.option.replace('_', '-')}]" if edge.option else ""
        lines += _wrapped(f"{edge.source} -> {edge.target}{option}", edge.description)
    lines.append("  --norm:")
    for kind in norm_kinds().values():
        lines += _wrapped(kind.name, kind.description)
    return "\n".join(lines)


def _wrapped(name: str, description: str) -> list[str]:
    text = f"{name}: {description}" if description else name
    return textwrap.wrap(text, WIDTH, initial_indent="    ", subsequent_indent="      ")


class DeclaredConversionsHelp(argparse.Action):
    """``-h``/``--help`` of ``convert``: argparse's help, then the declared conversions."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        parser.print_help()
        try:
            listed = declared_conversions()
        except KeyboardInterrupt:  # a Ctrl-C while torch imports: the help was shown, stop as interrupted
            parser.exit(130)
        sys.stdout.write(f"\n{listed}\n")
        parser.exit()
