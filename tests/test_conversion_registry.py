"""A new kind of conversion is a new file and nothing else (issue 18, item 5): the routes, the API and the command
line take what the files of ``normswap.conversion`` declare (``registry.py``)."""

from __future__ import annotations

import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_convert_native import tiny_model

import normswap
import normswap.conversion
from normswap.cli import main
from normswap.conversion import registry
from normswap.conversion.plan import PlanError

# what each placement goes through to reach another: Pre-Norm is where placements meet, and the direct steps the
# files declare (a branch-norm step between sandwich and post-sublayer, the stream-scaled sandwich -> post) win
EXPECTED_ROUTES = {
    ("post", "sandwich"): ("post>pre", "pre>sandwich"),
    ("parallel", "post-sublayer"): ("parallel>pre", "pre>post-sublayer"),
    ("post-sublayer", "post"): ("post-sublayer>pre", "pre>post"),
    ("sandwich", "post"): ("sandwich>post",),
    ("sandwich", "post-sublayer"): ("sandwich>post-sublayer",),
    ("pre", "post"): ("pre>post",),
    ("post", "post"): (),
}


@pytest.mark.parametrize(("source", "target"), list(EXPECTED_ROUTES))
def test_routes_go_through_pre_norm_unless_a_direct_step_is_declared(source: str, target: str) -> None:
    route = registry.find_route(source, target)
    assert tuple(f"{edge.source}>{edge.target}" for edge in route) == EXPECTED_ROUTES[(source, target)]


def test_every_declared_placement_is_reached_from_every_source() -> None:
    for source in registry.source_placements():
        for target in registry.placements():
            route = registry.find_route(source, target)
            assert (route[0].source, route[-1].target) == (source, target) if route else source == target


def test_an_option_no_route_uses_is_refused() -> None:
    assert [(e.source, e.target, e.option) for e in registry.find_route("pre", "post", ["keep_stream_size"])] == [
        ("pre", "post", "keep_stream_size")]
    with pytest.raises(PlanError, match=re.escape("--keep-stream-size (keep_stream_size=) applies to pre -> post "
                                                  "and parallel -> post; this is sandwich -> post: leave it out")):
        registry.find_route("sandwich", "post", ["keep_stream_size"])


_NEW_PASS_FILE = '''
"""A placement this test declares: "peri", Peri-LN, reached from Pre-Norm by adding an output norm to every branch
(as sandwich is), so its route from any other placement comes from the routing, not from this file."""

from normswap.conversion.branch_norm_passes import branch_norm_planner
from normswap.conversion.registry import NormKind, PlacementEdge
from normswap.conversion.norm_change import plan_norm_kind

PLACEMENT_EDGES = (PlacementEdge("pre", "peri", lambda context: branch_norm_planner("pre", "sandwich",
                                                                                    context.native)),)
NORM_KINDS = (NormKind("rms", lambda model, topology, exact, untie: plan_norm_kind(model, "rmsnorm", exact=exact,
                                                                                    untie=untie)),)
'''


@pytest.fixture
def new_pass_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``peri_for_test.py`` dropped into the package's search path: one new file, nothing else changed."""
    (tmp_path / "peri_for_test.py").write_text(textwrap.dedent(_NEW_PASS_FILE))
    monkeypatch.setattr(normswap.conversion, "__path__", [*normswap.conversion.__path__, str(tmp_path)])
    registry._declarations.cache_clear()
    yield
    registry._declarations.cache_clear()
    sys.modules.pop("normswap.conversion.peri_for_test", None)


def test_a_new_pass_file_is_routed_from_every_placement(new_pass_file: None) -> None:
    assert "peri" in registry.placements() and "rms" in registry.norm_kinds()
    assert [f"{e.source}>{e.target}" for e in registry.find_route("post", "peri")] == ["post>pre", "pre>peri"]
    bert = tiny_model("bert", "BertModel")  # Post-LN: the new step runs after the norm shift the routing adds
    converted = normswap.convert(bert, "peri", norm="rms")
    topology = normswap.inspect(converted)
    assert (topology.placement, topology.norm) == ("sandwich", "rmsnorm")
    assert not converted.normswap_report.exact


def test_the_command_line_takes_a_new_pass_files_choices(new_pass_file: None, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as usage:
        main(["convert", str(tmp_path / "missing"), str(tmp_path / "out"), "--placement", "perri"])
    assert usage.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'perri' (choose from pre, post, sandwich, post-sublayer, peri); did you mean peri?" in err
    # a declared choice gets past the usage check: the missing source is what is refused then
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "out"), "--placement", "peri"]) == 1
    assert "missing" in capsys.readouterr().err


def test_without_the_file_its_choices_are_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as usage:
        main(["convert", str(tmp_path), str(tmp_path / "out"), "--norm", "rms"])
    assert usage.value.code == 2
    assert "argument --norm: invalid choice: 'rms' (choose from rmsnorm, layernorm, none, dyt)" in \
        capsys.readouterr().err
    with pytest.raises(normswap.NormswapError, match="placement must be one of pre, post, sandwich, post-sublayer"):
        normswap.convert(tiny_model("llama", "LlamaForCausalLM"), "peri")


def _convert_help(capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as shown:
        main(["convert", "--help"])
    assert shown.value.code == 0
    return capsys.readouterr().out


def test_convert_help_describes_every_declared_conversion(capsys: pytest.CaptureFixture[str]) -> None:
    listed = " ".join(_convert_help(capsys).split("declared conversions (")[-1].split())  # unwrapped
    for edge in registry.placement_edges():
        assert f"{edge.source} -> {edge.target}" in listed and " ".join(edge.description.split()) in listed
    for kind in registry.norm_kinds().values():
        assert f"{kind.name}: {' '.join(kind.description.split())}" in listed
    assert "--placement: pre, post, sandwich, post-sublayer (also from mixed, parallel)" in listed
    assert "pre -> post [with --keep-stream-size]" in listed


def test_convert_help_lists_a_new_pass_files_conversions(new_pass_file: None,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    listed = _convert_help(capsys).split("declared conversions (")[-1]
    assert "--placement: pre, post, sandwich, post-sublayer, peri" in listed
    assert "    pre -> peri\n" in listed and "    rms\n" in listed
