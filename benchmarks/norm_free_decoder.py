"""Norm-free (--norm none) and DyT (--norm dyt) decoders: zero-shot drift, and next-token KL before and after healing.

For the tiny GPT-2-style (Pre-LN, tied embeddings) and Llama-style (Pre-RMSNorm) models of ``heal_decoder.py``,
pretrained for a few minutes on the built-in corpus so the weights are not random: convert to ``none`` and to
``dyt`` (calibrated on the corpus), report the output cosine and next-token KL(original || converted) of the
conversion itself, then heal each for a few minutes and report the held-out KL before and after.

    python benchmarks/norm_free_decoder.py [--pretrain-minutes 2] [--heal-minutes 1.5]
"""

from __future__ import annotations

import argparse

import torch
import transformers
from heal_decoder import decoder_configs, pretrain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-minutes", type=float, default=2.0)
    parser.add_argument("--heal-minutes", type=float, default=1.5)
    parser.add_argument("--models", default="gpt2,llama")
    args = parser.parse_args()

    import normswap
    from normswap.healing.api import heal
    from normswap.healing.rows import TokenisedTexts
    from normswap.healing.texts import load_texts, split_texts

    texts = split_texts(load_texts(None))
    train = TokenisedTexts(texts.train, None, 64, 256)
    calibration = {"input_ids": train.input_ids[:32], "attention_mask": train.attention_mask[:32]}
    configs = decoder_configs()
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        original = transformers.AutoModelForCausalLM.from_config(configs[name])
        steps, loss = pretrain(original, train, args.pretrain_minutes)
        original.eval()
        print(f"{name}: pretrained {steps} steps, loss {loss:.3f}", flush=True)
        for kind in ("none", "dyt"):
            student = normswap.convert(original, norm=kind, inputs=calibration)
            drift = student.normswap_report.drift
            _, report = heal(original, student, max_steps=100_000, max_time=args.heal_minutes * 60, batch_size=16,
                             learning_rate=5e-4, eval_steps=100, quiet=True)
            before, after = report.before["next_token_kl"], report.after["next_token_kl"]
            rows.append((name, kind, drift.output_cosine, drift.next_token_kl, before, after, report.steps))
            print(f"{name} {kind}: zero-shot cosine {drift.output_cosine:.4f}, KL {drift.next_token_kl:.4f}; held-out "
                  f"KL {before:.4f} -> {after:.4f} ({after / before:.1%}) in {report.steps} heal steps", flush=True)
    print(f"\n{'model':6} {'norm':5} {'cosine':>7} {'KL probe':>9} {'KL before':>10} {'KL after':>9} "
          f"{'after/before':>13} {'steps':>6}")
    for name, kind, cosine, probe_kl, before, after, steps in rows:
        print(f"{name:6} {kind:5} {cosine:7.4f} {probe_kl:9.4f} {before:10.4f} {after:9.4f} {after / before:13.1%} "
              f"{steps:6d}")


if __name__ == "__main__":
    main()
