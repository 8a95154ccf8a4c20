"""The ``normswap`` command line. It only parses flags and calls the library.

Results go to stdout; errors are one line on stderr. Exit codes: 0 success,
1 a known failure (``NormswapError``), 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence

from .errors import NormswapError
from .version import __version__


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

    convert = commands.add_parser(
        "convert",
        help="convert a checkpoint to another norm placement",
        description="Rewrite a checkpoint between Post-Norm and Pre-Norm under the norm-shift mapping "
        "(every branch keeps the normalisation it was trained with), verify it, and save it.",
    )
    convert.add_argument("source", metavar="SRC", help="checkpoint folder")
    convert.add_argument("destination", metavar="DST", help="output folder (written atomically)")
    convert.add_argument("--placement", choices=("pre", "post"), help="target norm placement")
    convert.add_argument("--norm", choices=("rmsnorm", "layernorm"),
                         help="target norm kind: rmsnorm (exact for Pre-LN models) or layernorm (with --exact)")
    convert.add_argument("--untie", action="store_true",
                         help="with --norm rmsnorm: centre the embedding weights and untie lm_head, instead of "
                         "centring the stream in code")
    convert.add_argument("--exact", action="store_true",
                         help="RMSNorm -> LayerNorm exactly, by one extra hidden dimension (Llama, Mistral, Qwen2)")
    convert.add_argument("--no-native", dest="native", action="store_false",
                         help="do not use a stock transformers family as the target")
    convert.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    convert.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    convert.add_argument("--calib", metavar="FILE", help="probe text, one document per line "
                         "(default: Python standard-library docstrings)")
    convert.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"),
                         default="auto", help="output dtype of floating-point tensors (default: each tensor's own)")
    convert.add_argument("--verify-max-size", default="1GB", metavar="SIZE",
                         help="verify against the original (both loaded in memory) up to this much weight data; "
                         "larger conversions are streamed and reported as not verified (default 1GB)")
    convert.add_argument("--allow-nonfinite", action="store_true",
                         help="convert even if a tensor the conversion computes with holds NaN or Inf")
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    convert.add_argument("--json", action="store_true", help="print the plan and report as one JSON object")
    convert.add_argument("--trust-remote-code", action="store_true",
                         help="allow custom modeling code named by the checkpoint's auto_map")
    return parser


def _run_convert(args: argparse.Namespace) -> int:
    from .conversion.checkpoint import convert_checkpoint

    result = convert_checkpoint(args.source, args.destination, args.placement, norm=args.norm, exact=args.exact,
                                untie=args.untie,
                                native=args.native,
                                overwrite=args.overwrite, max_shard_size=args.max_shard_size, calib=args.calib,
                                trust_remote_code=args.trust_remote_code, dtype=args.dtype,
                                allow_nonfinite=args.allow_nonfinite, progress=not args.quiet,
                                verify_max_size=args.verify_max_size)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    print(result.plan.describe())
    if result.destination is None:
        print(f"nothing written: {result.note}")
        return 0
    assert result.report is not None
    print(result.report.summary())
    print(f"wrote {result.destination}")
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    from .detect import inspect
    from .render import render_topology

    topology = inspect(args.source, trust_remote_code=args.trust_remote_code)
    if args.json:
        print(json.dumps(topology.to_dict(), indent=2))
    else:
        print(render_topology(topology))
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every ``finally`` and cleanup runs."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


class _StderrWarnings(logging.Handler):
    """One ``Warning: ...`` line on whatever ``sys.stderr`` is at the time."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"Warning: {record.getMessage()}", file=sys.stderr)


def _show_warnings() -> None:
    logger = logging.getLogger("normswap")
    if not any(isinstance(handler, _StderrWarnings) for handler in logger.handlers):
        logger.addHandler(_StderrWarnings(logging.WARNING))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command == "convert" and (args.placement is None) == (args.norm is None):
        parser.error("convert needs exactly one of --placement and --norm")
    _show_warnings()
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        if args.command == "inspect":
            return _run_inspect(args)
        if args.command == "convert":
            return _run_convert(args)
    except NormswapError as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:
        name = "SIGTERM" if isinstance(interrupt, Terminated) else "interrupt"
        print(f"Stopped by {name}: nothing was written (the temporary output was removed)", file=sys.stderr)
        return 143 if isinstance(interrupt, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 2


if __name__ == "__main__":
    sys.exit(main())
