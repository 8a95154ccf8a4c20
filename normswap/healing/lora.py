"""``heal(..., lora_rank=R)``: train PEFT LoRA adapters on the student's branch projections instead of every
weight, then merge them, so the healed student is an ordinary model of the converted one's class.

The projections are the linear maps inside each attention and MLP branch, read off the student's detected
topology (the one ``taps.correspond`` pairs), never from family-specific module names. Besides the adapters, the
residual-stream norms' weights and biases train (those normswap moved, folded or added, or the stand-ins it put
in their places: two vectors per norm), and so do the wrapped projections' biases, where the folds of
LayerNorm shifts land (one vector per projection): the conversion changed exactly these, and they cost almost
nothing to train. Everything else (embeddings, heads, the projections' base weights) stays frozen.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..conversion.norm_kind import linear_calls, linear_layout
from ..errors import NormswapError
from .taps import INPUT, Correspondence

LEARNING_RATE = 3e-3  # the default with LoRA: best of 3e-4, 1e-3, 3e-3 on MiniLM and both decoders (benchmarks)
PEFT_MISSING = "--lora-rank needs peft, which is not installed: pip install 'normswap[heal]'"


def require_peft() -> None:
    """Refuse ``--lora-rank`` before anything is loaded when peft is missing."""
    try:
        importlib.import_module("peft")
    except ImportError:
        raise NormswapError(PEFT_MISSING) from None


def check_rank(rank: int | None) -> None:
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise NormswapError(f"lora_rank={rank!r}: give a positive whole number (e.g. 8), or None to train every weight")


@dataclass(frozen=True)
class LoraAdapters:
    """Adapters attached to ``student`` in place; ``merge`` folds them into the base weights and removes them."""

    tuner: Any  # peft's LoraModel around the student
    student: nn.Module
    projections: tuple[str, ...]  # the wrapped linear maps
    norms: tuple[str, ...]  # the norm (or stand-in) modules whose parameters train in full
    trainable_before: dict[str, bool]  # each parameter's requires_grad before, restored after the merge
    rank: int
    trainable: int  # parameters that train: adapters, norms, biases
    parameters: int  # the student's own parameters, adapters not counted

    def describe(self) -> dict[str, Any]:
        """For the report: what was wrapped and how much trained."""
        return {"rank": self.rank, "projections": list(self.projections), "norms": list(self.norms),
                "trainable_parameters": self.trainable, "parameters": self.parameters}

    def merge(self) -> nn.Module:
        """Fold every adapter into its projection's weight and put the plain projection back."""
        self.tuner.merge_and_unload()
        if "peft_config" in vars(self.student):
            del self.student.peft_config  # PEFT's note on the model; the merged student is no PEFT model
        for name, parameter in self.student.named_parameters():
            parameter.requires_grad_(self.trainable_before.get(name, True))
        from peft.tuners.tuners_utils import BaseTunerLayer

        left = [path for path, module in self.student.named_modules() if isinstance(module, BaseTunerLayer)]
        if left:
            raise NormswapError(f"merging the LoRA adapters left {left[0]} wrapped; heal without --lora-rank")
        return self.student


def attach(student: nn.Module, correspondence: Correspondence, rank: int, *, train_embeddings: bool = False,
           train_norms: bool = True, train_biases: bool = True) -> LoraAdapters:
    """Wrap the student's branch projections in rank-``rank`` LoRA adapters (alpha = 2 × rank, no dropout, B
    starting at zero so the student starts unchanged), freeze everything else but the norms and the projections'
    biases (and the embeddings with ``train_embeddings``)."""
    check_rank(rank)
    require_peft()
    from peft import LoraConfig, LoraModel

    projections = branch_projections(student, correspondence)
    if not projections:
        raise NormswapError("--lora-rank: this model's branches call no linear map that PEFT can wrap (nn.Linear or "
                            "Conv1D); heal all weights (leave out --lora-rank)")
    layouts = {linear_layout(student.get_submodule(path)) for path in projections}
    norms = stream_norms(student, correspondence)
    before = {name: parameter.requires_grad for name, parameter in student.named_parameters()}
    parameters = sum(parameter.numel() for parameter in student.parameters())
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(projections),
                        bias="lora_only" if train_biases else "none", fan_in_fan_out=layouts == {"in_out"})
    try:
        tuner = LoraModel(student, config, "default")
    except (ValueError, TypeError, RuntimeError) as error:
        raise NormswapError(f"--lora-rank: PEFT cannot wrap this model's branch projections ({error}); heal all "
                            "weights (leave out --lora-rank)") from None
    for path in norms if train_norms else ():
        student.get_submodule(path).requires_grad_(True)
    if train_embeddings:
        for module in student.modules():
            if isinstance(module, nn.Embedding):
                module.requires_grad_(True)
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    return LoraAdapters(tuner, student, projections, norms, before, rank, trainable, parameters)


def branch_projections(student: nn.Module, correspondence: Correspondence) -> tuple[str, ...]:
    """The linear maps (nn.Linear, Conv1D) that the student's branches call, in call order, each once. Fused
    expert tensors are not linear modules PEFT wraps: they stay frozen."""
    topology = correspondence.topology
    if topology is None:
        return ()
    modules = [module for layer in topology.layers for sub in layer.sublayers for branch in sub.branches
               for module in branch.modules]
    calls, _ = linear_calls(student, ())
    inside = [path for path in calls if any(path == m or path.startswith(m + ".") for m in modules)]
    return tuple(path for path in dict.fromkeys(inside) if linear_layout(student.get_submodule(path)))


def stream_norms(student: nn.Module, correspondence: Correspondence) -> tuple[str, ...]:
    """The residual-stream norms the student has (embedding, per-branch, final), and the modules normswap put
    where a removed norm was (the norm-free stand-ins, which are the correspondence's entries there)."""
    topology = correspondence.topology
    paths = [norm.path for norm in topology.all_norms] if topology is not None else []
    paths += [entry.student for entry in correspondence.entries if not entry.student.endswith(INPUT)]
    return tuple(path for path in dict.fromkeys(paths) if any(True for _ in _parameters(student, path)))


def _parameters(student: nn.Module, path: str) -> Any:
    try:
        return student.get_submodule(path).parameters()
    except AttributeError:
        return iter(())


def require_matching_checkpoint(checkpoint: str | None, rank: int | None) -> None:
    """A Trainer checkpoint holds the student's tensors as it trained: LoRA runs' hold adapters, full runs'
    plain weights. Resuming one kind as the other would load nothing into the model, so it is refused."""
    if checkpoint is None:
        return
    weights = Path(checkpoint) / "model.safetensors"
    if not weights.is_file():
        return
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as opened:
        ranks = {opened.get_slice(key).get_shape()[0] for key in opened.keys()  # noqa: SIM118
                 if ".lora_A." in key}  # safe_open is not iterable
    if ranks and rank is None:
        raise NormswapError(f"{checkpoint} holds LoRA adapters of rank {min(ranks)}; resume it with "
                            f"--lora-rank {min(ranks)}")
    if not ranks and rank is not None:
        raise NormswapError(f"{checkpoint} is from healing every weight, not LoRA adapters; resume it without "
                            "--lora-rank")
    if ranks and rank not in ranks:
        raise NormswapError(f"{checkpoint} holds LoRA adapters of rank {min(ranks)}, not {rank}; resume it with "
                            f"--lora-rank {min(ranks)}")
