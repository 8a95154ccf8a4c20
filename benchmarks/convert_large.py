"""Streamed conversion of a large checkpoint: time against ``cp -r``, peak memory against the largest shard.

Generates a Llama-shaped bf16 checkpoint (random weights, default 4.8 GB in 2 GB shards), then, in one
run and on the same disk:

* ``cp -r`` of the checkpoint folder (the floor: reading and writing every byte once);
* ``normswap convert --placement post`` (pre -> post, generated code) and ``--norm layernorm``
  (RMSNorm -> LayerNorm, approximate), each streamed;
* the in-memory path, ``from_pretrained`` -> ``normswap.convert`` -> ``save_pretrained``, for comparison.

Each runs as its own process; its peak RSS comes from ``os.wait4``. Every conversion is timed right
after its own ``cp -r`` (the disk's speed drifts by 2x or more between minutes on these machines), and
the ratios are medians over ``--repeats`` such pairs. Prints time / copy time; the share of bytes copied
while planning (``reused_bytes``); the part spent writing after planning (``seconds.writing``) / copy time;
and peak RSS / largest shard. Targets (issue 5): time ratio <= 2.0, peak RSS <= 1.5 GB for >= 4 GB.
Also prints the start-up floor: a fresh process that only imports what planning needs (torch, normswap,
transformers' Llama code), against ``cp -r`` in the same way; the placement conversion repeated in one process
through ``normswap.convert_checkpoint`` (as when converting every checkpoint of a training run: the imports are
paid once), each timed after its own ``cp -r``; and with ``--verify-offloaded``, one placement conversion
verified with the weights left on disk.

    python benchmarks/convert_large.py [--workdir DIR] [--layers 28] [--repeats 3] [--keep] [--verify-offloaded]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

IN_MEMORY = """
import sys, torch, transformers, normswap
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="auto")
options = {"placement": "post"} if sys.argv[3] == "placement" else {"norm": "layernorm"}
converted = normswap.convert(model, **options)
converted.save_pretrained(sys.argv[2], max_shard_size="2GB")
"""

# ends like the command line does, without interpreter teardown (normswap.process_exit)
IMPORTS = "import os, normswap.conversion.checkpoint, transformers.models.llama.modeling_llama; os._exit(0)"

# Many checkpoints converted in one process (normswap.convert_checkpoint in a loop): the first conversion pays
# the imports; each later one is timed in-process right after its own `cp -r`. Prints [[cp, conversion], ...].
IN_ONE_PROCESS = """
import json, shutil, subprocess, sys, time
from pathlib import Path
import normswap
source, out, repeats = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
normswap.convert_checkpoint(source, out, placement="post", max_shard_size="2GB")
shutil.rmtree(out)
pairs = []
for _ in range(repeats):
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(source), str(out)], check=True)
    copy = time.perf_counter() - start
    shutil.rmtree(out)
    subprocess.run(["sync"], check=True)
    start = time.perf_counter()
    normswap.convert_checkpoint(source, out, placement="post", max_shard_size="2GB")
    pairs.append([copy, time.perf_counter() - start])
    shutil.rmtree(out)
print(json.dumps(pairs))
"""


def measured(command: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in bytes, stdout) of one child process."""
    os.sync()
    start = time.perf_counter()
    with tempfile.TemporaryFile() as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(process.pid, 0)
        elapsed = time.perf_counter() - start
        if status != 0:
            raise SystemExit(f"{' '.join(command[:4])} ... failed: {process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        output.seek(0)
        return elapsed, usage.ru_maxrss * 1024.0, output.read().decode()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--hidden", type=int, default=2560)
    parser.add_argument("--intermediate", type=int, default=6912)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--skip-in-memory", action="store_true", help="leave out the from_pretrained comparison")
    parser.add_argument("--verify-offloaded", action="store_true",
                        help="also run the placement conversion verified with --verify-offloaded (one pair)")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    parser.add_argument("--repeats", type=int, default=3, help="side-by-side (cp, conversion) pairs per conversion")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="normswap-bench-"))
    source = work / "llama-bf16"
    if not source.is_dir():  # in a child: this process stays lean, so children's peak RSS is their own
        subprocess.run([sys.executable, str(HERE / "synthetic_checkpoint.py"), str(source), "--hidden",
                        str(args.hidden), "--intermediate", str(args.intermediate), "--layers", str(args.layers),
                        "--shard-size", "2GB"], check=True)
    shards = sorted(source.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in shards)
    largest = max(p.stat().st_size for p in shards)
    print(f"checkpoint: {total / 1e9:.2f} GB in {len(shards)} shards, largest {largest / 1e9:.2f} GB")

    subprocess.run(["cat", *map(str, shards)], stdout=subprocess.DEVNULL, check=True)  # same page-cache state for all

    def copy_then(command: list[str]) -> tuple[float, float, float, float, float]:
        """(copy seconds, command seconds, command peak RSS, seconds spent writing after planning, bytes reused
        from the copy made while planning): ``cp -r`` right before, so both see the same disk. The last two come
        from ``normswap convert --json``."""
        copy_time, _, _ = measured(["cp", "-r", str(source), str(work / "copy")])
        shutil.rmtree(work / "copy")
        elapsed, rss, output = measured(command)
        shutil.rmtree(work / "out")
        report = json.loads(output) if "--json" in command else {"seconds": {"writing": float("nan")}}
        return copy_time, elapsed, rss, report["seconds"]["writing"], float(report.get("reused_bytes", 0))

    normswap = [sys.executable, "-m", "normswap", "convert", str(source), str(work / "out"), "--quiet", "--json",
                "--max-shard-size", "2GB"]
    commands = [("streamed placement pre -> post", [*normswap, "--placement", "post"]),
                ("streamed norm rmsnorm -> layernorm", [*normswap, "--norm", "layernorm"])]
    runs: dict[str, list[tuple[float, float, float, float, float]]] = {label: [] for label, _ in commands}
    for repeat in range(args.repeats):
        for label, command in commands:
            runs[label].append(copy_then(command))
            copy_time, elapsed, rss, writing, reused = runs[label][-1]
            print(f"run {repeat + 1}: {label}: {elapsed:.1f} s, cp -r {copy_time:.1f} s, "
                  f"ratio {elapsed / copy_time:.2f}; {reused / total:.1%} of the bytes copied while planning, "
                  f"writing after planning {writing:.1f} s ({writing / copy_time:.2f} x cp)", flush=True)
    floor = []  # (cp -r seconds, import seconds): the start-up no conversion can go below, against the copy
    for _ in range(args.repeats):
        copy_time = measured(["cp", "-r", str(source), str(work / "copy")])[0]
        shutil.rmtree(work / "copy")
        floor.append((copy_time, measured([sys.executable, "-c", IMPORTS])[0]))
    _, warm_rss, warm_output = measured([sys.executable, "-c", IN_ONE_PROCESS, str(source), str(work / "out"),
                                         str(args.repeats)])
    runs["placement, later ones in one process"] = [(copy, seconds, warm_rss, float("nan"), float("nan"))
                                                    for copy, seconds in json.loads(warm_output)]
    if args.verify_offloaded:
        runs["streamed placement, --verify-offloaded"] = [copy_then([*normswap, "--placement", "post",
                                                                     "--verify-offloaded"])]
    if not args.skip_in_memory:
        for label, kind in (("in-memory placement pre -> post", "placement"),
                            ("in-memory norm rmsnorm -> layernorm", "norm")):
            runs[label] = [copy_then([sys.executable, "-c", IN_MEMORY, str(source), str(work / "out"), kind])]

    print(f"\n{'conversion':38} {'time':>8} {'cp -r':>7} {'time/cp':>8} {'write/cp':>9} {'peak RSS':>10} "
          f"{'RSS/shard':>10}")
    summary = {}
    for label, measurements in runs.items():
        ratio = statistics.median(m[1] / m[0] for m in measurements)
        writing_ratio = statistics.median(m[3] / m[0] for m in measurements)
        elapsed = statistics.median(m[1] for m in measurements)
        copy_time = statistics.median(m[0] for m in measurements)
        rss = max(m[2] for m in measurements)
        summary[label] = (ratio, rss)
        print(f"{label:38} {elapsed:7.1f}s {copy_time:6.1f}s {ratio:8.2f} {writing_ratio:9.2f} {rss / 1e9:8.2f}GB "
              f"{rss / largest:10.2f}")
    streamed = [value for label, value in summary.items() if label in dict(commands)]  # the targets' conversions
    worst_time = max(ratio for ratio, _ in streamed)
    worst_rss = max(rss for _, rss in streamed)
    print(f"\nstreamed (median of {args.repeats} side-by-side pairs): worst time ratio {worst_time:.2f} "
          f"(target <= 2.0), worst peak RSS {worst_rss / 1e9:.2f} GB (target <= 1.5 GB for a {total / 1e9:.1f} GB "
          "checkpoint)")
    imports = statistics.median(seconds for _, seconds in floor)
    print(f"start-up floor: importing what planning needs ({IMPORTS!r}) takes {imports:.1f} s in a fresh "
          f"process, {statistics.median(s / c for c, s in floor):.2f} x cp -r (median of {len(floor)} pairs)")
    if not args.keep and args.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
