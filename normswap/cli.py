"""The ``normswap`` command line. It only parses flags and calls the library.

Results go to stdout; errors are one line on stderr. Exit codes: 0 success,
1 a known failure (``NormswapError``), 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from . import __version__
from .errors import NormswapError


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normswap",
        description="Convert pretrained transformers between norm placements (Post/Pre) and kinds (LayerNorm/RMSNorm).",
    )
    parser.add_argument("--version", action="version", version=f"normswap {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser(
        "inspect",
        help="detect the residual and norm topology of a model",
        description="Detect where every norm sits relative to every residual add, from config.json alone "
        "(the model is built on the meta device; no weights are read).",
    )
    inspect.add_argument("source", metavar="SRC", help="checkpoint folder or config.json")
    inspect.add_argument("--json", action="store_true", help="print one JSON object (schema in the README)")
    inspect.add_argument("--trust-remote-code", action="store_true",
                         help="allow custom modeling code named by the checkpoint's auto_map")
    return parser


def _run_inspect(args: argparse.Namespace) -> int:
    from .detect import inspect
    from .render import render_topology

    topology = inspect(args.source, trust_remote_code=args.trust_remote_code)
    if args.json:
        print(json.dumps(topology.to_dict(), indent=2))
    else:
        print(render_topology(topology))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "inspect":
            return _run_inspect(args)
    except NormswapError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
