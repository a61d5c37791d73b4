"""benchmarks/heads_eval.py's policy names: each option reaches the tree config it names."""

from __future__ import annotations

import pytest

from conftest import load_benchmark, tiny_model_with_heads
from dyntree.errors import DynTreeError


@pytest.fixture(scope="module")
def heads_eval():
    return load_benchmark("heads_eval")


def test_policy_options_reach_the_tree_config(heads_eval):
    _, heads = tiny_model_with_heads()
    sized = heads_eval.policy("default:12:T1.5:k4", heads)()
    assert sized.config.size == 12 and sized.config.tree_temperature == 1.5 and sized.config.topk == 4
    assert heads_eval.policy("heads-only", heads)().config.lookup == 0
    assert heads_eval.policy("default", heads)().config.size is None


@pytest.mark.parametrize("name", ["default:huge", "nonsense", "default:0"])
def test_bad_policy_is_one_line(heads_eval, name):
    _, heads = tiny_model_with_heads()
    with pytest.raises((SystemExit, DynTreeError)) as err:
        heads_eval.policy(name, heads)
    assert "\n" not in str(err.value)
