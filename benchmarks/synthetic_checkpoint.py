"""Write a Llama-shaped checkpoint of random weights, of any size, without holding it in memory.

Structure is all that matters for conversion speed and memory: the tensors are written one at a
time through normswap's own shard writer. Used by ``convert_large.py`` and by the interrupt test.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from normswap.io.shard_writer import PlannedTensor, ShardWriter, parse_size


def llama_config(hidden: int, intermediate: int, layers: int, vocab: int, dtype: torch.dtype) -> LlamaConfig:
    heads = max(1, hidden // 128)
    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                       tie_word_embeddings=False, head_dim=hidden // heads, dtype=str(dtype).removeprefix("torch."),
                       architectures=["LlamaForCausalLM"])


def write_llama_checkpoint(folder: Path, hidden: int, intermediate: int, layers: int, vocab: int = 32000,
                           dtype: torch.dtype = torch.bfloat16, shard_size: str = "2GB", seed: int = 0) -> int:
    """Write config.json and sharded safetensors into ``folder``; returns the bytes of weights."""
    config = llama_config(hidden, intermediate, layers, vocab, dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    planned = [PlannedTensor(key, dtype, shape) for key, shape in shapes.items()]
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    generator = torch.Generator().manual_seed(seed)
    with ShardWriter(folder, planned, parse_size(shard_size)) as writer:
        for tensor in planned:
            if tensor.name.endswith("norm.weight"):
                value = 1.0 + 0.1 * torch.randn(tensor.shape, generator=generator)
            else:
                value = 0.02 * torch.randn(tensor.shape, generator=generator)
            writer.write(tensor.name, value.to(dtype))
        writer.close()
    return sum(t.nbytes for t in planned)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--hidden", type=int, default=2560)
    parser.add_argument("--intermediate", type=int, default=6912)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--shard-size", default="2GB")
    args = parser.parse_args()
    size = write_llama_checkpoint(args.folder, args.hidden, args.intermediate, args.layers,
                                  shard_size=args.shard_size)
    print(f"wrote {size / 1e9:.2f} GB to {args.folder}")


if __name__ == "__main__":
    main()
