"""Recycled candidates: the successor table, its merge into dynamic trees, lossless decoding and replay."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import tiny_model_with_heads

from dyntree.decoding import Decoder
from dyntree.errors import DynTreeError
from dyntree.proposers import DynamicTreeProposer, RootOnlyProposer
from dyntree.trees.recycle import SuccessorTable

from test_lookup_replay import assert_replay_matches_decoding


def test_update_keeps_k_most_recent_first_without_duplicates():
    table = SuccessorTable(k=2)
    assert table.successors(5) == [] and table.chain(5, 3) == [] and table.tree(5, 4) == []
    table.update(5, [7])
    table.update(5, [8])
    assert table.successors(5) == [8, 7]
    table.update(5, [7])
    assert table.successors(5) == [7, 8]
    table.update(5, [9, 7, 7])
    assert table.successors(5) == [9, 7]
    table.observe_sequence([1, 2, 3, 1, 2, 4])
    assert table.successors(2) == [4, 3] and table.successors(3) == [1] and table.successors(4) == []
    assert len(table) == 4
    with pytest.raises(ValueError):
        SuccessorTable(0)


def test_chain_follows_the_top_successor():
    table = SuccessorTable(k=3)
    table.observe_sequence([1, 2, 3, 4, 2, 5])  # 2's latest successor is 5
    assert table.chain(1, 10) == [2, 5]
    assert table.chain(3, 3) == [4, 2, 5]
    table.update(5, [1])  # a cycle: the chain stops at its length
    assert table.chain(1, 7) == [2, 5, 1, 2, 5, 1, 2]


def brute_tree(table, root, budget):
    """All paths up to depth `budget` with their scores, the best `budget` by (score desc, depth asc)."""
    cands, frontier = [], [((), 1.0)]
    for _ in range(budget):
        nxt = []
        for path, score in frontier:
            last = path[-1] if path else root
            for r, t in enumerate(table.successors(last)):
                nxt.append((path + (t,), score / (1 + r)))
        cands += nxt
        frontier = nxt
    return sorted(cands, key=lambda c: (-c[1], len(c[0])))[:budget]


def test_tree_is_best_first_ancestor_closed_with_distinct_siblings():
    rng = random.Random(0)
    for _ in range(300):
        table = SuccessorTable(k=rng.randrange(1, 4))
        table.observe_sequence([rng.randrange(6) for _ in range(rng.randrange(0, 40))])
        root, budget = rng.randrange(6), rng.randrange(0, 9)
        paths = table.tree(root, budget)
        assert len(paths) == len(set(paths)) <= budget
        for i, p in enumerate(paths):
            assert len(p) == 1 or p[:-1] in paths[:i]
        expected = brute_tree(table, root, budget)
        assert len(paths) == len(expected)
        score = {}
        for p in paths:
            last = p[-2] if len(p) > 1 else root
            score[p] = (score[p[:-1]] if len(p) > 1 else 1.0) / (1 + table.successors(last).index(p[-1]))
        assert sorted(score.values(), reverse=True) == [s for _, s in expected]
        if table.k == 1:
            assert paths == [tuple(table.chain(root, budget)[:d]) for d in range(1, len(paths) + 1)]


def test_recycled_candidates_join_the_tree_inside_the_budget():
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(1, 4, 6, generator=gen).sort(-1, descending=True).values
    ids = torch.stack([torch.randperm(50, generator=gen)[:6] for _ in range(4)])[None] + 100  # heads: 100+
    proposer = DynamicTreeProposer(4, topk=6, size=8, lookup=0, recycle=3)
    assert proposer.name.endswith(":recycle3") and proposer.uses_context  # the table is the sequence's text's
    context = [9, 1, 2, 3, 4, 9, 5, 9]  # 9 -> 5, 1 (most recent first); 5 -> 9; root 9 last
    proposal = proposer.propose(torch.tensor([9]), ids, probs, context=[context])
    tokens, parents = proposal.tokens[0].tolist(), proposal.buffers.parents[0].tolist()
    assert len(tokens) == 8
    paths = {}
    for i in range(1, len(tokens)):
        paths[i] = (paths[parents[i]] if parents[i] > 0 else ()) + (tokens[i],)
    assert {(5,), (5, 9), (5, 9, 5)} <= set(paths.values())  # best-first along the most recent successors
    assert sum(t >= 100 for t in tokens[1:]) == 4  # the heads fill the rest
    with pytest.raises(DynTreeError):
        DynamicTreeProposer(4, topk=6, size=8, recycle=-1)


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_model_with_heads()


@pytest.mark.parametrize("lookup,recycle", [(0, 2), (6, 2), (0, 5)])
def test_recycle_decoding_is_lossless_and_replay_matches_decoding(tiny_model, lookup, recycle):
    backbone, heads = tiny_model
    prompts = [[1, 5, 9, 3, 1, 5, 9, 3, 1, 5], [2, 7, 7, 7, 7, 11, 4]]
    expected = Decoder(backbone, heads, RootOnlyProposer()).run(prompts, 48, stop_at_eos=False).consume().tokens
    proposer = DynamicTreeProposer(4, topk=6, size=12, lookup=lookup, recycle=recycle)
    got = Decoder(backbone, heads, proposer).run(prompts, 48, stop_at_eos=False).consume()
    assert got.tokens == expected
    assert len(proposer.successors.table(0, prompts[0] + got.tokens[0])) > 0
    assert_replay_matches_decoding(backbone, heads, prompts, expected,
                                   lambda: DynamicTreeProposer(4, topk=6, size=12, lookup=lookup, recycle=recycle))


def test_table_memory_is_bounded_by_vocabulary_and_k():
    """However long the text, the table holds at most one entry of at most k ids per distinct token."""
    rng = random.Random(0)
    table = SuccessorTable(k=3)
    vocab = 50
    for _ in range(200):
        table.observe_sequence([rng.randrange(vocab) for _ in range(100)])
    assert len(table) <= vocab
    assert all(len(v) <= 3 and len(set(v)) == len(v) for v in table.next.values())


def test_recycle_is_a_validated_tree_setting():
    from dyntree.config import DEFAULT_RECYCLE, TreeConfig

    config = TreeConfig.parse("dynamic", recycle=3)
    assert config.resolved_recycle == 3 and config.settings()["recycle"] == 3
    assert DynamicTreeProposer(4, config).recycle == 3
    assert TreeConfig.parse("dynamic").resolved_recycle == DEFAULT_RECYCLE
    assert TreeConfig.parse("dynamic", recycle=0).resolved_recycle == 0
    with pytest.raises(DynTreeError, match="recycle must be an integer"):
        TreeConfig.parse("dynamic", recycle=-1)
    with pytest.raises(DynTreeError, match="only applies to the dynamic tree"):
        TreeConfig.parse("static", recycle=2)


def test_context_tables_extend_incrementally_and_rebuild_for_another_sequence():
    from dyntree.trees.recycle import ContextTables

    tables = ContextTables(k=2)
    text = [1, 2, 3, 1, 4]
    first = tables.table(0, text)
    assert first.successors(1) == [4, 2]
    grown = tables.table(0, text + [1, 5])  # the same sequence, grown: the same table, extended
    assert grown is first and grown.successors(1) == [5, 4] and grown.successors(4) == [1]
    other = tables.table(0, [7, 8, 7, 9])  # another sequence in the row: rebuilt from its own text
    assert other is not first and other.successors(7) == [9, 8] and other.successors(1) == []
    assert tables.table(1, text + [1, 5]).next == SuccessorTable.from_sequences([text + [1, 5]]).next
