"""Batches: one node budget per step for the whole batch, padded trees, and batched decoding equal to
per-prompt decoding sequence by sequence."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from dyntree.decoding import Decoder
from dyntree.proposers import DynamicTreeProposer, Proposal, Proposer, RootOnlyProposer
from dyntree.sampling import SamplingConfig
from dyntree.trees import buffers_from_parents
from dyntree.trees.allocation import allocate_nodes, ranking
from dyntree.trees.buffers import pad_parents
from dyntree.trees.latency import BatchLatency, LatencyModel, measure_latency
from dyntree.verify import verify_tree

from test_dynamic_tree import tiny  # noqa: F401 - fixture


# -- allocation (pure) ---------------------------------------------------------------------------------------
def brute_force_rate(scores, active, cost, max_size):
    """Best expected tokens/s over every per-row count vector (each row a prefix of its candidates)."""
    choices = [range(min(len(row), max_size - 1) + 1) if a else [0] for row, a in zip(scores, active)]
    best = 0.0
    for counts in itertools.product(*choices):
        expected = sum(1 + sum(row[:k]) for row, k, a in zip(scores, counts, active) if a)
        best = max(best, expected / cost(1 + max(counts, default=0)))
    return best


def random_costs(rng, max_size):
    kind = rng.choice(["flat", "linear", "steps", "steep"])
    base = rng.uniform(0.01, 0.05)
    if kind == "flat":
        return lambda n: base * (1 + 0.001 * n)
    if kind == "linear":
        slope = rng.uniform(0.01, 0.3)
        return lambda n: base * (1 + slope * (n - 1))
    if kind == "steps":
        return lambda n: base * (1 + 0.5 * ((n - 1) // 4))
    return lambda n: base * n


def test_allocation_equals_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        batch, max_size = rng.randint(1, 3), rng.randint(1, 6)
        scores = []
        for _ in range(batch):  # candidates in selection order: scores mostly falling, sometimes not (lookup)
            row = sorted((rng.random() for _ in range(rng.randint(0, 6))), reverse=rng.random() < 0.8)
            scores.append(row)
        active = [rng.random() < 0.8 for _ in range(batch)]
        cost = random_costs(rng, max_size)
        got = allocate_nodes(scores, active, cost, max_size)
        assert got.rate == pytest.approx(brute_force_rate(scores, active, cost, max_size), rel=1e-12)
        assert all(k == 0 for k, a in zip(got.counts, active) if not a)  # finished rows: the root alone
        assert all(k <= min(len(row), max_size - 1) for k, row in zip(got.counts, scores))
        assert got.width == 1 + max(got.counts, default=0)


def test_allocation_fills_rows_to_the_width_and_shrinks_to_the_root_when_costly():
    scores = [[0.9, 0.8, 0.7], [0.2, 0.1], [0.95]]
    flat = allocate_nodes(scores, [True] * 3, lambda n: 1.0 + 1e-3 * n, 8)
    assert flat.counts == [3, 2, 1] and flat.width == 4  # nearly free: every candidate, rows padded to 4
    steep = allocate_nodes(scores, [True] * 3, lambda n: float(n), 8)
    assert steep.counts == [0, 0, 0] and steep.width == 1  # cost proportional to width: plain decoding
    middle = allocate_nodes(scores, [True, True, False], lambda n: 1.0 + 0.5 * (n - 1), 8)
    assert middle.counts == [1, 1, 0]  # +1.1 tokens for +0.5 cost; the 2nd nodes add 0.9 for another 0.5
    assert middle.expected_tokens == pytest.approx(2 + 0.9 + 0.2)


def test_ranking_keeps_each_rows_order():
    scores = [[0.5, 0.9], [0.7, 0.6, 0.1]]
    order = ranking(scores, [True, True])
    assert order == [(1, 0), (1, 1), (0, 0), (0, 1), (1, 2)]  # row 0's 0.9 waits for its parent (0.5)
    assert ranking(scores, [False, True]) == [(1, 0), (1, 1), (1, 2)]


# -- batch latency -------------------------------------------------------------------------------------------
def test_batch_latency_measures_each_batch_once_and_falls_back_to_batch_one():
    batch1 = LatencyModel([1, 4], [0.01, 0.02])
    calls = []

    def measure(batch):
        calls.append(batch)
        return LatencyModel([1, 4], [0.01 * batch, 0.05 * batch]), 0.009 * batch

    latency = BatchLatency({1: batch1}, {1: 0.009}, measure=measure)
    assert latency.cost(1, 4) == 0.02 and calls == []
    assert latency.cost(3, 4) == pytest.approx(0.15) and latency.plain_cost(3) == pytest.approx(0.027)
    latency.cost(3, 1)
    assert calls == [3]
    fixed = BatchLatency.from_model(batch1)  # a batch-1 file: batch b costs b*n tokens, no plain cost known
    assert fixed.cost(2, 2) == batch1.cost(4) and fixed.plain_cost(2) is None
    assert BatchLatency.from_model(latency) is latency


def test_measure_latency_by_batch(tiny):  # noqa: F811
    backbone, heads = tiny
    model = measure_latency(backbone, heads, sizes=(1, 3), context=8, repeats=1, batch=3)
    assert model.rows == [1, 3] and model.note["batch"] == 3 and model.seconds == sorted(model.seconds)


# -- padded trees --------------------------------------------------------------------------------------------
class BatchOracle(Proposer):
    """Per row a random tree holding that row's true continuation (and decoys), with a random number of real
    nodes, padded to the step's width; every padding node carries the true next token, so a padding node that
    verification could reach would be accepted and break exactness."""

    name = "batch-oracle"
    uses_heads = False
    topk = 0
    max_nodes = 10

    def __init__(self, references: list[list[int]], vocab: int, seed: int):
        self.references = references  # per row: plain decoding's tokens (the first is the first root)
        self.vocab = vocab
        self.rng = random.Random(seed)
        self.done = [0] * len(references)  # tokens of each row decided so far (roots included)
        self.padded = 0

    def propose(self, root, head_ids=None, head_probs=None, context=None) -> Proposal:
        rows_parents, rows_tokens, truths = [], [], []
        for b, ref in enumerate(self.references):
            future = ref[self.done[b]:]  # future[0] is this step's root, if the row is still going
            parents, tokens = [-1], [int(root[b])]
            current = 0
            for d in range(self.rng.randint(0, 4)):
                if self.rng.random() < 0.4:
                    parents.append(current)
                    tokens.append(self.rng.randrange(self.vocab))
                true = future[d + 1] if d + 1 < len(future) else self.rng.randrange(self.vocab)
                if true in [t for p, t in zip(parents, tokens) if p == current]:
                    break
                parents.append(current)
                tokens.append(true)
                current = len(tokens) - 1
            rows_parents.append(parents)
            rows_tokens.append(tokens)
            truths.append(future[1] if len(future) > 1 else 0)
        width = max(len(p) for p in rows_parents) + self.rng.randint(0, 2)
        self.padded += sum(width - len(p) for p in rows_parents)
        tokens = [t + [truths[b]] * (width - len(t)) for b, t in enumerate(rows_tokens)]
        parents = torch.tensor(pad_parents(rows_parents, width))
        return Proposal(tokens=torch.tensor(tokens), buffers=buffers_from_parents(parents, 8))

    def observe(self, proposal, verification, active=None):
        for b, nodes in enumerate(verification.accepted_nodes):
            if active is None or bool(active[b]):
                self.done[b] += len(nodes)


def plain_tokens(backbone, prompt, max_new, eos=()):
    return Decoder(backbone, eos_token_ids=eos).run([prompt], max_new).consume().tokens[0]


@pytest.mark.parametrize("seed", range(4))
def test_padded_batch_decoding_equals_each_prompts_plain_decoding(tiny_backbone, seed):
    prompts = [torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n + seed)).tolist()
               for n in (3, 17, 6, 9)]
    refs = [plain_tokens(tiny_backbone, p, 30) for p in prompts]
    eos = refs[2][6]  # sequence 2 (at least) stops early on this "EOS" token
    expected = [plain_tokens(tiny_backbone, p, 30, (eos,)) for p in prompts]
    assert len(expected[2]) < 30
    oracle = BatchOracle(expected, 128, seed)
    run = Decoder(tiny_backbone, proposer=oracle, eos_token_ids=(eos,)).run(prompts, 30).consume()
    assert run.tokens == expected
    assert oracle.padded > 0 and max(run.stats.accepted_lengths) > 2
    assert run.stats.stop_reasons[2] == "eos"


@pytest.mark.parametrize("mode", ["lossless", "typical"])
def test_padding_nodes_are_never_accepted_when_sampling(tiny_backbone, mode):
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13]]
    refs = [plain_tokens(tiny_backbone, p, 20) for p in prompts]
    sampling = SamplingConfig.from_options(temperature=0.8, seed=3, mode=mode)
    oracle = BatchOracle(refs, 128, 0)
    cache = tiny_backbone.new_cache(2, 64)
    from dyntree.step import forward_tree, prefill

    last = prefill(tiny_backbone, cache, prompts)
    root = tiny_backbone.logits(last).argmax(-1)
    generator = sampling.generator(tiny_backbone.device)
    for _ in range(20):
        proposal = oracle.propose(root)
        hidden = forward_tree(tiny_backbone, proposal, cache)
        result = verify_tree(tiny_backbone.logits, hidden, proposal, None, sampling, generator)
        for b, nodes in enumerate(result.accepted_nodes):
            parents = proposal.buffers.parents[b]
            assert all(int(parents[i]) >= 0 for i in nodes.tolist()[1:])  # real nodes only


def test_dynamic_batch_with_a_batch_latency_is_exact(tiny):  # noqa: F811
    backbone, heads = tiny
    prompts = [[3, 4] * 10, [1, 5, 9, 3], [7] * 13, [11, 12, 13]]
    expected = [Decoder(backbone, heads, RootOnlyProposer()).run([p], 30, stop_at_eos=False).consume().tokens[0]
                for p in prompts]
    measured = []

    def measure(batch):  # nearly flat costs: big trees
        measured.append(batch)
        return LatencyModel([1, 16], [0.010 * batch, 0.0101 * batch]), 0.011 * batch

    proposer = DynamicTreeProposer(4, topk=6, size=12, score="binned", latency=BatchLatency({}, measure=measure))
    run = Decoder(backbone, heads, proposer).run(prompts, 30, stop_at_eos=False).consume()
    assert run.tokens == expected
    assert measured == [4] and min(run.stats.tree_sizes) > 1


def test_trees_shrink_to_plain_decoding_when_they_cannot_pay(tiny):  # noqa: F811
    backbone, heads = tiny
    prompts = [[3, 4] * 5, [1, 5, 9, 3]]
    expected = [Decoder(backbone, heads, RootOnlyProposer()).run([p], 40, stop_at_eos=False).consume().tokens[0]
                for p in prompts]

    def measure(batch):  # every node costs as much as the root, and the heads double a step: never pays
        return LatencyModel([1, 16], [0.02 * batch, 0.32 * batch]), 0.01 * batch

    proposer = DynamicTreeProposer(4, topk=6, size=12, latency=BatchLatency({}, measure=measure))
    calls = []
    real = proposer.propose
    proposer.propose = lambda *a, **k: calls.append(1) or real(*a, **k)
    run = Decoder(backbone, heads, proposer).run(prompts, 40, stop_at_eos=False).consume()
    assert run.tokens == expected
    assert set(run.stats.tree_sizes) == {1}
    assert len(calls) < run.stats.decode_passes / 3  # the heads ran only on probing steps


def test_finished_rows_get_no_nodes(tiny):  # noqa: F811
    backbone, heads = tiny
    proposer = DynamicTreeProposer(4, topk=6, size=8,
                                   latency=BatchLatency({2: LatencyModel([1, 16], [0.01, 0.0101])}))
    proposer.plan_step(torch.tensor([True, False]))
    head_ids, head_probs = heads.topk(torch.randn(2, backbone.config.hidden_size), backbone.lm_head, 6)
    proposal = proposer.propose(torch.tensor([5, 6]), head_ids, head_probs)
    parents = proposal.buffers.parents
    assert (parents[0, 1:] >= 0).sum() == 7 and (parents[1, 1:] < 0).all()
    assert proposal.tokens[1].tolist() == [6] * 8  # padding repeats the root


# -- the API ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dyntree(tiny_model_dir):
    from dyntree.api import DynTree

    return DynTree.from_pretrained(str(tiny_model_dir), heads="random", tree="dynamic", dtype="float32")


def test_generate_a_list_equals_one_prompt_at_a_time(tiny_dyntree):
    prompts = ["w5 w6 w7", [9, 10, 11, 12, 13, 14, 15, 16, 17], "w40 w41 w42 w43 w44"]
    free = tiny_dyntree.generate(prompts[1], max_new_tokens=20, chat=False, stop_at_eos=False).token_ids
    eos = free[4]
    tiny_dyntree.model.backbone.config.eos_token_ids = (eos,)  # sequence 1 (at least) finishes early
    try:
        single = [tiny_dyntree.generate(p, max_new_tokens=20, chat=False) for p in prompts]
        batch = tiny_dyntree.generate(prompts, max_new_tokens=20, chat=False)
        plain = tiny_dyntree.with_tree("ar").generate(prompts, max_new_tokens=20, chat=False)
    finally:
        tiny_dyntree.model.backbone.config.eos_token_ids = (2,)
    assert isinstance(batch, list) and [r.index for r in batch] == [0, 1, 2]
    assert [r.token_ids for r in batch] == [r.token_ids for r in single] == [r.token_ids for r in plain]
    assert [r.text for r in batch] == [r.text for r in single]
    assert len(batch[1].token_ids) == free.index(eos) + 1 < 20 and batch[1].stats.stop_reasons[1] == "eos"
    assert batch[0].stats is batch[2].stats and batch[0].stats.batch_size == 3


def test_stream_a_list_tags_chunks_with_their_prompt(tiny_dyntree):
    prompts = ["w5 w6 w7", "w40 w41 w42 w43 w44 w45 w46"]
    results = tiny_dyntree.generate(prompts, max_new_tokens=12, chat=False, stop_at_eos=False)
    stats = []
    chunks = list(tiny_dyntree.stream(prompts, max_new_tokens=12, chat=False, stop_at_eos=False, stats_out=stats))
    for b, result in enumerate(results):
        mine = [c for c in chunks if c.index == b]
        assert [t for c in mine for t in c.token_ids] == result.token_ids
        assert "".join(c.text for c in mine) == result.text
    assert {c.index for c in chunks} == {0, 1} and stats[0].batch_size == 2
    one = list(tiny_dyntree.stream(prompts[0], max_new_tokens=12, chat=False, stop_at_eos=False))
    assert all(c.index == 0 for c in one) and [t for c in one for t in c.token_ids] == results[0].token_ids


def test_sampling_a_batch_is_reproducible_with_a_seed(tiny_dyntree):
    prompts = ["w5 w6 w7", "w40 w41 w42"]
    sampling = SamplingConfig.from_options(temperature=0.9, seed=11)
    first = tiny_dyntree.generate(prompts, max_new_tokens=15, chat=False, sampling=sampling)
    again = tiny_dyntree.generate(prompts, max_new_tokens=15, chat=False, sampling=sampling)
    other = tiny_dyntree.generate(prompts, max_new_tokens=15, chat=False,
                                  sampling=SamplingConfig.from_options(temperature=0.9, seed=12))
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    assert [r.token_ids for r in first] != [r.token_ids for r in other]


def test_prompt_lists_and_bad_input(tiny_dyntree):
    from dyntree.api import is_prompt_list
    from dyntree.errors import DynTreeError

    assert not is_prompt_list("text") and not is_prompt_list([1, 2, 3])
    assert not is_prompt_list([{"role": "user", "content": "hi"}])
    assert is_prompt_list(["a", "b"]) and is_prompt_list([[1, 2], [3]]) and is_prompt_list([[{"role": "user"}]])
    with pytest.raises(DynTreeError, match="no prompt"):
        tiny_dyntree.generate([])
    with pytest.raises(DynTreeError, match="empty prompt"):
        tiny_dyntree.generate(["w5", ""], chat=False)


def test_float16_is_a_dtype_and_batches_stay_exact_in_it(tiny_model_dir):
    from dyntree.api import DynTree
    from dyntree.precision import resolve_dtype

    assert resolve_dtype("fp16") is torch.float16 and resolve_dtype(torch.float16) is torch.float16
    dt = DynTree.from_pretrained(str(tiny_model_dir), heads="random", tree="static", dtype="float16")
    assert dt.model.backbone.dtype is torch.float16
    prompts = ["w5 w6 w7", "w40 w41 w42 w43"]
    batch = dt.generate(prompts, max_new_tokens=10, chat=False, stop_at_eos=False)
    plain = [dt.with_tree("ar").generate(p, max_new_tokens=10, chat=False, stop_at_eos=False) for p in prompts]
    assert [r.token_ids for r in batch] == [r.token_ids for r in plain]


def test_prepare_measures_a_batch_size_before_any_step(tiny):  # noqa: F811
    measured = []

    def measure(batch):
        measured.append(batch)
        return LatencyModel([1, 16], [0.01, 0.0101]), 0.011

    proposer = DynamicTreeProposer(4, topk=6, size=8, latency=BatchLatency({}, measure=measure))
    proposer.prepare(3)
    proposer.prepare(3)
    assert measured == [3]
    RootOnlyProposer().prepare(3)  # the contract's default: nothing to do


def test_a_machine_sized_tree_is_sized_again_per_batch_size(tiny_dyntree, tmp_path, monkeypatch):
    """With a heads profile the default tree's size comes from this machine; a batch gets the size (or plain
    decoding) that its own measured step latency favours, and stays token-exact."""
    from dyntree.api import DynTree
    from dyntree.config import TreeConfig
    from dyntree.proposers import RootOnlyProposer
    from dyntree.trees.sizing import TreeProfile

    monkeypatch.setenv("DYNTREE_CACHE", str(tmp_path))  # latency measured here, not in the user's cache
    policy = {k: v for k, v in TreeConfig.parse("dynamic").settings().items() if k != "size"}
    profile = TreeProfile({2: 1.02, 4: 1.03, 8: 1.04}, policy)  # barely better than plain: batches go plain
    dt = DynTree._build(tiny_dyntree.model, tiny_dyntree.heads, "random", TreeConfig.parse("dynamic"), profile)
    assert dt.machine_sized
    single = dt.proposer_for_batch(1)  # batch 1 too: the tree, or plain decoding where that measures faster
    nodes = dt.nodes_for_batch(1)
    assert single is dt.proposer_for_batch(1)
    assert isinstance(single, RootOnlyProposer) if nodes == 1 else single.max_nodes == min(nodes, dt.proposer.max_nodes)
    batched = dt.proposer_for_batch(4)
    assert batched is dt.proposer_for_batch(4)  # chosen once per batch size
    assert isinstance(batched, RootOnlyProposer) or batched.max_nodes <= dt.proposer.max_nodes
    prompts = ["w5 w6 w7", "w40 w41 w42 w43 w44", [9, 10, 11], "w8 w9"]
    together = dt.generate(prompts, max_new_tokens=12, chat=False, stop_at_eos=False)
    alone = [dt.with_tree("ar").generate(p, max_new_tokens=12, chat=False, stop_at_eos=False) for p in prompts]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    fixed = DynTree._build(tiny_dyntree.model, tiny_dyntree.heads, "random", TreeConfig.parse("dynamic", 4), profile)
    assert not fixed.machine_sized and fixed.proposer_for_batch(4) is fixed.proposer  # a size the user set stays
