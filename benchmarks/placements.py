"""Placement changes with calibrated stand-ins against the naive start, and what healing makes of them.

For tiny Gemma 2 (sandwich, offset RMSNorm), OLMo 2 (post-sublayer), GLM-4 (sandwich) and Llama (pre)
models, each pretrained for a few minutes on the built-in corpus (byte-level tokens, as heal_decoder.py
does): every placement change from it, started once with calibrated scales (docs/design.md §9: a removed
norm becomes its stand-in g * x / s, an added norm starts at weight s; §3: before Pre -> Post each pre norm takes
weight s, so the moved norm keeps the stream's size) and once with unit scales (s = 1: a removed norm keeps its
weight but drops its statistic, an added norm starts at weight 1, a moved norm makes the stream's size 1 as the
plain norm shift does; for Pre -> Post the calibrated start is `--keep-stream-size`). Both are measured
zero-shot on held-out text: output cosine of the last hidden states and next-token KL(original || converted).
Then sandwich -> pre and post-sublayer -> pre are healed for --heal-minutes each, and --norm none on the
GPT-2-style decoder for --none-heal-minutes (with --none-stages, also a fresh conversion healed in those stages,
``heal --stages``, in the same time).

Targets (issue 18): calibrated KL < naive KL on every pair; healed KL <= 10% of unhealed for sandwich -> pre
and post-sublayer -> pre.

    python benchmarks/placements.py [--pretrain-minutes 2] [--heal-minutes 2] [--none-heal-minutes 10]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heal_decoder import pretrain

_SHAPE = {"vocab_size": 256, "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4,
          "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 64,
          "tie_word_embeddings": False}
MODELS = {
    "gemma2": (transformers.Gemma2Config, {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 64}),
    "olmo2": (transformers.Olmo2Config, {}),
    "glm4": (transformers.Glm4Config, {"head_dim": 32, "pad_token_id": 0}),
    "llama": (transformers.LlamaConfig, {}),
}
TARGETS = ("pre", "post", "sandwich", "post-sublayer")
HEALED = {("gemma2", "pre"), ("glm4", "pre"), ("olmo2", "pre")}


@torch.no_grad()
def drift(original: torch.nn.Module, converted: torch.nn.Module, batch: dict[str, torch.Tensor]
          ) -> tuple[float, float]:
    """(output cosine of the last hidden states, next-token KL(original || converted)) over real tokens."""
    first = original(**batch, output_hidden_states=True)
    second = converted(**batch, output_hidden_states=True)
    keep = batch["attention_mask"].bool()
    a, b = first.hidden_states[-1][keep].double(), second.hidden_states[-1][keep].double()
    cosine = float(F.cosine_similarity(a, b, dim=-1).mean())
    log_p = F.log_softmax(first.logits[keep].double(), -1)
    log_q = F.log_softmax(second.logits[keep].double(), -1)
    return cosine, float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain-minutes", type=float, default=2.0)
    parser.add_argument("--heal-minutes", type=float, default=2.0)
    parser.add_argument("--none-heal-minutes", type=float, default=10.0)
    parser.add_argument("--models", default=",".join(MODELS), help="the placement models ('' for none)")
    parser.add_argument("--none-stages", default="",
                        help="also heal a fresh --norm none conversion in these stages (heal --stages), in the same "
                        "time, for example mlp,attention,final")
    parser.add_argument("--heal-learning-rate", type=float, default=5e-4,
                        help="AdamW's peak rate for the placement heals (the norm-free heal keeps 5e-4)")
    parser.add_argument("--heal-batch-size", type=int, default=16, help="texts per step of the placement heals")
    parser.add_argument("--heal-logit-weight", type=float, default=0.0,
                        help="the placement heals also match the next-token distributions, with this weight")
    parser.add_argument("--heal-output-weight", type=float, default=None,
                        help="weigh the stack outputs this many times a sublayer entry (heal's output_weight)")
    parser.add_argument("--heal-precision", choices=("fp32", "bf16"), default="fp32",
                        help="the arithmetic of every heal here (heal --precision)")
    args = parser.parse_args()

    import normswap
    from normswap.healing.api import heal
    from normswap.healing.rows import TokenisedTexts
    from normswap.healing.stages import heal_in_stages
    from normswap.healing.texts import load_texts, split_texts

    corpus = load_texts(None)  # the shipped healing corpus; healing gets it explicitly (no teacher sampling)
    texts = split_texts(corpus)
    train = TokenisedTexts(texts.train, None, 64, 256)
    held = TokenisedTexts(texts.held_out, None, 64, 256)
    batch = {"input_ids": held.input_ids[:32], "attention_mask": held.attention_mask[:32]}
    calibration = {"input_ids": train.input_ids[:16], "attention_mask": train.attention_mask[:16]}
    rows, healed = [], []
    for name in filter(None, args.models.split(",")):
        config_class, extra = MODELS[name]
        torch.manual_seed(0)
        original = transformers.AutoModelForCausalLM.from_config(config_class(**_SHAPE, **extra))
        steps, loss = pretrain(original, train, args.pretrain_minutes)
        original.eval()
        source = normswap.inspect(original).placement
        print(f"{name} ({source}): pretrained {steps} steps, loss {loss:.3f}", flush=True)
        for target in TARGETS:
            if target == source:
                continue
            try:
                # Pre -> Post: the calibrated start keeps the stream's size (--keep-stream-size); unit: the plain shift
                keep = source == "pre" and target == "post"
                measured = normswap.convert(original, target, inputs=calibration, keep_stream_size=keep)
                naive = normswap.convert(original, target, inputs=calibration, calibrate=False)
            except normswap.NormswapError as error:
                print(f"  -> {target}: refused: {error}", flush=True)
                continue
            (cos_m, kl_m), (cos_n, kl_n) = drift(original, measured, batch), drift(original, naive, batch)
            rows.append((name, source, target, cos_m, kl_m, cos_n, kl_n))
            print(f"  -> {target}: calibrated cos {cos_m:.4f} KL {kl_m:.4f}; unit cos {cos_n:.4f} KL {kl_n:.4f}",
                  flush=True)
            if (name, target) in HEALED:
                _, report = heal(original, measured, corpus, max_steps=100_000, max_time=args.heal_minutes * 60,
                                 batch_size=args.heal_batch_size, learning_rate=args.heal_learning_rate,
                                 logit_weight=args.heal_logit_weight, eval_steps=100, quiet=True,
                                 precision=args.heal_precision,
                                 **({} if args.heal_output_weight is None else
                                    {"output_weight": args.heal_output_weight}))
                before, after = report.before["next_token_kl"], report.after["next_token_kl"]
                healed.append((f"{name} {source} -> {target}", before, after, report.steps))
                print(f"     healed {report.steps} steps: KL {before:.4f} -> {after:.4f} ({after / before:.1%})",
                      flush=True)
    if args.none_heal_minutes > 0:
        torch.manual_seed(0)
        gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=128,
                                                                    n_layer=4, n_head=4))
        steps, _ = pretrain(gpt2, train, args.pretrain_minutes)
        gpt2.eval()
        free = normswap.convert(gpt2, norm="none", inputs=calibration)
        _, report = heal(gpt2, free, corpus, max_steps=1_000_000, max_time=args.none_heal_minutes * 60, batch_size=16,
                         learning_rate=5e-4, eval_steps=200, quiet=True, precision=args.heal_precision)
        before, after = report.before["next_token_kl"], report.after["next_token_kl"]
        healed.append(("gpt2 --norm none", before, after, report.steps))
        print(f"gpt2 --norm none healed {report.steps} steps: KL {before:.4f} -> {after:.4f}", flush=True)
        if args.none_stages:
            stages = [tuple(stage.split("+")) for stage in args.none_stages.split(",")]
            free = normswap.convert(gpt2, norm="none", inputs=calibration)
            _, report = heal_in_stages(gpt2, free, stages, corpus, max_steps=1_000_000,
                                       max_time=args.none_heal_minutes * 60, batch_size=16, learning_rate=5e-4,
                                       eval_steps=200, quiet=True, precision=args.heal_precision)
            before, after = report.before["next_token_kl"], report.after["next_token_kl"]
            healed.append((f"gpt2 --norm none, stages {args.none_stages}", before, after, report.steps))
            print(f"gpt2 --norm none in stages healed {report.steps} steps: KL {before:.4f} -> {after:.4f}; "
                  + "; ".join(f"{'+'.join(stage['groups'])}: {stage['before']['next_token_kl']:.4f} -> "
                              f"{stage['after']['next_token_kl']:.4f} ({stage['steps']} steps)"
                              for stage in report.stages), flush=True)

    print(f"\n{'model':8} {'from':14} {'to':14} {'cos calib':>9} {'KL calib':>9} {'cos unit':>9} {'KL unit':>9} "
          f"{'calib < unit':>12}")
    for name, source, target, cos_m, kl_m, cos_n, kl_n in rows:
        verdict = "n/a" if kl_m == kl_n else "yes" if kl_m < kl_n else "NO"  # n/a: no calibrated step on the way
        print(f"{name:8} {source:14} {target:14} {cos_m:9.4f} {kl_m:9.4f} {cos_n:9.4f} {kl_n:9.4f} {verdict:>12}")
    print(f"\n{'healed':50} {'KL before':>10} {'KL after':>9} {'after/before':>13} {'steps':>7}")
    for label, before, after, steps in healed:
        print(f"{label:50} {before:10.4f} {after:9.4f} {after / before:13.1%} {steps:7d}")
    print("targets: calibrated KL < unit KL on every pair; healed KL <= 10% of unhealed for sandwich -> pre and "
          "post-sublayer -> pre")


if __name__ == "__main__":
    main()
