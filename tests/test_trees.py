"""Static trees: validation, and buffers checked against a brute-force reading of the path list."""

from __future__ import annotations

import json

import pytest
import torch

from dyntree.errors import DynTreeError
from dyntree.trees import StaticTree, buffers_from_parents, load_tree_spec, validate_paths


def brute_force_buffers(paths):
    """Mask/depth/leaf paths straight from the definition, with nodes in validate_paths order."""
    ordered = [()] + validate_paths(paths)
    n = len(ordered)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(ordered):
        for j, q in enumerate(ordered):
            mask[i, j] = p[: len(q)] == q
    depths = torch.tensor([len(p) for p in ordered])
    leaves = [p for p in ordered if not any(len(q) == len(p) + 1 and q[: len(p)] == p for q in ordered)]
    leaf_paths = [[ordered.index(p[:d]) for d in range(len(p) + 1)] for p in leaves]
    return mask, depths, leaf_paths


@pytest.mark.parametrize("spec", ["mc_sim_7b_63", [[0], [1], [0, 0], [0, 1], [2], [0, 0, 0]], [[3]]])
def test_static_buffers_match_brute_force(spec):
    name, paths = load_tree_spec(spec)
    tree = StaticTree.build(paths, topk=10, num_heads=4, name=name)
    mask, depths, leaf_paths = brute_force_buffers(paths)
    b = tree.buffers
    assert torch.equal(b.tree_mask[0], mask)
    assert torch.equal(b.depths[0], depths)
    got = [[i for i in row if i >= 0] for row in b.retrieve_paths[0].tolist()]
    assert sorted(got) == sorted(leaf_paths)


def test_medusa_tree_shape():
    tree = StaticTree.build(load_tree_spec("mc_sim_7b_63")[1], topk=10, num_heads=4)
    assert tree.num_nodes == 64 and tree.depth == 4
    # gather index: head (depth-1) * topk + rank
    assert tree.gather_index[:3].tolist() == [0, 1, 2]  # [0], [1], [2] come first after sorting


def test_buffers_from_parents_handles_a_batch_of_different_trees():
    parents = torch.tensor([[-1, 0, 0, 1, 3], [-1, 0, 1, 2, 0]])
    b = buffers_from_parents(parents, max_depth=4)
    assert b.depths.tolist() == [[0, 1, 1, 2, 3], [0, 1, 2, 3, 1]]
    assert b.tree_mask[0, 4].tolist() == [True, True, False, True, True]
    assert b.tree_mask[1, 4].tolist() == [True, False, False, False, True]
    assert [[i for i in r if i >= 0] for r in b.retrieve_paths[1].tolist()] == [[0, 1, 2, 3], [0, 4]]


@pytest.mark.parametrize("paths, message", [
    ([], "non-empty list"),
    ([[0], [0, 0, 0]], "not prefix-closed"),
    ([[0], [0]], "twice"),
    ([[0], [-1]], "non-negative integer"),
    ([[0], ["a"]], "non-negative integer"),
    ([[0], [0, 0], [0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0, 0]], "deeper"),
    ([[12]], "only the top-10"),
    ([0, 1], "not a non-empty list"),
])
def test_broken_trees_are_rejected_with_a_clear_message(paths, message):
    with pytest.raises(DynTreeError, match=message):
        StaticTree.build(paths, topk=10, num_heads=4)


def test_tree_files(tmp_path):
    good = tmp_path / "t.json"
    good.write_text(json.dumps({"paths": [[0], [0, 0]]}))
    assert load_tree_spec(good) == ("t", [[0], [0, 0]])
    bad = tmp_path / "bad.json"
    bad.write_text("[[0], [0,")
    with pytest.raises(DynTreeError, match="not valid JSON"):
        load_tree_spec(bad)
    with pytest.raises(DynTreeError, match="unknown tree"):
        load_tree_spec(tmp_path / "missing.json")


def test_first_child_chain():
    from dyntree.verify import first_child_chain

    parents = torch.tensor([[-1, 0, 0, 1, 1, 3, 2], [-1, 0, 1, 0, 2, 0, 0]])
    assert first_child_chain(parents, 4).tolist() == [[0, 1, 3, 5, -1], [0, 1, 2, 4, -1]]
    assert first_child_chain(torch.tensor([[-1]]), 0).tolist() == [[0]]


def test_builtin_tree_prefixes():
    from dyntree.config import TreeConfig
    from dyntree.proposers import build_proposer

    _, full = load_tree_spec("mc_sim_7b_63")
    name, paths = load_tree_spec("mc_sim_7b_63:8")
    assert name == "mc_sim_7b_63:8" and paths == full[:7]
    StaticTree.build(paths, 10, 4)  # every prefix of the built-in order is a tree
    assert build_proposer(TreeConfig.parse("static:5"), 4).tree.num_nodes == 5
    for bad in ("mc_sim_7b_63:1", "mc_sim_7b_63:x", "mc_sim_7b_63:65"):
        with pytest.raises(DynTreeError):
            load_tree_spec(bad)
