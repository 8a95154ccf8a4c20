"""Which ``hidden_size`` reads of a constructor are an inner width (``conversion/inner_width.py``), decided by
building: the choice whose tensor has the shape the map makes, and none where no choice gives it."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from normswap.codegen.edits import SizeByInnerWidth
from normswap.codegen.rewrite import apply_edits, config_width_reads
from normswap.conversion.inner_width import inner_width_edits

SOURCE = '''
class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.q_norm = Norm(config.hidden_size, eps=config.eps)
'''


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.o_proj = nn.Linear(4, 4, bias=False)
        self.q_norm = nn.LayerNorm(4)


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = Attention()


def _built(edits: Sequence[SizeByInnerWidth]) -> dict[str, tuple[int, ...]]:
    """What the wider code builds (d = 4): each read left as hidden_size is 5, each replaced one 4."""
    kept = {(edit.attribute, index) for edit in edits for index in edit.occurrences}
    width = {read: 4 if read in kept else 5 for read in [("o_proj", 0), ("o_proj", 1), ("q_norm", 0)]}
    return {"self_attn.o_proj.weight": (width["o_proj", 1], width["o_proj", 0]),
            "self_attn.q_norm.weight": (width["q_norm", 0],)}


def test_the_reads_are_counted_and_only_the_chosen_one_is_rewritten() -> None:
    assert config_width_reads(SOURCE, "Attention", "o_proj") == 2
    assert config_width_reads(SOURCE, "Attention", "q_norm") == 1
    rewritten = apply_edits(SOURCE, [SizeByInnerWidth("Attention", "o_proj", (0,))])
    assert "nn.Linear(config.normswap_inner_width, config.hidden_size, bias=False)" in rewritten
    assert "Norm(config.hidden_size, eps=config.eps)" in rewritten


def test_the_choice_that_builds_the_mapped_shape_is_kept() -> None:
    wanted = {"self_attn.o_proj.weight": (5, 4), "self_attn.q_norm.weight": (4,)}  # output on the stream
    edits = inner_width_edits(Layer(), SOURCE, wanted, _built)
    assert edits == (SizeByInnerWidth("Attention", "o_proj", (0,)), SizeByInnerWidth("Attention", "q_norm", (0,)))


def test_no_choice_is_none() -> None:
    assert inner_width_edits(Layer(), SOURCE, {"self_attn.o_proj.weight": (3, 3)}, _built) is None
