"""Heal decoders after Pre -> Post conversion: next-token KL to the original, before and after.

For a tiny GPT-2-style and a tiny Llama-style model: pretrain for a few minutes on the training split of
the shipped healing corpus (byte-level tokens), so the weights are not random; convert Pre -> Post
(generated code, norm-shift mapping); heal a fresh conversion once per healing data source; report
next-token KL(original || converted) before and after, on the held-out texts of that data (in corpus) and on
``data/general_prose.txt`` (out of source: no healing data and no pretraining text comes from it). Target
(issue 19): healed KL <= 5% of the unhealed KL out of source, with no --data (the teacher's samples).

``--data`` takes a comma-separated list: ``teacher`` (what heal does with no data: texts sampled from the
original at the default temperature and length), ``teacher:T:L`` (at temperature T, L tokens); the teacher's
texts are sampled before the healing budget starts (the time is printed), so that every source trains alike;
``shipped`` (the shipped corpus), ``docstrings`` (the default before issue 19) or a file.

    python benchmarks/heal_decoder.py [--pretrain-minutes 3] [--heal-minutes 3] [--heal-steps N] [--data ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers


def pretrain(model: torch.nn.Module, train: object, minutes: float, batch_size: int = 16) -> tuple[int, float]:
    """Plain causal-LM training for ``minutes``; returns (steps, last loss)."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    deadline = time.monotonic() + minutes * 60
    steps, loss = 0, float("nan")
    model.train()
    while time.monotonic() < deadline:
        rows = torch.randint(0, len(train.input_ids), (batch_size,), generator=generator)  # type: ignore[attr-defined]
        ids, mask = train.input_ids[rows], train.attention_mask[rows]  # type: ignore[attr-defined]
        labels = ids.masked_fill(mask == 0, -100)
        output = model(input_ids=ids, attention_mask=mask, labels=labels)
        output.loss.backward()
        optimiser.step()
        optimiser.zero_grad()
        steps, loss = steps + 1, float(output.loss)
    return steps, loss


def decoder_configs() -> dict[str, transformers.PretrainedConfig]:
    """The two tiny decoders: GPT-2 style (LayerNorm, tied) and Llama style (RMSNorm, untied)."""
    return {
        "gpt2": transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=128, n_layer=4, n_head=4),
        "llama": transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=344,
                                          num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                          max_position_embeddings=64, tie_word_embeddings=False),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-minutes", type=float, default=3.0)
    parser.add_argument("--heal-minutes", type=float, default=3.0)
    parser.add_argument("--heal-steps", type=int, default=100_000,
                        help="step limit of each healing (equal steps compare sources fairly on a shared machine)")
    parser.add_argument("--data", default="teacher,shipped", help="comma-separated healing data sources (above)")
    parser.add_argument("--warm-start", action="store_true", help="also heal with the closed-form warm start")
    parser.add_argument("--models", default="gpt2,llama", help="comma-separated: gpt2, llama")
    parser.add_argument("--logit-weight", type=float, default=0.0,
                        help="also heal with the next-token KL matched at this weight (heal --logit-weight)")
    parser.add_argument("--adam-beta2", type=float, default=None,
                        help="also heal with AdamW's second-moment decay at this value (heal --adam-beta2)")
    parser.add_argument("--output-weight", type=float, default=None,
                        help="also heal with the stack outputs weighed this many times a sublayer entry")
    parser.add_argument("--bf16", action="store_true",
                        help="also heal in mixed precision (heal --precision bf16), from the same pretrained model")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # out_of_source.py beside this file

    from out_of_source import OutOfSource, healing_data

    import normswap
    from normswap.healing.api import heal
    from normswap.healing.rows import TokenisedTexts
    from normswap.healing.teacher_texts import Sampling, sample_texts
    from normswap.healing.texts import load_texts, split_texts

    texts = split_texts(load_texts(None))
    train = TokenisedTexts(texts.train, None, 64, 256)
    configs = decoder_configs()
    variants: list[tuple[str, dict[str, Any]]] = [
        ("per-sublayer", {}), *([("warm start + per-sublayer", {"warm_start": True})] if args.warm_start else []),
        *([(f"per-sublayer + next-token KL {args.logit_weight:g}", {"logit_weight": args.logit_weight})]
          if args.logit_weight else []),
        *([(f"per-sublayer, AdamW beta2 {args.adam_beta2:g}", {"adam_beta2": args.adam_beta2})]
          if args.adam_beta2 is not None else []),
        *([(f"per-sublayer, output weight {args.output_weight:g}", {"output_weight": args.output_weight})]
          if args.output_weight is not None else []),
        *([("per-sublayer, bf16", {"precision": "bf16"})] if args.bf16 else [])]
    rows = []
    for name, config in configs.items():
        if name not in args.models.split(","):
            continue
        torch.manual_seed(0)
        original = transformers.AutoModelForCausalLM.from_config(config)
        steps, loss = pretrain(original, train, args.pretrain_minutes)
        original.eval()
        print(f"{name}: pretrained {steps} steps, loss {loss:.3f}", flush=True)
        for source in args.data.split(","):
            data = healing_data(source)
            if source.startswith("teacher"):  # drawn here, outside the healing budget, so all sources train alike
                _, temperature, length = (source + "::").split(":")[:3]
                sampling = Sampling(**({"temperature": float(temperature)} if temperature else {}),
                                    **({"length": int(length)} if length else {}))
                started = time.monotonic()
                data = sample_texts(original, None, sampling)
                print(f"{name} {source}: sampled {len(data)} texts ({sampling.length} tokens at temperature "
                      f"{sampling.temperature:g}) in {time.monotonic() - started:.0f} s", flush=True)
            for variant, options in variants:
                torch.manual_seed(0)
                student = normswap.convert(original, placement="post")
                outside = OutOfSource(original, student, None)
                unhealed = outside.measure()["next_token_kl"]
                _, report = heal(original, student, data, max_steps=args.heal_steps, max_time=args.heal_minutes * 60,
                                 batch_size=16, learning_rate=5e-4, eval_steps=100, quiet=True, **options)
                healed = outside.measure()["next_token_kl"]
                before, after = report.before["next_token_kl"], report.after["next_token_kl"]
                rows.append((name, f"{variant}, {source}", steps, before, after, unhealed, healed, report.steps))
                print(f"{name} {variant}, {source}: in corpus KL {before:.4f} -> {after:.4f} ({after / before:.1%}); "
                      f"out of source {unhealed:.4f} -> {healed:.4f} ({healed / unhealed:.1%}) in {report.steps} "
                      f"heal steps, {report.seconds:.0f} s", flush=True)
    print(f"\n{'model':6} {'healing, data':36} {'pretrain':>8} {'in: before':>10} {'after':>7} {'ratio':>6} "
          f"{'out: before':>11} {'after':>7} {'ratio':>6} {'steps':>6}")
    for name, label, steps, before, after, unhealed, healed, heal_steps in rows:
        print(f"{name:6} {label:36} {steps:8d} {before:10.4f} {after:7.4f} {after / before:6.1%} {unhealed:11.4f} "
              f"{healed:7.4f} {healed / unhealed:6.1%} {heal_steps:6d}")
    print("in: held-out texts of the healing data; out: benchmarks/data/general_prose.txt; target: healed KL <= 5% "
          "of the unhealed out of source, with no --data")


if __name__ == "__main__":
    main()
