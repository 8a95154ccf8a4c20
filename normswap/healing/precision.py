"""Mixed precision for healing: bfloat16 arithmetic over float32 weights.

A healing step is two forward passes (teacher and student) and one backward; in bfloat16 their matrix products
run on the GPU's tensor cores and on a CPU's AMX or AVX-512 BF16 units (1.25x the steps on MiniLM and 2 Sapphire
Rapids cores, ``benchmarks/README.md``). The weights, the gradients' accumulation and AdamW's state stay float32, so
the small updates late in healing are not rounded away, and the saved checkpoint keeps its dtype.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import NormswapError

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision the device training will run on (``training_device``) cannot compute in, before anything
    is trained."""
    if precision not in PRECISIONS:
        raise NormswapError(f"precision={precision!r}: choose 'fp32' or 'bf16'")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise NormswapError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16 arithmetic "
                            "(it needs compute capability 8.0 or newer); heal with --precision fp32")


def training_device(use_cpu: bool) -> torch.device:
    """Where the Trainer trains: the GPU when there is one, unless told to use the CPU (``distributed.use_cpu``)."""
    return torch.device("cuda" if torch.cuda.is_available() and not use_cpu else "cpu")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context the Trainer's steps run in, for work timed or done outside the Trainer."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
