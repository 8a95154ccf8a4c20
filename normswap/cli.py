"""The ``normswap`` command line. It only parses flags and calls the library.

Results go to stdout; errors are one line on stderr. Exit codes: 0 success,
1 a known failure (``NormswapError``), 2 a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import json
import logging
import math
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from .declared_help import DeclaredConversionsHelp
from .errors import NormswapError, SourceError
from .failures import SignalsSeen, printable_path, report_failure
from .version import __version__


def _build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser, and each command's own (for usage errors that show the command's usage)."""
    parser = argparse.ArgumentParser(
        prog="normswap",
        description="Convert pretrained transformers between norm placements (Post/Pre) and kinds (LayerNorm/RMSNorm).",
    )
    parser.add_argument("--version", action="version", version=f"normswap {__version__}")
    parser.add_argument("--debug", action="store_true", help="on failure, print the traceback before the error line")
    debug = argparse.ArgumentParser(add_help=False)  # accepted after the command too; set only when given there
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="on failure, print the traceback before the error line")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser(
        "inspect", parents=[debug],
        help="detect the residual and norm topology of a model",
        description="Detect where every norm sits relative to every residual add, from config.json alone "
        "(the model is built on the meta device; no weights are read).",
    )
    inspect.add_argument("source", metavar="SRC", help="checkpoint folder or config.json")
    inspect.add_argument("--json", action="store_true", help="print one JSON object (schema in docs/inspect.md)")
    inspect.add_argument("--trust-remote-code", action="store_true",
                         help="allow custom modeling code named by the checkpoint's auto_map (normswap-generated "
                         "code that is byte for byte this normswap's own runs without it)")

    convert = commands.add_parser(
        "convert", parents=[debug], add_help=False,
        help="convert a checkpoint to another norm placement (--placement) or norm kind (--norm)",
        description="Rewrite a checkpoint to another norm placement (--placement: Post-Norm and Pre-Norm under the "
        "norm-shift mapping, where every branch keeps the normalisation it was trained with; sandwich and "
        "post-sublayer by removing norms as their calibrated stand-ins and adding norms at their calibrated scale), "
        "or between LayerNorm and RMSNorm (--norm), or both in one conversion; verify it against the original, and "
        "save it.",
    )
    convert.add_argument("-h", "--help", action=DeclaredConversionsHelp,
                         help="show this help message, with the declared conversions, and exit")
    convert.add_argument("source", metavar="SRC", help="checkpoint folder")
    convert.add_argument("destination", metavar="DST", help="output folder (written atomically)")
    convert.add_argument("--placement", metavar="PLACEMENT",
                         help="target norm placement: pre (norm before each branch), post (after each residual "
                         "add), sandwich (before each branch and on its output, as Gemma 2) or post-sublayer (on "
                         "each branch's output only, as OLMo 2); not exact, heal the result")
    convert.add_argument("--norm", metavar="KIND",
                         help="target norm kind: rmsnorm (exact for Pre-LN models, approximate for Post-LN), "
                         "layernorm (approximate; exact with --exact), none (every residual norm becomes its "
                         "calibrated stand-in g * x / s + b: a norm-free model) or dyt (Dynamic Tanh "
                         "g * tanh(a x) + b, a started at 1 / s); none and dyt are approximate: heal the result")
    convert.add_argument("--untie", action="store_true",
                         help="write lm_head as its own tensor: with --norm rmsnorm, centre the embedding weights "
                         "instead of centring the stream in code; with --norm layernorm --exact, needed where the "
                         "embeddings are tied")
    convert.add_argument("--exact", action="store_true",
                         help="with --norm layernorm: exactly, by one extra hidden dimension (any Pre-RMSNorm "
                         "decoder whose code takes it: checked by building it), instead of approximately in the "
                         "same width")
    convert.add_argument("--no-native", dest="native", action="store_false",
                         help="do not use a stock transformers family as the target")
    convert.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    convert.add_argument("--max-shard-size", default="5GB",
                         help="largest safetensors shard (default 5GB); the source's shards are kept when they fit")
    convert.add_argument("--calib", metavar="FILE", help="text for verification and for the calibrated scales of "
                         "removed and added norms, one document per line (default: the built-in corpus)")
    convert.add_argument("--no-calibration", dest="calibrate", action="store_false",
                         help="start the norms a conversion removes, adds or rescales at unit scale instead of the "
                         "source's measured scale: no forward pass before writing, so Pre -> Post of any size "
                         "streams without --verify-offloaded, from a start much further from the original")
    convert.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"),
                         default="auto", help="output dtype of floating-point tensors (default: each tensor's own)")
    convert.add_argument("--verify-max-size", default="1GB", metavar="SIZE",
                         help="verify against the original (both loaded in memory) up to this much weight data; "
                         "larger conversions are streamed and reported as not verified (default 1GB)")
    convert.add_argument("--verify-offloaded", action="store_true",
                         help="verify conversions above --verify-max-size too, reading each module's weights from "
                         "disk as it runs (needs accelerate; slow, but memory stays near one layer)")
    convert.add_argument("--allow-nonfinite", action="store_true",
                         help="convert even if a tensor of the source holds NaN or Inf (the report then says the "
                         "drift was not measured)")
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    convert.add_argument("--json", action="store_true", help="print the plan and report as one JSON object")
    convert.add_argument("--trust-remote-code", action="store_true",
                         help="allow custom modeling code named by the checkpoint's auto_map (normswap-generated "
                         "code that is byte for byte this normswap's own runs without it)")
    convert.add_argument("--keep-stream-size", action="store_true",
                         help="with --placement post from Pre-Norm: set each pre norm to the calibrated scale of its "
                         "input first (its weight folded into its readers, exactly), so the moved norms keep the "
                         "stream's size: a much closer start, and the way back is within float rounding instead of "
                         "bit for bit")
    convert.add_argument("--only", type=_groups, default=(), metavar="GROUPS",
                         help="with --norm none|dyt: replace only these norms and keep the others, one stage of a "
                         "staged removal (convert, heal, convert the healed model with the next group, ...): a comma "
                         "list of embedding, final, a sublayer kind (attention, mlp, as inspect names them), a slot "
                         "(pre, post, out) or both (mlp:pre); default: every residual norm")
    convert.add_argument("--heal", action="store_true",
                         help="after converting, heal the result toward SRC (defaults of `normswap heal`)")
    convert.add_argument("--heal-data", metavar="PATH",
                         help="healing text for --heal, as heal's --data (default: as heal's)")
    convert.add_argument("--heal-max-time", type=float, metavar="SECONDS",
                         help="time budget for --heal (default: heal's own default)")
    convert.add_argument("--heal-lora-rank", type=_lora_rank, metavar="R",
                         help="with --heal: train LoRA adapters of rank R and merge them, as heal's --lora-rank")

    heal = commands.add_parser(
        "heal", parents=[debug],
        help="distil a converted checkpoint back toward its original",
        description="Train CONVERTED to behave like ORIGINAL: per-sublayer distillation (what every branch "
        "reads, and the output) with transformers' Trainer; writes DST atomically.",
    )
    heal.add_argument("original", metavar="ORIGINAL", help="the checkpoint that was converted (the teacher)")
    heal.add_argument("converted", metavar="CONVERTED", help="the converted checkpoint (the student)")
    heal.add_argument("destination", metavar="DST", help="output folder (written atomically)")
    heal.add_argument("--data", metavar="PATH",
                      help=".txt (one document per line), .jsonl (a 'text' field), a datasets save_to_disk folder, "
                      "or 'teacher': texts sampled from ORIGINAL, a causal LM, or filled in by its masked-LM head "
                      "(default: 'teacher' for causal LMs, the shipped corpus for other models)")
    heal.add_argument("--max-steps", type=int, metavar="N",
                      help="stop after N training steps (default: 300 without --max-time; with --max-time, no "
                      "step limit: the time budget ends training; with both, whichever comes first)")
    heal.add_argument("--max-time", type=float, metavar="SECONDS",
                      help="time budget of the whole command: loading, the evaluations before and after "
                      "training, training and saving end within it; fewer held-out texts are evaluated when "
                      "all would take over a quarter of it, and a budget that cannot fit one training step is "
                      "refused (default: none; see docs/heal.md)")
    heal.add_argument("--target-cosine", type=float, metavar="COSINE",
                      help="stop once the held-out output cosine, checked every --eval-steps, reaches COSINE "
                      "(default: none)")
    heal.add_argument("--batch-size", type=int, default=8, metavar="N",
                      help="texts per step (default 8; on MiniLM and 2 CPU cores 8 beat 4, 16 and 32)")
    heal.add_argument("--max-length", type=int, default=64, metavar="N", help="tokens per text (default 64)")
    heal.add_argument("--learning-rate", type=float, metavar="RATE",
                      help="AdamW's peak learning rate; it warms up over 20 steps, then decays on a cosine over "
                      "the step limit or the time budget (default 3e-4, or 3e-3 with --lora-rank)")
    heal.add_argument("--held-out", type=int, default=256, metavar="N",
                      help="texts kept for evaluation before and after training, never trained on (default 256, "
                      "at most a third of the texts)")
    heal.add_argument("--eval-steps", type=int, default=100, metavar="N",
                      help="every N steps, check the output cosine on 64 held-out texts and, with --work-dir, "
                      "write a Trainer checkpoint (default 100)")
    heal.add_argument("--warm-start", action="store_true",
                      help="first refit every branch's output projection in closed form (off by default: "
                      "measured slower to converge on MiniLM; see docs/heal.md)")
    heal.add_argument("--match", choices=("sublayers", "branches", "output"), default="sublayers",
                      help="what is matched to the original: what every branch reads plus the output (default), "
                      "also what every branch writes, or the output only (plain distillation)")
    heal.add_argument("--output-weight", type=_weight, default=1.0, metavar="W",
                      help="weigh each stack's output W times a branch input in the loss (default 1; see "
                      "docs/heal.md)")
    heal.add_argument("--logit-weight", type=_weight, default=0.0, metavar="W",
                      help="also match the next-token distributions (KL) of models with an LM head, weighing W "
                      "against 1 per branch input and --output-weight for the output (default 0: off; see "
                      "docs/heal.md)")
    heal.add_argument("--adam-beta2", type=_beta, default=None, metavar="B",
                      help="AdamW's second-moment decay (default 0.95, or 0.999 with --lora-rank; see docs/heal.md)")
    heal.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                      help="arithmetic of the training steps: fp32, or bf16 autocast over float32 weights and "
                      "optimiser (for models of MiniLM's width and up on hardware with bfloat16 units; the "
                      "evaluations and DST keep their dtype; default fp32; see docs/heal.md)")
    heal.add_argument("--train-embeddings", dest="freeze_embeddings", action="store_false",
                      help="train the embedding tables too (frozen by default)")
    heal.add_argument("--lora-rank", type=_lora_rank, metavar="R",
                      help="train rank-R LoRA adapters on the branch projections (plus the norms and the "
                      "projections' biases) instead of every weight, and merge them into DST, an ordinary "
                      "checkpoint (needs peft: the heal extra; default: every weight trains)")
    heal.add_argument("--stages", type=_stages, metavar="STAGES",
                      help="CONVERTED is ORIGINAL converted with --norm none: remove its norms in stages instead of "
                      "at once, each stage fixing its groups' stand-ins at their scale in the model healed so far, "
                      "then healing (the budget shared out over the stages); groups as convert --only names them, "
                      "stages separated by commas, groups of one stage joined by + (for example "
                      "mlp,attention,final; default: no stages)")
    heal.add_argument("--keep-dropout", action="store_true",
                      help="train with the model's dropout (off by default: it holds healing back; the saved "
                      "config keeps its rates either way)")
    heal.add_argument("--work-dir", metavar="DIR",
                      help="keep Trainer checkpoints here, every --eval-steps, for --resume (default: none kept)")
    heal.add_argument("--resume", action="store_true",
                      help="continue from the latest checkpoint in --work-dir; its steps and training time count "
                      "against --max-steps and --max-time (off by default)")
    heal.add_argument("--overwrite", action="store_true", help="replace DST if it exists (off by default)")
    heal.add_argument("--trust-remote-code", action="store_true",
                      help="allow the modeling code the checkpoints name (normswap-generated code that is byte "
                      "for byte this normswap's own runs without it; off by default)")
    heal.add_argument("--quiet", action="store_true", help="no progress bar (shown by default)")
    heal.add_argument("--json", action="store_true",
                      help="print the report as one JSON object (default: a summary)")
    heal.add_argument("--plot", action="store_true",
                      help="also write normswap_drift.png: per-sublayer drift before and after (needs matplotlib; "
                      "off by default)")
    return parser, {"inspect": inspect, "convert": convert, "heal": heal}


def _number_type(accepts: Callable[[float], bool], wanted: str) -> Callable[[str], float]:
    """An argparse type of a number ``accepts`` takes; anything else (words, NaN) is a usage error naming
    ``wanted``."""

    def parse(text: str) -> float:
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if not accepts(number):
            raise argparse.ArgumentTypeError(f"give {wanted}, not {text!r}")
        return number

    return parse


# a loss weight: finite and >= 0; AdamW's beta2: from 0 to 1, 1 excluded
_weight = _number_type(lambda weight: 0 <= weight < math.inf, "a number >= 0 (e.g. 4)")
_beta = _number_type(lambda beta: 0 <= beta < 1, "a number from 0 to 1, 1 excluded (e.g. 0.95)")


def _lora_rank(text: str) -> int:
    """argparse type of --lora-rank: a positive whole number (a usage error otherwise)."""
    try:
        rank = int(text)
    except ValueError:
        rank = 0
    if rank < 1:
        raise argparse.ArgumentTypeError(f"give a positive whole number (e.g. 8), not {text!r}")
    return rank


def _run_convert(args: argparse.Namespace) -> int:
    from .io.destination import check_destination
    from .io.mirror import early_copy
    from .io.scratch import scratch_path

    if args.heal:  # convert into a scratch sibling of DST, heal from there into DST
        args.final_destination = args.destination
        check_destination(Path(args.source), Path(args.destination), args.overwrite)
        args.destination = str(scratch_path(Path(args.destination), "converted"))

    # started before torch is imported, so the source shards are copied while it imports
    with early_copy(Path(args.source), Path(args.destination), args.overwrite, args.norm, args.exact,
                    args.dtype) as mirror:
        _import_native_libraries()
        from .conversion.checkpoint import convert_checkpoint

        result = convert_checkpoint(args.source, args.destination, args.placement, norm=args.norm, exact=args.exact,
                                    untie=args.untie, native=args.native, overwrite=args.overwrite,
                                    max_shard_size=args.max_shard_size, calib=args.calib,
                                    trust_remote_code=args.trust_remote_code, dtype=args.dtype,
                                    allow_nonfinite=args.allow_nonfinite, progress=not args.quiet,
                                    verify_max_size=args.verify_max_size,
                                    verify_offloaded=args.verify_offloaded, mirror=mirror,
                                    calibrate=args.calibrate, keep_stream_size=args.keep_stream_size,
                                    only=args.only)
    if args.heal and result.destination is not None:
        return _heal_converted(args, result)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    if result.destination is None:  # the plan is empty: its one note is the whole story
        print(f"nothing written: {result.note}")
        return 0
    print(result.plan.describe())
    assert result.report is not None
    print(result.report.summary())
    print(f"wrote {result.destination}")
    return 0


def _heal_converted(args: argparse.Namespace, result: object) -> int:
    """``convert --heal``: the conversion went to a hidden sibling; healing writes DST from it."""
    from .healing.checkpoint import heal_checkpoint
    from .io.scratch import mark, remove_scratch

    converted = Path(str(result.destination))  # type: ignore[attr-defined]
    mark(converted, Path(args.final_destination))  # a scratch folder now: swept if this process is killed
    try:
        # the code in ``converted`` is what normswap just generated; the source's stays untrusted unless asked
        report = heal_checkpoint(args.source, converted, args.final_destination, overwrite=args.overwrite,
                                 trust_remote_code=args.trust_remote_code, trust_converted_code=True,
                                 data=args.heal_data, max_time=args.heal_max_time, quiet=args.quiet,
                                 lora_rank=args.heal_lora_rank)
    finally:
        remove_scratch(converted)
    if args.json:
        print(json.dumps({**result.to_dict(), "heal": _finite(report.to_dict())}, indent=2))  # type: ignore[attr-defined]
    else:
        print(result.plan.describe())  # type: ignore[attr-defined]
        print(report.summary())
        print(f"wrote {Path(args.final_destination).resolve()}")
    return 0


def _run_heal(args: argparse.Namespace) -> int:
    import time

    from .healing import distributed
    from .healing.budget import check_limits
    from .io.destination import check_destination

    started = time.monotonic()  # --max-time counts from here (budget.now's clock): loading and saving are in it
    if distributed.launched():  # several processes: join the group first, so that any failure is one line
        _import_native_libraries()
        distributed.start()
    check_limits(args.max_steps, args.max_time)
    distributed.per_process_batch(args.batch_size)  # under a launcher, --batch-size is shared out evenly
    if args.resume and not args.work_dir:
        raise NormswapError("--resume needs --work-dir (the folder that holds the checkpoints to resume)")
    # before the heavy imports: a DST that would be refused is refused at once
    sources = (Path(args.original), Path(args.converted))
    for path in sources:
        if not path.is_dir():
            raise SourceError(f"{path} is not a checkpoint folder; heal takes ORIGINAL and CONVERTED folders")
    if distributed.is_main():  # only rank 0 looks at, or writes in, DST's folder
        check_destination(sources, Path(args.destination), args.overwrite)

    _import_native_libraries()
    if args.lora_rank is not None:
        from .healing.lora import require_peft
        require_peft()
    from .healing.checkpoint import heal_checkpoint
    report = heal_checkpoint(args.original, args.converted, args.destination, overwrite=args.overwrite,
                             trust_remote_code=args.trust_remote_code, data=args.data, max_steps=args.max_steps,
                             max_time=args.max_time, target_cosine=args.target_cosine, batch_size=args.batch_size,
                             max_length=args.max_length, learning_rate=args.learning_rate,
                             held_out=args.held_out, eval_steps=args.eval_steps, warm_start=args.warm_start,
                             freeze_embeddings=args.freeze_embeddings, work_dir=args.work_dir,
                             resume=args.resume, quiet=args.quiet, plot=args.plot, match=args.match,
                             keep_dropout=args.keep_dropout, lora_rank=args.lora_rank,
                             logit_weight=args.logit_weight, output_weight=args.output_weight,
                             adam_beta2=args.adam_beta2, precision=args.precision, stages=args.stages,
                             started=started)
    if not distributed.is_main():
        return 0  # rank 0 prints the report
    if args.json:
        print(json.dumps(_finite(report.to_dict()), indent=2))
    else:
        print(report.summary())
        print(f"wrote {Path(args.destination).resolve()}")
    return 0


def _import_native_libraries() -> None:
    """torch and transformers, imported whole before anything that needs them (see ``import_uninterrupted``)."""
    from .interrupts import import_uninterrupted

    import_uninterrupted("torch", "transformers")


def _finite(report: dict) -> dict:
    from .conversion.finite import finite_for_json

    return finite_for_json(report)


def _run_inspect(args: argparse.Namespace) -> int:
    _import_native_libraries()
    from .detect import inspect
    from .render import render_topology

    topology = inspect(args.source, trust_remote_code=args.trust_remote_code)
    if args.json:
        print(json.dumps(topology.to_dict(), indent=2))
    else:
        print(render_topology(topology))
    return 0


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parsed arguments; a usage error shows the command's own usage, and the closest flag to a mistyped one."""
    parser, commands = _build_parser()
    given = list(sys.argv[1:] if argv is None else argv)
    named = next((token for token in given if not token.startswith("-")), None)
    if named is not None and named not in commands:
        close = difflib.get_close_matches(named, commands, n=1, cutoff=0.5)
        parser.error(f"unknown command {named!r}{f' (did you mean {close[0]}?)' if close else ''}; the commands are "
                     f"{', '.join(commands)}")
    args, unknown = parser.parse_known_args(given)
    command = commands[args.command]
    if unknown:
        command.error(_unrecognised(command, unknown))
    if args.command == "convert" and args.keep_stream_size and args.placement != "post":
        command.error("--keep-stream-size keeps the stream's size through a move to Post-Norm: add --placement post, "
                      "or leave it out")
    if args.command == "convert" and not args.heal:
        orphans = [flag for flag, value in (("--heal-data", args.heal_data), ("--heal-max-time", args.heal_max_time),
                                            ("--heal-lora-rank", args.heal_lora_rank)) if value is not None]
        if orphans:
            command.error(f"{orphans[0]} sets how --heal heals; add --heal, or leave {orphans[0]} out")
    return args


def _groups(value: str) -> tuple[str, ...]:
    """``--only``'s comma list, without empty items."""
    groups = tuple(item.strip() for item in value.split(",") if item.strip())
    if not groups:
        raise argparse.ArgumentTypeError("give at least one group, for example --only mlp")
    return groups


def _stages(value: str) -> tuple[tuple[str, ...], ...]:
    """``--stages``: commas separate the stages, ``+`` joins the groups of one."""
    stages = tuple(tuple(group.strip() for group in stage.split("+") if group.strip()) for stage in value.split(","))
    if not stages or any(not stage for stage in stages):
        raise argparse.ArgumentTypeError(f"{value!r}: give groups separated by commas (a stage of several groups joins "
                                         "them with +), for example mlp,attention,final")
    return stages


def _require_declared_conversion(args: argparse.Namespace) -> None:
    """``--placement`` and ``--norm`` take what the conversion files declare (``conversion/registry.py``), so a new
    conversion needs no change here; a value none declares is a usage error (exit 2), as argparse's choices would
    make it. Checked after parsing, with the interrupt handlers in place: the declarations import torch and
    transformers, and a Ctrl-C there must stop the command like one anywhere else."""
    from .conversion.registry import norm_kinds, placements

    command = _build_parser()[1]["convert"]
    kinds = tuple(norm_kinds())
    if args.placement is None and args.norm is None:
        command.error(f"give the conversion: --placement {'|'.join(placements())} (move the norms), --norm "
                      f"{'|'.join(kinds)} (change their kind, or remove them), or both")
    for flag, value, choices in (("--placement", args.placement, placements()), ("--norm", args.norm, kinds)):
        if value is not None and value not in choices:
            close = difflib.get_close_matches(value, choices, n=1, cutoff=0.5)
            command.error(f"argument {flag}: invalid choice: {value!r} (choose from {', '.join(choices)})"
                          f"{f'; did you mean {close[0]}?' if close else ''}")
    some = [name for name, kind in norm_kinds().items() if kind.plan_some is not None]
    if args.only and args.norm not in some:
        command.error(f"--only picks which norms --norm {'|'.join(some)} replaces: add --norm {some[0]}, or leave "
                      "--only out")


def _activity(args: argparse.Namespace) -> str:
    """What the command was doing, for the line that reports a normswap bug."""
    if args.command == "heal":
        return f"healing {printable_path(args.converted)} toward {printable_path(args.original)}"
    verb = "inspecting" if args.command == "inspect" else "converting"
    return f"{verb} {printable_path(args.source)}"


def _unrecognised(command: argparse.ArgumentParser, unknown: list[str]) -> str:
    """``unrecognised argument --placment (did you mean --placement?)``."""
    flags = [flag for action in command._actions for flag in action.option_strings if flag.startswith("--")]
    described: list[str] = []
    for index, argument in enumerate(unknown):
        if index and unknown[index - 1].startswith("-") and not argument.startswith("-"):
            continue  # the value of the unknown flag before it
        name = argument.split("=", 1)[0]
        close = difflib.get_close_matches(name, flags, n=1, cutoff=0.6) if name.startswith("-") else []
        described.append(f"{argument} (did you mean {close[0]}?)" if close else argument)
    noun = "argument" if len(described) == 1 else "arguments"
    return f"unrecognised {noun}: {', '.join(described)}"


class _StderrWarnings(logging.Handler):
    """One ``Warning: ...`` line on whatever ``sys.stderr`` is at the time."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"Warning: {record.getMessage()}", file=sys.stderr)


def _show_warnings() -> None:
    logger = logging.getLogger("normswap")
    if not any(isinstance(handler, _StderrWarnings) for handler in logger.handlers):
        logger.addHandler(_StderrWarnings(logging.WARNING))


@contextlib.contextmanager
def _quiet_unless_rank_zero() -> Iterator[None]:
    """Under a launcher, every process parses the same arguments: rank 0 alone prints usage errors and help."""
    from .healing import distributed

    if distributed.is_main():
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code. Every failure is one line on stderr
    (``failures.report_failure``); ``--debug`` adds the traceback."""
    with _quiet_unless_rank_zero():
        args = _parse(argv)
    _show_warnings()
    signals = SignalsSeen()
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signals.interrupt),
                signal.SIGTERM: signal.signal(signal.SIGTERM, signals.terminate)}
    try:
        if args.command == "inspect":
            return _run_inspect(args)
        if args.command == "convert":
            _require_declared_conversion(args)
            return _run_convert(args)
        if args.command == "heal":
            return _run_heal(args)
    except (Exception, KeyboardInterrupt) as error:  # noqa: BLE001 - every failure: one line and an exit code
        if args.command == "heal":  # under a launcher: one line for all processes, from rank 0
            from .healing.distributed import report

            return report(error, debug=args.debug, signals=signals, activity=_activity(args))
        return report_failure(error, debug=args.debug, signals=signals, activity=_activity(args))
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 2


def run() -> None:
    """The ``normswap`` console script: ``main``, then a quick exit (``exit_without_teardown``)."""
    from .process_exit import exit_without_teardown

    try:
        code = main()
    except KeyboardInterrupt as interrupt:  # landed outside main's own handling (parsing, the handler itself)
        code = report_failure(interrupt, debug=False)
    exit_without_teardown(code)


if __name__ == "__main__":
    run()
