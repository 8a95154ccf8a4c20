"""Checks that need a GPU, in one short run: norm kernel speed in bf16, conversion of bf16 models on CUDA.

1. Norm kernels: ``F.layer_norm`` against ``F.rms_norm`` plus the bias add (what an exact LayerNorm -> RMSNorm
   conversion runs), alone and inside a GPT-2-shaped model converted by ``normswap.convert(norm="rmsnorm")``,
   timed side by side (median of interleaved pairs, CUDA synchronised).
2. bf16 on CUDA: a perturbed GPT-2 in bf16 is converted on CUDA and on CPU. The two must give the same tensors
   (the arithmetic runs in fp32/fp64 on either device, then rounds once), and the converted model's outputs must
   stay within bf16 rounding of the original's. A Llama in bf16 on CUDA is converted Pre -> Post and must
   ``generate()``.
3. Issue 17's new reach on CUDA: a perturbed T5 in bf16 converted exactly to LayerNorm (one extra dimension, the
   head's input scale folded) must pass its own bf16 exactness check and give the original's greedy tokens; a
   SegFormer (stages of several widths) converted exactly to RMSNorm in fp32 on CUDA must be exact.

Run: ``python benchmarks/gpu_checks.py [--device cuda]``; it exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F  # noqa: N812
from timing import median_ratio

import normswap


def _perturbed_gpt2(width: int, layers: int, vocab: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=width, n_layer=layers, n_head=max(1, width // 64), vocab_size=vocab, n_positions=1024,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # norm weights start at 1 and biases at 0: move them all
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model


def norm_speed(device: torch.device, repeats: int) -> None:
    synchronise = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for shape in ((4, 256, 512), (8, 2048, 4096)):
        width = shape[-1]
        x = torch.randn(shape, device=device, dtype=dtype)
        weight, bias = torch.randn(width, device=device, dtype=dtype), torch.randn(width, device=device, dtype=dtype)
        base, cand, ratio = median_ratio(lambda: F.layer_norm(x, (width,), weight, bias, 1e-5),  # noqa: B023
                                          lambda: F.rms_norm(x, (width,), weight, 1e-5) + bias,  # noqa: B023
                                          repeats * 5, synchronise, warmup=5)
        print(f"norm {tuple(shape)} {dtype}: layer_norm {base * 1e6:.1f} us, rms_norm + bias {cand * 1e6:.1f} us, "
              f"ratio {ratio:.3f}")
    model = _perturbed_gpt2(1024, 12, 32000).to(device, dtype)
    converted = normswap.convert(model, norm="rmsnorm").eval()
    ids = torch.randint(0, 32000, (8, 512), device=device)

    def forward(m: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                m(input_ids=ids)
        return run

    base, cand, ratio = median_ratio(forward(model), forward(converted), repeats, synchronise, warmup=5)
    print(f"GPT-2 1024x12 {dtype}, batch 8x512, forward: LayerNorm {base * 1e3:.2f} ms, "
          f"RMSNorm (converted) {cand * 1e3:.2f} ms, ratio {ratio:.3f}")


def bf16_conversion(device: torch.device) -> bool:
    """Same tensors from CUDA and CPU conversion; outputs within bf16 rounding; Pre -> Post Llama generates."""
    fp32 = _perturbed_gpt2(256, 4, 1000)
    with torch.no_grad():
        for name, parameter in fp32.named_parameters():
            if "ln" in name:  # norms far from their init values, where folding bugs show
                parameter.add_(torch.randn_like(parameter) * 0.3)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    on_cpu = normswap.convert(copy.deepcopy(bf16), norm="rmsnorm")
    on_device = normswap.convert(copy.deepcopy(bf16).to(device), norm="rmsnorm")
    cpu_state, device_state = on_cpu.state_dict(), on_device.state_dict()
    differing = [key for key in cpu_state if not torch.equal(cpu_state[key], device_state[key].cpu())]
    largest = max((float((cpu_state[k].float() - device_state[k].cpu().float()).abs().max()) for k in differing),
                  default=0.0)
    print(f"bf16 GPT-2 -> RMSNorm on {device.type} and on cpu: {len(cpu_state) - len(differing)}/{len(cpu_state)} "
          f"tensors bit-identical, largest difference {largest:.3g}"
          + (f" (first: {differing[:3]})" if differing else ""))
    ok = not differing

    ids = torch.randint(0, 1000, (4, 64))
    with torch.no_grad():
        reference = fp32(input_ids=ids).logits
        original = bf16.to(device)(input_ids=ids.to(device)).logits.float().cpu()
        converted = on_device(input_ids=ids.to(device)).logits.float().cpu()
    noise = float((original - reference).abs().max())
    drift = float((converted - original).abs().max())
    within = drift <= 3 * noise
    print(f"bf16 on {device.type}: converted vs bf16 original max |logit diff| {drift:.4f}; bf16 original vs fp32 "
          f"{noise:.4f}; within 3x bf16 rounding: {within}")
    ok = ok and within

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=1000))
    llama = llama.to(device, torch.bfloat16).eval()
    post = normswap.convert(llama, placement="post")
    prompt = torch.randint(0, 1000, (2, 8), device=device)
    generated = post.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                              do_sample=False, pad_token_id=0)
    parameter = next(post.parameters())
    generates = tuple(generated.shape) == (2, 16) and parameter.device.type == device.type
    print(f"bf16 Llama Pre -> Post on {device.type}: parameters {parameter.dtype} on {parameter.device}, "
          f"generate() gave {tuple(generated.shape)}")
    return ok and generates


def _perturbed(model: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * scale)
    return model.eval()


def new_reach(device: torch.device) -> bool:
    """The T5 family's exact RMSNorm -> LayerNorm in bf16, and a SegFormer's exact LayerNorm -> RMSNorm, on CUDA."""
    from transformers import SegformerConfig, SegformerModel, T5Config, T5ForConditionalGeneration

    t5 = _perturbed(T5ForConditionalGeneration(T5Config(d_model=256, d_kv=32, num_layers=4, num_heads=8, d_ff=512,
                                                        vocab_size=1000, decoder_start_token_id=0)), 0.05)
    results = []
    for dtype in (torch.float32, torch.bfloat16):  # bf16: within its own rounding; fp32: the same greedy tokens
        model = copy.deepcopy(t5).to(device, dtype).eval()
        converted = normswap.convert(model, norm="layernorm", exact=True, untie=True)
        report = converted.normswap_report
        ids = torch.randint(1, 1000, (2, 16), device=device)
        with torch.no_grad():
            tokens = [m.generate(input_ids=ids, max_new_tokens=8, do_sample=False) for m in (model, converted)]
        same = torch.equal(*tokens)
        print(f"{dtype} T5 -> LayerNorm exact on {device.type}: {report.relative:.2e} x max|reference| (bound "
              f"{report.tolerance:.1e}, exact: {report.exact}); greedy tokens identical: {same}")
        results.append(report.exact and (same or dtype != torch.float32))
    config = SegformerConfig(num_encoder_blocks=2, depths=[2, 2], sr_ratios=[2, 1], hidden_sizes=[64, 128],
                             patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
                             image_size=64)
    segformer = _perturbed(SegformerModel(config)).to(device)
    rms = normswap.convert(segformer, norm="rmsnorm").normswap_report
    print(f"fp32 SegFormer (2 stages, widths 64, 128) -> RMSNorm exact on {device.type}: {rms.relative:.2e} x "
          f"max|reference| (exact: {rms.exact})")
    return bool(all(results) and rms.exact)


def stop28_reach(device: torch.device) -> bool:
    """On the device: the exact LayerNorm map of a model without a head (its projection back to d), of code that
    sizes an inner width by hidden_size (Helium), in fp32 and bf16; BLOOM to post (a tuple item normalised)."""
    from transformers import BloomConfig, BloomForCausalLM, HeliumConfig, HeliumForCausalLM, Qwen3Config, Qwen3Model

    sizes = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
             "num_key_value_heads": 4, "head_dim": 32, "vocab_size": 1000}
    results = []
    for name, model in (("Qwen3Model (no head)", _perturbed(Qwen3Model(Qwen3Config(**sizes)), 0.05)),
                        ("Helium", _perturbed(HeliumForCausalLM(HeliumConfig(**sizes, tie_word_embeddings=False)),
                                              0.05))):
        for dtype in (torch.float32, torch.bfloat16):
            on_device = copy.deepcopy(model).to(device, dtype)
            report = normswap.convert(on_device, norm="layernorm", exact=True).normswap_report
            print(f"{dtype} {name} -> LayerNorm exact on {device.type}: {report.relative:.2e} x max|reference| "
                  f"(bound {report.tolerance:.1e}, exact: {report.exact})")
            results.append(report.exact)
    bloom = _perturbed(BloomForCausalLM(BloomConfig(hidden_size=256, n_layer=4, n_head=8, vocab_size=1000)))
    bloom = bloom.to(device)
    post = normswap.convert(bloom, placement="post")
    ids = torch.randint(1, 1000, (2, 12), device=device)
    with torch.no_grad():
        cached, uncached = (post.generate(ids, max_new_tokens=6, do_sample=False, use_cache=flag)
                            for flag in (True, False))
    same = torch.equal(cached, uncached)
    placement = normswap.inspect(post).placement
    print(f"fp32 BLOOM -> post on {device.type}: inspects as {placement}; generate() with and without the cache "
          f"gives the same tokens: {same}")
    return bool(all(results) and same and placement == "post")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    norm_speed(device, args.repeats)
    ok = bf16_conversion(device)
    ok = new_reach(device) and ok
    ok = stop28_reach(device) and ok
    print("all checks passed" if ok else "A CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
