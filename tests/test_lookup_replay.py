"""Lookup branches (context copies merged into dynamic trees) and offline replay of tree policies."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import tiny_model_with_heads

from dyntree.decoding import Decoder
from dyntree.errors import DynTreeError
from dyntree.proposers import RootOnlyProposer
from dyntree.proposers import DynamicTreeProposer
from dyntree.trees.lookup import find_chain, merge_chain
from dyntree.eval.replay import accepted_nodes, replay


def brute_chain(context, max_len, max_ngram, min_ngram):
    for n in range(max_ngram, min_ngram - 1, -1):
        if n > len(context) - 1:
            continue
        suffix = context[-n:]
        ends = [i for i in range(n - 1, len(context) - 1) if context[i - n + 1 : i + 1] == suffix]
        if ends:
            i = max(ends)
            return context[i + 1 : i + 1 + max_len], n
    return [], 0


def test_find_chain_equals_brute_force():
    rng = random.Random(0)
    for _ in range(2000):
        context = [rng.randrange(4) for _ in range(rng.randrange(1, 30))]
        max_len, hi = rng.randrange(0, 6), rng.randrange(1, 5)
        lo = rng.randrange(1, hi + 1)
        expected = brute_chain(context, max_len, hi, lo) if max_len > 0 else ([], 0)
        assert find_chain(context, max_len, hi, lo) == expected


def test_find_chain_prefers_longest_ngram_and_latest_match():
    # "1 2 3" occurred twice; the later copy was followed by 8, an older "2 3" by 9.
    context = [5, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3, 8, 6, 1, 2, 3]
    assert find_chain(context, 2, 3, 2) == ([8, 6], 3)
    assert find_chain([4, 4, 4], 5, 3, 2) == ([4], 2)  # never past the end of the context
    assert find_chain([1, 2, 3], 4, 3, 2) == ([], 0)


def test_merge_chain_is_ancestor_closed_and_fills_the_budget():
    rng = random.Random(1)
    for _ in range(500):
        # Head paths in a best-first-like order: each path's parent appears before it.
        head_paths = []
        for _ in range(rng.randrange(0, 15)):
            parent = rng.choice([()] + head_paths)
            if len(parent) < 4:
                path = parent + (rng.randrange(5),)
                if path not in head_paths:
                    head_paths.append(path)
        chain = [rng.randrange(5) for _ in range(rng.randrange(0, 7))]
        budget = rng.randrange(1, 12)
        merged = merge_chain(head_paths, chain, budget)
        assert len(merged) == len(set(merged)) <= budget
        assert all(p[:-1] == () or p[:-1] in merged for p in merged)
        assert merged[: min(len(chain), budget)] == [tuple(chain[:d]) for d in range(1, min(len(chain), budget) + 1)]
        union = set(head_paths) | {tuple(chain[:d]) for d in range(1, min(len(chain), budget) + 1)}
        assert len(merged) == min(budget, len(union))


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_model_with_heads()


def check_tree(proposal, size):
    tokens = proposal.tokens[0].tolist()
    parents = proposal.buffers.parents[0].tolist()
    assert len(tokens) == size and parents[0] == -1
    for i in range(1, len(parents)):
        assert 0 <= parents[i] < i
    children = {}
    for i in range(1, len(parents)):
        children.setdefault(parents[i], []).append(tokens[i])
    assert all(len(c) == len(set(c)) for c in children.values()), "siblings must hold distinct tokens"


def test_lookup_tree_holds_the_chain_and_keeps_its_size():
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(1, 4, 6, generator=gen).sort(-1, descending=True).values
    ids = torch.stack([torch.randperm(50, generator=gen)[:6] for _ in range(4)])[None]
    context = [7, 8, 9, 40, 41, 42, 43, 44, 45, 7, 8, 9]  # "7 8 9" was followed by 40 41 42 ...
    proposer = DynamicTreeProposer(4, topk=6, size=10, lookup=5)
    proposal = proposer.propose(torch.tensor([9]), ids, probs, context=[context])
    check_tree(proposal, 10)
    tokens, parents = proposal.tokens[0].tolist(), proposal.buffers.parents[0].tolist()
    node, path = 0, []
    for want in [40, 41, 42, 43, 44]:  # the chain is a root-to-leaf path of the tree
        kids = [i for i in range(len(tokens)) if parents[i] == node and tokens[i] == want]
        assert len(kids) == 1
        node = kids[0]
        path.append(node)
    assert proposal.buffers.depths[0, path[-1]] == 5  # deeper than the 4 heads
    assert proposer.uses_context
    scored = DynamicTreeProposer(4, topk=6, size=10, lookup=5, lookup_merge="score")
    check_tree(scored.propose(torch.tensor([9]), ids, probs, context=[context]), 10)
    with pytest.raises(DynTreeError):
        DynamicTreeProposer(4, topk=6, size=10, lookup=-1)


def assert_replay_matches_decoding(backbone, heads, prompts, continuations, make_proposer, topk: int = 6):
    """Replay on each recorded continuation reproduces every pass of a real decoding run (batch of 1), each
    with a fresh proposer from `make_proposer`."""
    for prompt, cont in zip(prompts, continuations):
        seq = prompt + cont
        with torch.inference_mode():
            cache = backbone.new_cache(1, len(seq) + 1)
            hidden = backbone.forward(torch.tensor([seq]), cache)[0]
            ids, probs = heads.topk(hidden[len(prompt) - 1 : -1], backbone.lm_head, topk)
        record = {"tokens": seq, "prompt_len": len(prompt), "head_ids": ids, "head_probs": probs}
        live = Decoder(backbone, heads, make_proposer()).run([prompt], 48, stop_at_eos=False).consume()
        assert replay(make_proposer(), record).accepted_lengths == live.stats.accepted_lengths


@pytest.mark.parametrize("lookup", [0, 6])
def test_lookup_decoding_is_lossless_and_replay_matches_decoding(tiny_model, lookup):
    backbone, heads = tiny_model
    prompts = [[1, 5, 9, 3, 1, 5, 9, 3, 1, 5], [2, 7, 7, 7, 7, 11, 4]]
    run = Decoder(backbone, heads, RootOnlyProposer()).run(prompts, 48, stop_at_eos=False).consume()
    expected = run.tokens
    proposer = DynamicTreeProposer(4, topk=6, size=12, lookup=lookup)
    got = Decoder(backbone, heads, proposer).run(prompts, 48, stop_at_eos=False).consume()
    assert got.tokens == expected
    if lookup:
        assert sum(proposer.lookup.proposed) > 0
    assert_replay_matches_decoding(backbone, heads, prompts, expected,
                                   lambda: DynamicTreeProposer(4, topk=6, size=12, lookup=lookup))
    assert got.stats.mean_accepted_per_pass >= 1.0


def test_accepted_nodes_walk():
    # root 0; children 1 (tok 5), 2 (tok 6); 3 under 2 (tok 7); 4 under 3 (tok 8)
    tokens, parents, depths = [0, 5, 6, 7, 8], [-1, 0, 0, 2, 3], [0, 1, 1, 2, 3]
    assert accepted_nodes(tokens, parents, depths, [6, 7, 9]) == [0, 2, 3]
    assert accepted_nodes(tokens, parents, depths, [6, 7, 8]) == [0, 2, 3, 4]
    assert accepted_nodes(tokens, parents, depths, [4]) == [0]
    assert accepted_nodes(tokens, parents, depths, []) == [0]


def test_merge_scored_keeps_the_best_closed_set():
    from dyntree.trees.lookup import merge_scored

    rng = random.Random(2)
    for _ in range(500):
        head_paths, head_scores, score_of = [], [], {(): 1.0}
        for _ in range(rng.randrange(0, 15)):
            parent = rng.choice([()] + head_paths)
            if len(parent) < 4:
                path = parent + (rng.randrange(4),)
                if path not in head_paths:
                    score_of[path] = score_of[parent] * rng.choice([1.0, 0.5, rng.random()])
                    head_paths.append(path)
                    head_scores.append(score_of[path])
        chain = [rng.randrange(4) for _ in range(rng.randrange(0, 6))]
        chain_scores, s = [], 1.0
        for _ in chain:
            s *= rng.random()
            chain_scores.append(s)
        budget = rng.randrange(1, 10)
        best = {}
        for p, v in list(zip(head_paths, head_scores)) + [(tuple(chain[:d + 1]), v) for d, v in enumerate(chain_scores)]:
            best[p] = max(best.get(p, 0.0), v)
        chosen = merge_scored(best, budget)
        assert len(chosen) == len(set(chosen)) == min(budget, len(best))
        assert all(len(p) == 1 or p[:-1] in chosen for p in chosen)
        if len(chosen) == budget:
            floor = min(best[p] for p in chosen)
            for p in best:
                if p not in chosen and (len(p) == 1 or p[:-1] in chosen):
                    assert best[p] <= floor


def test_auto_size_with_lookup_is_lossless_and_sizes_vary(tiny_model):
    from dyntree.trees.latency import LatencyModel

    backbone, heads = tiny_model
    prompts = [[1, 5, 9, 3, 1, 5, 9, 3, 1, 5]]
    expected = Decoder(backbone, heads, RootOnlyProposer()).run(prompts, 40, stop_at_eos=False).consume().tokens
    latency = LatencyModel(rows=[1, 4, 16], seconds=[0.010, 0.012, 0.030])
    proposer = DynamicTreeProposer(4, topk=6, size=16, score="binned", latency=latency, lookup=6)
    run = Decoder(backbone, heads, proposer).run(prompts, 40, stop_at_eos=False).consume()
    assert run.tokens == expected
    assert all(1 <= s <= 16 for s in run.stats.tree_sizes)
