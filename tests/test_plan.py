"""The norm-shift mapping on hand-built topologies: entry k of one layout goes to entry k of the other."""

from __future__ import annotations

import pytest
import torch

from normswap.conversion.plan import PlanError, build_placement_plan
from normswap.conversion.program import evaluate, shapes_of
from normswap.conversion.weights import placement_program
from normswap.topology import Branch, Layer, NormSite, Stack, Sublayer, Topology


def norm(path: str, slot: str, kind: str = "layernorm") -> NormSite:
    return NormSite(path, slot, kind, 1e-5, 4)  # type: ignore[arg-type]


def sub(kind: str, placement: str, *norms: NormSite) -> Sublayer:
    branches = (Branch("attention", ()), Branch("mlp", ())) if kind == "parallel" else (Branch(kind, ()),)  # type: ignore[arg-type]
    return Sublayer(kind, placement, branches, norms, None)  # type: ignore[arg-type]


def topology(model_type: str, layers: list[list[Sublayer]], embedding: NormSite | None,
             final: NormSite | None) -> Topology:
    return Topology(model_type, "X", (Stack("layers", len(layers), embedding, final),),
                    tuple(Layer(i, "layers", f"layers.{i}", "L", tuple(subs)) for i, subs in enumerate(layers)))


def post_model(with_embedding: bool = True) -> Topology:
    layers = [[sub("attention", "post", norm(f"layers.{i}.a", "post")),
               sub("mlp", "post", norm(f"layers.{i}.m", "post"))] for i in range(2)]
    return topology("post", layers, norm("emb", "embedding") if with_embedding else None, None)


def pre_model(with_embedding: bool = False, kind: str = "layernorm") -> Topology:
    layers = [[sub("attention", "pre", norm(f"layers.{i}.ln1", "pre", kind)),
               sub("mlp", "pre", norm(f"layers.{i}.ln2", "pre", kind))] for i in range(2)]
    return topology("pre", layers, norm("emb_ln", "embedding", kind) if with_embedding else None,
                    norm("final", "final", kind))


def moves(plan: object) -> list[tuple[str | None, str | None]]:
    return [(m.source, m.target) for m in plan.stacks[0].moves]  # type: ignore[attr-defined]


def test_post_to_pre_shifts_every_norm_by_one_slot() -> None:
    plan = build_placement_plan(post_model(), pre_model(), "test")
    assert moves(plan) == [("emb", "layers.0.ln1"), ("layers.0.a", "layers.0.ln2"), ("layers.0.m", "layers.1.ln1"),
                           ("layers.1.a", "layers.1.ln2"), ("layers.1.m", "final")]
    assert plan.exact is False and not plan.notes


def test_pre_to_post_is_the_inverse() -> None:
    forward = moves(build_placement_plan(post_model(), pre_model(), "test"))
    backward = moves(build_placement_plan(pre_model(), post_model(), "test"))
    assert backward == [(target, source) for source, target in forward]


def test_missing_embedding_slot_starts_as_unit_norm_and_says_so() -> None:
    plan = build_placement_plan(post_model(with_embedding=False), pre_model(), "test")
    assert moves(plan)[0] == (None, "layers.0.ln1")
    assert any("starts as a unit norm" in note for note in plan.notes)
    back = build_placement_plan(pre_model(), post_model(with_embedding=False), "test")
    assert moves(back)[0] == ("layers.0.ln1", None)
    assert any("is dropped" in note for note in back.notes)


def test_extra_pre_layout_embedding_norm_is_a_unit_norm() -> None:
    plan = build_placement_plan(post_model(), pre_model(with_embedding=True), "test")
    assert plan.stacks[0].unit_norms == (("emb_ln", "layernorm"),)
    assert moves(plan)[0] == ("emb", "layers.0.ln1")


def test_parallel_two_norms_to_one_keeps_the_first_and_back_copies() -> None:
    parallel = topology("neox", [[sub("parallel", "parallel", norm(f"layers.{i}.in", "pre"),
                                      norm(f"layers.{i}.post_attn", "pre"))] for i in range(2)], None,
                        norm("final", "final"))
    post = topology("neox-post", [[sub("parallel", "post", norm(f"layers.{i}.p", "post"))] for i in range(2)],
                    norm("emb", "embedding"), None)
    plan = build_placement_plan(parallel, post, "test")
    assert moves(plan)[:2] == [("layers.0.in", "emb"), ("layers.0.post_attn", None)]
    back = build_placement_plan(post, parallel, "test")
    assert moves(back)[:2] == [("emb", "layers.0.in"), ("emb", "layers.0.post_attn")]
    assert all(m.copy for m in back.stacks[0].moves[:2])


def test_kind_change_is_not_a_placement_change() -> None:
    with pytest.raises(PlanError, match="keeps the norm kind"):
        build_placement_plan(post_model(), pre_model(kind="rmsnorm"), "test")


def test_sandwich_is_refused() -> None:
    sandwich = topology("gemma2", [[sub("attention", "sandwich", norm("layers.0.a", "pre"),
                                        norm("layers.0.b", "out"))]], None, norm("final", "final"))
    with pytest.raises(PlanError, match="sandwich placement"):
        build_placement_plan(sandwich, pre_model(), "test")


def test_unit_offset_norm_gets_weight_zero() -> None:
    source = topology("post", [[sub("attention", "post", norm("layers.0.a", "post", "rmsnorm-offset"))]], None, None)
    target = topology("pre", [[sub("attention", "pre", norm("layers.0.n", "pre", "rmsnorm-offset"))]], None,
                      norm("final", "final", "rmsnorm-offset"))
    plan = build_placement_plan(source, target, "test")
    state = {"layers.0.a.weight": torch.full((4,), 0.25), "other": torch.ones(2)}
    shapes = {"layers.0.n.weight": torch.Size([4]), "final.weight": torch.Size([4]), "other": torch.Size([2])}
    result, dropped = evaluate(placement_program(shapes_of(state), plan, shapes), state, torch.float32)
    assert torch.equal(result["layers.0.n.weight"], torch.zeros(4))  # (1 + 0) * x: a unit offset norm
    assert torch.equal(result["final.weight"], torch.full((4,), 0.25))
    assert not dropped
