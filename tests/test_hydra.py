"""Path-conditional (hydra) heads: depth-by-depth trees equal brute force, decoding stays token-exact, formats."""

from __future__ import annotations

import random

import pytest
import torch

from dyntree.decoding import Decoder
from dyntree.errors import DynTreeError
from dyntree.heads import HeadsConfig, HydraHeads, MedusaHeads, PathDraft
from dyntree.interop import load_heads, save_medusa
from dyntree.proposers import DynamicTreeProposer, StaticTreeProposer, build_proposer
from dyntree.config import TreeConfig
from dyntree.trees import StaticTree, load_tree_spec
from dyntree.trees.conditional import best_ranked, select_by_depth


def brute_force(children_of, budget: int, depth_limit: int) -> list[tuple[tuple[int, ...], float]]:
    """Every path up to `depth_limit` (each node offering `children_of(path)`), the best `budget` by rank."""
    scores = {}
    level = [((), 1.0)]
    for _ in range(depth_limit):
        nxt = []
        for path, score in level:
            for token, prob in children_of(path):
                child = (path + (token,), score * prob)
                scores[child[0]] = child[1]
                nxt.append(child)
        level = nxt
    return [(p, scores[p]) for p in best_ranked(scores, budget)]


def random_children(seed: int, width: int, vocab: int = 6, ties: bool = False):
    def children_of(path):
        rng = random.Random(hash((seed, path)))
        tokens = rng.sample(range(vocab), width)
        raw = [rng.choice([0.5, 0.25]) if ties else rng.random() for _ in tokens]
        total = sum(raw) * (1.0 if ties else 1.0 + rng.random())
        return sorted(zip(tokens, [r / total for r in raw]), key=lambda tp: -tp[1])
    return children_of


@pytest.mark.parametrize("seed", range(12))
def test_select_by_depth_equals_brute_force(seed):
    rng = random.Random(seed)
    width, depth, budget, batch = rng.randint(1, 4), rng.randint(1, 4), rng.randint(1, 20), rng.randint(1, 3)
    rows = [random_children(seed * 10 + b, width, ties=seed % 3 == 0) for b in range(batch)]
    calls = []

    def expand(requests):
        calls.append(len({len(p) for _, p in requests}))
        return [rows[b](path) for b, path in requests]

    got = select_by_depth(expand, batch, budget, depth)
    assert len(calls) <= depth and all(c == 1 for c in calls)  # one call per depth, one depth per call
    for b in range(batch):
        assert got[b] == brute_force(rows[b], budget, depth)
        chosen = {p for p, _ in got[b]}
        assert all(len(p) == 1 or p[:-1] in chosen for p in chosen)  # ancestor-closed


def test_tiny_hydra_tree_equals_brute_force_over_all_paths(tiny_backbone):
    heads = HydraHeads.random(tiny_backbone.config, num_heads=3, scale=0.3, seed=1)
    hidden = torch.randn(2, tiny_backbone.config.hidden_size, generator=torch.Generator().manual_seed(0))
    root = torch.tensor([5, 9])
    topk, budget = 3, 9
    draft = PathDraft(heads, tiny_backbone, hidden, root, topk)
    got = select_by_depth(draft.expand, 2, budget, heads.num_heads)
    for b in range(2):
        def children_of(path, b=b):
            ids, probs = heads.topk_given_path(len(path), hidden[b : b + 1], torch.tensor([[int(root[b]), *path]]),
                                               tiny_backbone.embed_tokens, tiny_backbone.lm_head, topk)
            return list(zip(ids[0].tolist(), probs[0].tolist()))
        want = brute_force(children_of, budget, heads.num_heads)
        assert [p for p, _ in got[b]] == [p for p, _ in want]
        assert [s for _, s in got[b]] == pytest.approx([s for _, s in want], rel=1e-5)


def test_both_kinds_of_heads_draft_through_one_contract(tiny_backbone):
    """`heads.draft` answers the same questions for Medusa and hydra heads: children of requested nodes, a
    node's rank, some rows only, and the work of a whole tree (what latency measurements time)."""
    hidden = torch.randn(3, tiny_backbone.config.hidden_size, generator=torch.Generator().manual_seed(2))
    root = torch.tensor([4, 8, 15])
    medusa = MedusaHeads.random(tiny_backbone.config, num_heads=3, scale=0.3)
    hydra = HydraHeads.random(tiny_backbone.config, num_heads=3, scale=0.3)
    draft = medusa.draft(tiny_backbone, hidden, root, 4)
    ids, probs = medusa.topk(hidden, tiny_backbone.lm_head, 4)
    assert torch.equal(draft.ids, ids) and torch.equal(draft.probs, probs)
    token = int(ids[2, 1, 3])
    children = draft.expand([(2, (7,)), (0, ())])  # Medusa guesses do not depend on the path above
    assert children[0] == list(zip(ids[2, 1].tolist(), probs[2, 1].tolist()))
    assert children[1] == list(zip(ids[0, 0].tolist(), probs[0, 0].tolist()))
    assert draft.rank_of(2, (7, token)) == (3, pytest.approx(float(probs[2, 1, 3])))
    assert torch.equal(draft.rows(1, 2).ids, ids[1:2])
    path_draft = hydra.draft(tiny_backbone, hidden, root, 4)
    assert path_draft.ids is None
    whole = path_draft.expand([(1, ()), (2, ())])
    alone = path_draft.rows(2, 3).expand([(0, ())])
    assert [t for t, _ in alone[0]] == [t for t, _ in whole[1]]
    assert [p for _, p in alone[0]] == pytest.approx([p for _, p in whole[1]], rel=1e-4)
    first = whole[1][1][0]
    assert path_draft.rank_of(2, (first,))[0] == 1
    for d in (draft, hydra.draft(tiny_backbone, hidden, root, 4)):
        d.grow(6)  # runs without a tree to hand back


class OracleHydra:
    """Stands in for path-conditional heads: guesses the true continuation first on paths that follow it
    (sometimes at rank 1 or not at all), so multi-token acceptance and off-first-branch paths get exercised.
    It offers only what the heads contract asks (`draft`) and what a path draft reads."""

    def __init__(self, reference: list[int], vocab: int, num_heads: int = 3, seed: int = 0):
        self.reference, self.vocab, self.num_heads = reference, vocab, num_heads
        self.rng = random.Random(seed)

    def draft(self, backbone, last_hidden, root, topk, state=None):
        return PathDraft(self, backbone, last_hidden, root, topk)

    def new_state(self, batch_size, max_len, device=None):  # keeps no per-sequence state (the contract's hooks)
        return None

    def start(self, state, backbone, hidden, prompts, roots):
        pass

    def advance(self, state, backbone, features, next_ids):
        pass

    def topk_given_path(self, head, hidden, path_ids, embed, lm_head, k):
        ids, probs = [], []
        for path in path_ids.tolist():
            truth = None
            for start in range(len(self.reference) - len(path)):
                if self.reference[start : start + len(path)] == path:
                    truth = self.reference[start + len(path)]
                    break
            row = self.rng.sample(range(self.vocab), k)
            if truth is not None and self.rng.random() < 0.85:
                if truth in row:
                    row.remove(truth)
                row.insert(self.rng.choice([0, 0, 1]) if k > 1 else 0, truth)
                row = row[:k]
            ids.append(row)
            probs.append(sorted((self.rng.random() for _ in range(k)), reverse=True))
        return torch.tensor(ids), torch.tensor(probs)


@pytest.mark.parametrize("lookup", [0, 4])
def test_hydra_decoding_is_token_exact(tiny_backbone, lookup):
    prompt = [3, 17, 42, 8, 99, 5]
    reference = Decoder(tiny_backbone, eos_token_ids=()).run([prompt], 40).consume().tokens[0]
    random_heads = HydraHeads.random(tiny_backbone.config, num_heads=3, scale=0.2)
    oracle = OracleHydra([prompt[-1]] + reference, tiny_backbone.config.vocab_size)
    for heads in (random_heads, oracle):
        proposer = DynamicTreeProposer(3, size=10, topk=4, lookup=lookup, conditional=True)
        run = Decoder(tiny_backbone, heads, proposer, eos_token_ids=()).run([prompt], 40).consume()
        assert run.tokens[0] == reference
        if heads is oracle:
            assert run.stats.mean_accepted_per_pass > 1.5  # the oracle's paths were accepted


def test_from_medusa_guesses_exactly_like_medusa(tiny_backbone):
    medusa = MedusaHeads.random(tiny_backbone.config, num_heads=3, scale=0.2)
    hydra = HydraHeads.from_medusa(medusa)
    hidden = torch.randn(4, tiny_backbone.config.hidden_size)
    path = torch.randint(0, tiny_backbone.config.vocab_size, (4, 3))
    want = medusa.logits(hidden, tiny_backbone.lm_head.weight_t)
    got = hydra.path_logits(hidden, path, tiny_backbone.embed_tokens, tiny_backbone.lm_head.weight_t)
    torch.testing.assert_close(got, want)


def test_hydra_round_trip_and_type_errors(tmp_path, tiny_backbone):
    cfg = HeadsConfig(2, 2, tiny_backbone.config.hidden_size, tiny_backbone.config.vocab_size,
                      shared_projection=False, model_type="llama")
    heads = HydraHeads(cfg, torch.arange(0, 100, 2))
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.1)
    heads.save(tmp_path / "h", int8_projection=True)
    heads.round_to_storage(int8_projection=True)
    loaded = load_heads(tmp_path / "h", tiny_backbone.config)
    assert isinstance(loaded, HydraHeads) and loaded.config.head_type == "hydra"
    hidden, path = torch.randn(3, cfg.hidden_size), torch.randint(0, 100, (3, 2))
    args = (tiny_backbone.embed_tokens, tiny_backbone.lm_head.weight_t)
    torch.testing.assert_close(loaded.path_logits(hidden, path, *args), heads.path_logits(hidden, path, *args))
    with pytest.raises(DynTreeError, match="deeper .3. than the number of heads .2."):  # still checked
        build_proposer(TreeConfig.parse("static"), 2, conditional=True)
    with pytest.raises(DynTreeError, match="hydra"):
        save_medusa(loaded, tmp_path / "m")
    meta = (tmp_path / "h" / "heads.json")
    meta.write_text(meta.read_text().replace('"hydra"', '"griffin"'))
    with pytest.raises(DynTreeError, match="unknown head type 'griffin'"):
        load_heads(tmp_path / "h", tiny_backbone.config)


def test_hydra_path_weights_change_guesses(tiny_backbone):
    """The path matters: the same state with two different paths gives different guesses."""
    heads = HydraHeads.random(tiny_backbone.config, num_heads=2, scale=0.3)
    hidden = torch.randn(1, tiny_backbone.config.hidden_size).expand(2, -1)
    paths = torch.tensor([[3, 4], [50, 60]])
    logits = heads.path_logits(hidden, paths, tiny_backbone.embed_tokens, tiny_backbone.lm_head.weight_t)
    assert not torch.allclose(logits[0], logits[1])


@pytest.mark.parametrize("lookup", [0, 6])
def test_hydra_replay_matches_decoding(tiny_backbone, lookup):
    """Offline replay with recorded states reproduces every pass of live decoding with hydra heads."""
    from dyntree.eval.replay import replay

    heads = HydraHeads.random(tiny_backbone.config, num_heads=3, scale=0.2)
    for prompt in ([1, 5, 9, 3, 1, 5, 9, 3, 1, 5], [2, 7, 7, 7, 7, 11, 4]):
        def make():
            return DynamicTreeProposer(3, size=9, topk=4, lookup=lookup, conditional=True)
        live = Decoder(tiny_backbone, heads, make()).run([prompt], 40, stop_at_eos=False).consume()
        seq = prompt + live.tokens[0]
        with torch.inference_mode():
            cache = tiny_backbone.new_cache(1, len(seq) + 1)
            hidden = tiny_backbone.forward(torch.tensor([seq]), cache)[0, len(prompt) - 1 : -1]
        record = {"tokens": seq, "prompt_len": len(prompt), "hidden": hidden}
        got = replay(make(), record, heads=heads, backbone=tiny_backbone)
        assert got.accepted_lengths == live.stats.accepted_lengths


# -- static trees over path-conditional heads ----------------------------------------------------------------
SMALL_TREE = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 1, 2], [2, 3]]  # depth 3, ranks up to 3


def test_static_tree_over_hydra_equals_node_by_node_guesses(tiny_backbone):
    """Every node of a static tree over hydra heads is its rank among the guesses given its own path, computed
    here one node at a time (brute force), for every row of a batch."""
    heads = HydraHeads.random(tiny_backbone.config, num_heads=3, scale=0.3, seed=4)
    proposer = build_proposer(TreeConfig.parse(SMALL_TREE, topk=4), 3, conditional=True)
    assert isinstance(proposer, StaticTreeProposer) and proposer.conditional and proposer.name.endswith(":hydra")
    hidden = torch.randn(3, tiny_backbone.config.hidden_size, generator=torch.Generator().manual_seed(3))
    root = torch.tensor([7, 11, 7])
    draft = heads.draft(tiny_backbone, hidden, root, proposer.topk)
    proposal = proposer.propose(root, None, None, draft=draft)
    paths = proposer.tree.paths
    for b in range(3):
        expected = {(): ()}
        for rank_path in paths:  # parents before children
            parent = expected[rank_path[:-1]]
            ids, _ = heads.topk_given_path(len(parent), hidden[b : b + 1], torch.tensor([[int(root[b]), *parent]]),
                                           tiny_backbone.embed_tokens, tiny_backbone.lm_head, 4)
            expected[rank_path] = parent + (int(ids[0, rank_path[-1]]),)
        assert proposal.tokens[b].tolist() == [int(root[b])] + [expected[p][-1] for p in paths]
    assert torch.equal(proposal.buffers.parents[0], proposer.tree.buffers.parents[0])


def test_static_tree_read_along_paths_equals_gathered_for_medusa_heads(tiny_backbone):
    """Medusa heads' guesses do not depend on the path, so reading a static tree depth by depth through their
    draft gives exactly the tree gathered from their top-k at once."""
    heads = MedusaHeads.random(tiny_backbone.config, num_heads=4, scale=0.3)
    tree = StaticTree.build(load_tree_spec("mc_sim_7b_63")[1], 10, 4)
    hidden = torch.randn(2, tiny_backbone.config.hidden_size, generator=torch.Generator().manual_seed(5))
    root = torch.tensor([3, 9])
    draft = heads.draft(tiny_backbone, hidden, root, 10)
    gathered = StaticTreeProposer(tree).propose(root, draft.ids, draft.probs)
    along = StaticTreeProposer(tree, conditional=True).propose(root, None, None, draft=draft)
    assert torch.equal(gathered.tokens, along.tokens)
    torch.testing.assert_close(gathered.scores.double(), along.scores)


@pytest.mark.parametrize("spec", ["mc_sim_7b_63:12", "small"])
def test_static_tree_over_hydra_decodes_token_exact(tiny_backbone, spec):
    prompt = [3, 17, 42, 8, 99, 5]
    reference = Decoder(tiny_backbone, eos_token_ids=()).run([prompt, prompt[:4]], 40).consume().tokens
    config = TreeConfig.parse(SMALL_TREE, topk=4) if spec == "small" else TreeConfig.parse(spec)
    random_heads = HydraHeads.random(tiny_backbone.config, num_heads=4, scale=0.2)
    oracle = OracleHydra([prompt[-1]] + reference[0], tiny_backbone.config.vocab_size, num_heads=4)
    for heads in (random_heads, oracle):
        proposer = build_proposer(config, 4, conditional=True)
        run = Decoder(tiny_backbone, heads, proposer, eos_token_ids=()).run([prompt, prompt[:4]], 40).consume()
        assert run.tokens == reference
        if heads is oracle:
            assert run.stats.mean_accepted_per_pass > 1.5  # the oracle's paths were accepted


def test_static_tree_over_hydra_replay_matches_decoding(tiny_backbone):
    from dyntree.eval.replay import replay

    heads = HydraHeads.random(tiny_backbone.config, num_heads=3, scale=0.2)
    prompt = [1, 5, 9, 3, 1, 5, 9, 3, 1, 5]
    make = lambda: build_proposer(TreeConfig.parse(SMALL_TREE, topk=4), 3, conditional=True)  # noqa: E731
    live = Decoder(tiny_backbone, heads, make()).run([prompt], 40, stop_at_eos=False).consume()
    seq = prompt + live.tokens[0]
    with torch.inference_mode():
        cache = tiny_backbone.new_cache(1, len(seq) + 1)
        hidden = tiny_backbone.forward(torch.tensor([seq]), cache)[0, len(prompt) - 1 : -1]
    got = replay(make(), {"tokens": seq, "prompt_len": len(prompt), "hidden": hidden}, heads=heads,
                 backbone=tiny_backbone)
    assert got.accepted_lengths == live.stats.accepted_lengths
