"""``config_branches``: the statements of a modeling function that may run for a config, its ``if`` tests read."""

from __future__ import annotations

import ast
from types import SimpleNamespace

import torch

from normswap.codegen.config_branches import running_statements

_FORWARD = '''
def forward(self, x, config):
    a = 1
    if self.config.new_decoder_architecture or self.config.parallel_attn:
        b = 2
    if not config.parallel_attn:
        c = 3
    else:
        if self.config.num_ln == 2:
            d = 4
        elif self.training:
            e = 5
    if x.sum() > 0:
        f = 6
    if self.config.missing:
        g = 7
'''


def _assigned(config: object) -> set[str]:
    function = ast.parse(_FORWARD).body[0]
    assert isinstance(function, ast.FunctionDef)
    return {target.id for node in running_statements(function, config) if isinstance(node, ast.Assign)
            for target in node.targets if isinstance(target, ast.Name)}


def test_a_config_rules_out_the_branches_its_tests_decide_against() -> None:
    sequential = SimpleNamespace(new_decoder_architecture=False, parallel_attn=False, num_ln=2)
    assert _assigned(sequential) == {"a", "c", "f", "g"}  # a tensor test or an unknown field decides nothing
    parallel = SimpleNamespace(new_decoder_architecture=False, parallel_attn=True, num_ln=1)
    assert _assigned(parallel) == {"a", "b", "e", "f", "g"}  # self.training is left undecided
    two_norms = SimpleNamespace(new_decoder_architecture=True, parallel_attn=True, num_ln=2)
    assert _assigned(two_norms) == {"a", "b", "d", "f", "g"}


def test_without_a_config_every_statement_may_run() -> None:
    assert _assigned(None) == set("abcdefg")


_LAYER_FORWARD = '''
def forward(self, x):
    if self.is_attention_layer:
        a = 1
    else:
        b = 2
    if self.training:
        c = 3
    if self.block is not None:
        d = 4
    if self.config.parallel_attn and self.layer_idx > 0:
        e = 5
'''


def test_a_plain_attribute_of_the_module_rules_out_branches_too() -> None:
    """LFM2's ``if self.is_attention_layer:`` is set per layer in ``__init__``: the layer's own value decides it.
    ``self.training`` (which training flips) and a module attribute (``self.block``) decide nothing."""
    function = ast.parse(_LAYER_FORWARD).body[0]
    assert isinstance(function, ast.FunctionDef)

    def assigned(holder: object) -> set[str]:
        return {target.id for node in running_statements(function, SimpleNamespace(parallel_attn=True), holder)
                if isinstance(node, ast.Assign) for target in node.targets if isinstance(target, ast.Name)}

    convolution = SimpleNamespace(is_attention_layer=False, training=False, block=torch.nn.Linear(1, 1), layer_idx=0)
    assert assigned(convolution) == {"b", "c", "d"}
    attention = SimpleNamespace(is_attention_layer=True, training=True, block=torch.nn.Linear(1, 1), layer_idx=3)
    assert assigned(attention) == {"a", "c", "d", "e"}
    assert assigned(None) == {"a", "b", "c", "d", "e"}
