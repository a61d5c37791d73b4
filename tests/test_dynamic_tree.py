"""Dynamic trees: exact best-first selection, closure under ties, buffers, calibration, lossless decoding."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from conftest import tiny_model_with_heads

from dyntree.config import TreeConfig
from dyntree.decoding import Decoder
from dyntree.errors import DynTreeError
from dyntree.heads import MedusaHeads
from dyntree.proposers import DynamicTreeProposer, RootOnlyProposer, build_proposer
from dyntree.trees import StaticTree, buffers_from_parents
from dyntree.trees.acceptance import AcceptanceStats
from dyntree.trees.selection import (best_first_nodes, brute_force_nodes, canonical_order, marginals,
                                     select_nodes)


def node_paths(nodes):
    """Rank paths of selected nodes (node i+1 of the tree is nodes[i])."""
    paths = []
    for parent, depth, rank in nodes:
        path = (paths[parent - 1] if parent > 0 else ()) + (rank,)
        assert len(path) == depth
        paths.append(path)
    return paths


def assert_closed_parent_first(nodes):
    for i, (parent, depth, _) in enumerate(nodes, start=1):
        assert 0 <= parent < i, "parent must come before its child"
        parent_depth = 0 if parent == 0 else nodes[parent - 1][1]
        assert depth == parent_depth + 1


# -- selection -------------------------------------------------------------------------------------------
def test_selection_equals_brute_force_on_random_marginals():
    gen = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    for trial in range(60):
        heads, width = rng.randint(1, 4), rng.randint(1, 5)
        probs = torch.softmax(torch.randn(3, heads, width, generator=gen) * 2, -1)
        if trial % 2:  # the heads' top-k arrive sorted; calibrated factors need not be
            probs = probs.sort(-1, descending=True).values
        factors = marginals(probs)
        total = sum(width ** d for d in range(1, heads + 1))
        for size in sorted({2, 3, 5, min(total + 1, 17), total + 1}):
            chosen, scores = select_nodes(factors, size)
            for row in range(3):
                expected = brute_force_nodes(factors[row].tolist(), size - 1)
                assert list(zip(node_paths(chosen[row]), scores[row])) == expected
                assert_closed_parent_first(chosen[row])


def test_brute_force_reference_scores_every_prefix():
    # The reference must really enumerate all prefixes: for 2 heads x 2 guesses there are 6 of them.
    factors = [[0.6, 0.4], [0.7, 0.3]]
    every = brute_force_nodes(factors, 100)
    assert [p for p, _ in every] == [(0,), (0, 0), (1,), (1, 0), (0, 1), (1, 1)]
    assert every[1][1] == pytest.approx(0.42)


@pytest.mark.parametrize("factors", [
    [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]],  # top-1 probability exactly 1.0, zeros elsewhere
    [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]],  # everything ties at 1.0
    [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]],  # equal siblings
    [[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]],
])
def test_ancestor_closure_and_determinism_under_ties(factors):
    total = sum(len(factors[0]) ** d for d in range(1, len(factors) + 1))
    for budget in range(1, total + 1):
        nodes, scores = best_first_nodes(factors, budget)
        assert len(nodes) == budget
        assert_closed_parent_first(nodes)
        assert len(set(node_paths(nodes))) == budget
        assert list(zip(node_paths(nodes), scores)) == brute_force_nodes(factors, budget)
        assert best_first_nodes(factors, budget) == (nodes, scores)


def test_proposer_survives_probability_one():
    # The reference implementation lost closure (and crashed) when a top-1 probability rounded to 1.0.
    probs = torch.zeros(2, 4, 5)
    probs[:, :, 0] = 1.0
    probs[1, 2] = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])
    ids = torch.arange(40).view(2, 4, 5)
    proposal = DynamicTreeProposer(4, topk=5, size=12, tree_temperature=1.0).propose(
        torch.tensor([7, 8]), ids, probs)
    parents = proposal.buffers.parents
    assert proposal.tokens.shape == (2, 12)
    for row in parents.tolist():
        assert row[0] == -1 and all(0 <= p < i for i, p in enumerate(row) if i)
    # Row 0: the certain top-1 chain (tokens 0 -> 5 -> 10 -> 15) is in the tree, in full.
    tokens, row = proposal.tokens[0].tolist(), parents[0].tolist()
    chain = [tokens.index(t) for t in (0, 5, 10, 15)]
    assert [row[c] for c in chain] == [0] + chain[:-1]
    assert proposal.scores[0, chain].tolist() == [1.0] * 4


def test_canonical_order_keeps_parents_first():
    gen = torch.Generator().manual_seed(1)
    factors = marginals(torch.rand(1, 4, 6, generator=gen))
    nodes, scores = best_first_nodes(factors[0].tolist(), 30)
    ordered, ordered_scores, paths = canonical_order(nodes, scores)
    assert_closed_parent_first(ordered)
    assert paths == sorted(node_paths(nodes), key=lambda p: (len(p), p))
    assert sorted(ordered_scores) == sorted(scores)


# -- buffers ---------------------------------------------------------------------------------------------
def reference_buffers(parents: list[int], max_depth: int):
    """Plain-Python buffers of one tree, written independently of the tensor builder."""
    n = len(parents)
    ancestors = []
    for i, p in enumerate(parents):
        ancestors.append(([i] + ancestors[p]) if p >= 0 else [i])
    depths = [len(a) - 1 for a in ancestors]
    mask = [[j in ancestors[i] for j in range(n)] for i in range(n)]
    leaves = [i for i in range(n) if i not in parents]
    paths = [list(reversed(ancestors[i])) + [-1] * (max_depth + 1 - len(ancestors[i])) for i in leaves]
    return depths, mask, paths


def test_buffers_from_parents_matches_plain_python():
    rng = random.Random(3)
    for _ in range(100):
        batch, n, max_depth = rng.randint(1, 3), rng.randint(1, 30), rng.randint(1, 5)
        trees = []
        for _ in range(batch):
            parents, depths = [-1], [0]
            for i in range(1, n):
                p = rng.choice([j for j in range(i) if depths[j] < max_depth])
                parents.append(p)
                depths.append(depths[p] + 1)
            trees.append(parents)
        buffers = buffers_from_parents(torch.tensor(trees), max_depth)
        width = buffers.retrieve_paths.shape[1]
        for b, parents in enumerate(trees):
            depths, mask, paths = reference_buffers(parents, max_depth)
            assert buffers.depths[b].tolist() == depths
            assert buffers.tree_mask[b].tolist() == mask
            padded = paths + [[-1] * (max_depth + 1)] * (width - len(paths))
            assert buffers.retrieve_paths[b].tolist() == padded


def test_dynamic_buffers_equal_static_builder_on_same_paths():
    gen = torch.Generator().manual_seed(2)
    heads, topk = 4, 6
    probs = torch.softmax(torch.randn(3, heads, 50, generator=gen) * 3, -1)
    top_probs, top_ids = probs.topk(topk, dim=-1)
    root = torch.tensor([1, 2, 3])
    proposer = DynamicTreeProposer(heads, topk=topk, size=20)
    proposal = proposer.propose(root, top_ids, top_probs)
    factors = marginals(top_probs, proposer.temperature)
    for b in range(3):
        chosen = [p for p, _ in brute_force_nodes(factors[b].tolist(), 19)]
        static = StaticTree.build([list(p) for p in chosen], topk, heads)
        for field in ("parents", "depths", "tree_mask"):
            assert torch.equal(getattr(proposal.buffers, field)[b], getattr(static.buffers, field)[0]), field
        # Paths are padded to the batch's widest tree.
        leaves, columns = static.buffers.retrieve_paths.shape[1:]
        assert torch.equal(proposal.buffers.retrieve_paths[b, :leaves, :columns], static.buffers.retrieve_paths[0])
        assert (proposal.buffers.retrieve_paths[b, leaves:] == -1).all()
        assert (proposal.buffers.retrieve_paths[b, :, columns:] == -1).all()
        flat = top_ids[b, : static.depth].reshape(-1)
        assert proposal.tokens[b].tolist() == [int(root[b])] + flat[static.gather_index].tolist()
        assert proposal.ranks[b, 1:].tolist() == [p[-1] for p in static.paths]
        expected_scores = [1.0] + [s for _, s in sorted(brute_force_nodes(factors[b].tolist(), 19),
                                                         key=lambda ps: (len(ps[0]), ps[0]))]
        assert proposal.scores[b].tolist() == pytest.approx(expected_scores)


# -- calibration -----------------------------------------------------------------------------------------
def reference_update(stats, depths, ranks, probs, parents, accepted):
    """Tensor-at-a-time reference for `record_tree`: count every node whose parent was accepted."""
    seen = [i for i in range(1, len(parents)) if accepted[parents[i]]]
    stats.record([int(depths[i]) - 1 for i in seen], [int(ranks[i]) for i in seen], [float(probs[i]) for i in seen],
                 [bool(accepted[i]) for i in seen])


def test_acceptance_stats_count_children_of_accepted_nodes(tmp_path):
    stats = AcceptanceStats(num_heads=3, topk=2, bins=4)
    # root -> a (rank 0), b (rank 1); a -> c (rank 0); c -> d (rank 1). Accepted path: root, a, c.
    parents = torch.tensor([-1, 0, 0, 1, 3])
    depths = torch.tensor([0, 1, 1, 2, 3])
    ranks = torch.tensor([-1, 0, 1, 0, 1])
    probs = torch.tensor([1.0, 0.9, 0.1, 0.6, 0.3], dtype=torch.float64)
    accepted = torch.tensor([True, True, False, True, False])
    reference_update(stats, depths, ranks, probs, parents, accepted)
    again = AcceptanceStats(num_heads=3, topk=2, bins=4)
    again.record_tree(parents.tolist(), ranks.tolist(), probs.tolist(), {0, 1, 3})
    for name in ("proposed_rank", "accepted_rank", "proposed_bin", "accepted_bin"):
        assert torch.equal(getattr(again, name), getattr(stats, name)), name
    assert stats.proposed_rank.tolist() == [[1, 1], [1, 0], [0, 1]]
    assert stats.accepted_rank.tolist() == [[1, 0], [1, 0], [0, 0]]
    assert stats.proposed_bin.tolist() == [[1, 0, 0, 1], [0, 0, 1, 0], [0, 1, 0, 0]]
    assert stats.accepted_bin.tolist() == [[0, 0, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]]
    path = stats.save(tmp_path / "acc.json")
    again = AcceptanceStats.load(path)
    assert torch.equal(again.accepted_bin, stats.accepted_bin) and again.bins == 4
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DynTreeError):
        AcceptanceStats.load(tmp_path / "bad.json")


def test_calibrated_factors_shrink_towards_probabilities():
    stats = AcceptanceStats(num_heads=2, topk=3, prior_strength=4.0)
    probs = torch.tensor([[[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]]], dtype=torch.float64)
    assert torch.allclose(stats.factors(probs, "rank"), probs)  # no data: raw probabilities
    stats.proposed_rank[0, 0] = 96
    stats.accepted_rank[0, 0] = 24  # head 0's top guess is right only 25% of the time
    got = stats.factors(probs, "rank")
    assert got[0, 0, 0].item() == pytest.approx((24 + 4 * 0.7) / (96 + 4))
    assert torch.equal(got[0, 1], probs[0, 1])
    stats.proposed_bin[1, 5] = 10  # probability 0.5 of head 1 falls in bin 5 of 10
    stats.accepted_bin[1, 5] = 10
    assert stats.factors(probs, "binned")[0, 1, 0].item() == pytest.approx((10 + 4 * 0.5) / 14)
    with pytest.raises(DynTreeError):
        stats.factors(probs, "nonsense")


def test_rank_scores_change_the_tree():
    # Head 0's second guess is accepted far more often than its first: the calibrated tree prefers it.
    stats = AcceptanceStats(num_heads=2, topk=2)
    stats.proposed_rank[:] = 100
    stats.accepted_rank[0] = torch.tensor([5.0, 90.0])
    stats.accepted_rank[1] = torch.tensor([50.0, 10.0])
    probs = torch.tensor([[[0.6, 0.4], [0.6, 0.4]]])
    ids = torch.tensor([[[10, 11], [20, 21]]])
    raw = DynamicTreeProposer(2, topk=2, size=2).propose(torch.tensor([0]), ids, probs)
    calibrated = DynamicTreeProposer(2, topk=2, size=2, score="rank", calibration=stats, learn=False)
    assert raw.tokens.tolist() == [[0, 10]]
    assert calibrated.propose(torch.tensor([0]), ids, probs).tokens.tolist() == [[0, 11]]


def test_proposer_rejects_bad_options():
    with pytest.raises(DynTreeError):
        DynamicTreeProposer(4, topk=10, size=1)
    with pytest.raises(DynTreeError):
        DynamicTreeProposer(4, topk=0)
    with pytest.raises(DynTreeError):
        DynamicTreeProposer(2, topk=2, size=8)  # at most 2 + 4 candidates exist
    with pytest.raises(DynTreeError):
        DynamicTreeProposer(4, topk=10, score="magic")
    with pytest.raises(DynTreeError):
        DynamicTreeProposer(4, topk=10, tree_temperature=0)


# -- decoding --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return tiny_model_with_heads()


def greedy(backbone, heads, proposer, prompts, max_new=40):
    run = Decoder(backbone, heads, proposer).run(prompts, max_new, stop_at_eos=False).consume()
    return run.tokens, run.stats


@pytest.mark.parametrize("options", [
    {"size": 2, "topk": 1},
    {"size": 12, "topk": 4},
    {"size": 40, "topk": 8, "score": "rank"},
    {"size": 24, "topk": 6, "score": "binned", "tree_temperature": 2.0},
])
def test_dynamic_decoding_is_lossless(tiny, options):
    backbone, heads = tiny
    prompts = [[1, 5, 9, 3], [2, 7, 7, 7, 7, 11, 4]]
    expected, _ = greedy(backbone, heads, RootOnlyProposer(), prompts)
    proposer = build_proposer(TreeConfig(**options), heads.num_heads)
    for batch in (prompts, prompts[:1]):
        tokens, stats = greedy(backbone, heads, proposer, batch)
        assert tokens == expected[: len(batch)]
        assert stats.tree_nodes == options["size"]
    if options.get("score", "prob") != "prob":
        assert proposer.stats.proposed_rank.sum() > 0  # learned online from verification


def test_dynamic_tree_accepts_more_than_one_token_per_pass(tiny):
    # Heads that copy the backbone's own next-token guess are right whenever the text repeats itself:
    # the tree must then actually deliver several tokens per forward pass.
    backbone, heads = tiny
    prompts = [[3, 4] * 20]
    expected, _ = greedy(backbone, heads, RootOnlyProposer(), prompts, 60)
    tokens, stats = greedy(backbone, heads, DynamicTreeProposer(4, topk=8, size=32), prompts, 60)
    assert tokens == expected
    assert stats.mean_accepted_per_pass > 1.0


def test_build_proposer_options():
    heads = MedusaHeads.random(type("C", (), {"hidden_size": 8, "vocab_size": 16, "model_type": "llama"})(), 5)
    proposer = build_proposer(TreeConfig.parse("dynamic", 9), heads.num_heads)
    assert proposer.max_nodes == 9 and proposer.num_heads == 5
    assert build_proposer(TreeConfig.parse("static"), heads.num_heads).topk == 10
    assert build_proposer(TreeConfig.parse("static:9"), heads.num_heads).max_nodes == 9
    assert build_proposer(TreeConfig.parse("ar"), None).max_nodes == 1
    with pytest.raises(DynTreeError, match="needs Medusa heads"):
        build_proposer(TreeConfig.parse("dynamic"), None)
    with pytest.raises(DynTreeError, match="lookup only applies to the dynamic tree"):
        TreeConfig.parse("static", lookup=3)


def test_observe_counts_like_update():
    from dyntree.verify import Verification

    gen = torch.Generator().manual_seed(5)
    probs = torch.softmax(torch.randn(2, 3, 30, generator=gen) * 3, -1)
    top_probs, top_ids = probs.topk(5, dim=-1)
    proposer = DynamicTreeProposer(3, topk=5, size=14, learn=True)
    proposal = proposer.propose(torch.tensor([1, 2]), top_ids, top_probs)
    # Accept root -> first child -> its first child in row 0; only the root in row 1 (inactive row ignored).
    parents = proposal.buffers.parents[0].tolist()
    child = parents.index(0)
    grandchild = parents.index(child) if child in parents else None
    path = [0, child] + ([grandchild] if grandchild is not None else [])
    verification = Verification([torch.tensor(path), torch.tensor([0])], torch.tensor([0, 0]), torch.tensor([0, 0]))
    proposer.observe(proposal, verification, active=torch.tensor([True, False]))
    expected = AcceptanceStats(3, 5)
    accepted = torch.zeros(14, dtype=torch.bool)
    accepted[path] = True
    reference_update(expected, proposal.buffers.depths[0], proposal.ranks[0], proposal.node_probs[0],
                     proposal.buffers.parents[0], accepted)
    for name in ("proposed_rank", "accepted_rank", "proposed_bin", "accepted_bin"):
        assert torch.equal(getattr(proposer.stats, name), getattr(expected, name)), name
    assert proposer.stats.accepted_rank.sum() == len(path) - 1
    assert proposer.stats.proposed_rank[0].sum() == sum(1 for p in parents if p == 0)


def test_collect_acceptance_stats_and_calibrated_static_tree(tiny):
    from dyntree.eval.calibration import collect_acceptance_stats
    from dyntree.trees.selection import static_paths_from_stats

    backbone, heads = tiny

    class TinyDynTree:  # the two things collection needs from a DynTree
        def __init__(self):
            self.heads = heads

        def encode(self, prompt):
            return list(prompt)

        def decoder(self, proposer):
            return Decoder(backbone, heads, proposer, eos_token_ids=())

    stats = collect_acceptance_stats(TinyDynTree(), [[3, 4] * 10, [1, 2, 3]], max_new_tokens=20, tree_size=16,
                                     topk=4)
    assert stats.proposed_rank.sum() > 0
    assert (stats.accepted_rank <= stats.proposed_rank).all()
    paths = static_paths_from_stats(stats, 9)
    tree = StaticTree.build(paths, 4, heads.num_heads)
    assert tree.num_nodes == 9


def test_read_prompts(tmp_path):
    from dyntree.eval.calibration import read_prompts

    (tmp_path / "p.jsonl").write_text('{"turns": ["a", "b"]}\n\n{"question": "c"}\n{"instruction": "d"}\n')
    assert read_prompts(str(tmp_path / "p.jsonl"), 10) == ["a", "c", "d"]
    assert read_prompts(str(tmp_path / "p.jsonl"), 2) == ["a", "c"]
    (tmp_path / "bad.jsonl").write_text('{"other": 1}\n')
    with pytest.raises(DynTreeError):
        read_prompts(str(tmp_path / "bad.jsonl"), 10)
    with pytest.raises(DynTreeError):
        read_prompts(str(tmp_path / "missing.txt"), 10)
