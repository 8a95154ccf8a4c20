"""Norm kinds are told apart by what a module computes, never by its class name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normswap.detect.norms import classify_norm


class LayerNorm(nn.Module):
    """Named like a LayerNorm, but computes an RMSNorm: detection must say rmsnorm."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class OffsetRMSNorm(nn.Module):
    """Gemma-style ``(1 + w)``, with eps stored under a name detection does not know."""

    def __init__(self, dim: int, epsilon_value: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(dim))
        self.epsilon_value = epsilon_value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.epsilon_value)
        return (normed * (1.0 + self.scale.float())).type_as(x)


class CentredNoBias(nn.Module):
    """Cohere-style: mean-centred, weight but no bias."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(-1, keepdim=True)
        return self.weight * centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


class UnitNormalize(nn.Module):
    """L2 normalisation is scale invariant but its output does not have unit RMS: not a norm layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, dim=-1)


class Doubler(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.weight * x


@pytest.mark.parametrize(
    ("module", "kind", "eps"),
    [
        (nn.LayerNorm(32, eps=1e-12), "layernorm", 1e-12),
        (nn.LayerNorm(32, bias=False), "layernorm-nobias", 1e-5),
        (nn.LayerNorm(32, elementwise_affine=False), "layernorm-noaffine", 1e-5),
        (LayerNorm(32, eps=1e-6), "rmsnorm", 1e-6),
        (CentredNoBias(32), "layernorm-nobias", 1e-5),
        (nn.RMSNorm(32, eps=1e-5), "rmsnorm", 1e-5),
        (nn.Identity(), "identity", None),
    ],
)
def test_kind_and_eps(module: nn.Module, kind: str, eps: float | None) -> None:
    info = classify_norm(module, hidden_size=32)
    assert info is not None
    assert info.kind == kind
    assert info.dim == 32
    if eps is None:
        assert info.eps is None
    else:
        assert info.eps == pytest.approx(eps)


def test_offset_weight_and_measured_eps() -> None:
    info = classify_norm(OffsetRMSNorm(48, epsilon_value=1e-3), hidden_size=48)
    assert info is not None and info.kind == "rmsnorm-offset"
    # eps is not under a known attribute name, so it is measured in float64
    assert info.eps == pytest.approx(1e-3, rel=1e-3)


def test_meta_device_modules_are_probed_on_a_cpu_copy() -> None:
    with torch.device("meta"):
        module = nn.LayerNorm(8192, eps=1e-5)
    info = classify_norm(module, hidden_size=8192)
    assert info is not None and info.kind == "layernorm" and info.dim == 8192
    assert module.weight.is_meta  # the original is untouched


@pytest.mark.parametrize("module", [nn.GELU(), nn.Linear(32, 32), nn.Dropout(0.1), UnitNormalize(), Doubler(32),
                                    nn.Softmax(dim=-1)])
def test_non_norms_are_rejected(module: nn.Module) -> None:
    assert classify_norm(module, hidden_size=32) is None
