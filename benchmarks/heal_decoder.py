"""Heal decoders after Pre -> Post conversion: next-token KL to the original, before and after.

For a tiny GPT-2-style and a tiny Llama-style model: pretrain for a few minutes on the training split of
the built-in corpus (byte-level tokens), so the weights are not random; convert Pre -> Post (generated
code, norm-shift mapping); heal; report next-token KL(original || converted) on held-out text before and
after, for per-sublayer distillation with and without the closed-form warm start. Target: healed KL <= 10%
of the unhealed KL.

    python benchmarks/heal_decoder.py [--pretrain-minutes 3] [--heal-minutes 3]
"""

from __future__ import annotations

import argparse
import time

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
    args = parser.parse_args()

    import normswap
    from normswap.healing.api import heal
    from normswap.healing.rows import TokenisedTexts
    from normswap.healing.texts import load_texts, split_texts

    texts = split_texts(load_texts(None))
    train = TokenisedTexts(texts.train, None, 64, 256)
    configs = decoder_configs()
    rows = []
    for name, config in configs.items():
        torch.manual_seed(0)
        original = transformers.AutoModelForCausalLM.from_config(config)
        steps, loss = pretrain(original, train, args.pretrain_minutes)
        original.eval()
        print(f"{name}: pretrained {steps} steps, loss {loss:.3f}", flush=True)
        for variant, warm_start in (("per-sublayer", False), ("warm start + per-sublayer", True)):
            student = normswap.convert(original, placement="post")
            _, report = heal(original, student, max_steps=100_000, max_time=args.heal_minutes * 60,
                             batch_size=16, learning_rate=5e-4, eval_steps=100, quiet=True, warm_start=warm_start)
            before, after = report.before["next_token_kl"], report.after["next_token_kl"]
            rows.append((name, variant, steps, before, after, report.steps))
            print(f"{name} {variant}: KL {before:.4f} -> {after:.4f} ({after / before:.1%}) in {report.steps} heal "
                  f"steps, {report.seconds:.0f} s", flush=True)
    print(f"\n{'model':8} {'healing':26} {'pretrain':>9} {'KL before':>10} {'KL after':>9} {'after/before':>13} "
          f"{'heal steps':>11}")
    for name, variant, steps, before, after, heal_steps in rows:
        print(f"{name:8} {variant:26} {steps:9d} {before:10.4f} {after:9.4f} {after / before:13.1%} {heal_steps:11d}")
    print("target: healed KL <= 10% of the unhealed KL")


if __name__ == "__main__":
    main()
