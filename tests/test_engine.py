"""Continuous batching (`dyntree.engine.BatchEngine`) driven step by step, without HTTP, on tiny models."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from conftest import tiny_hf_model, write_tiny_model_dir
from dyntree.api import DynTree
from dyntree.decoding import Decoder
from dyntree.engine import BatchEngine, EngineRefusal, EngineRequest, default_tree_size_for, on_own_thread
from dyntree.errors import DynTreeError
from dyntree.proposers import Proposal, Proposer
from dyntree.sampling import GREEDY, SamplingConfig
from dyntree.trees import buffers_from_parents


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny-engine"), tiny_hf_model(seed=3))


@pytest.fixture(scope="module")
def dt(tiny_dir):
    return DynTree.from_pretrained(str(tiny_dir), heads="random", tree="dynamic", dtype="float32")


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 128) for _ in range(rng.randrange(3, 40))] for _ in range(count)]


def plain(dt: DynTree, prompt: list[int], max_new: int) -> list[int]:
    """Plain greedy decoding of one prompt alone: the reference every greedy answer must equal."""
    return Decoder(dt.model.backbone).run([prompt], max_new).consume().tokens[0]


class Collector:
    """A request's sink: the events the engine sends, in order."""

    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)

    @property
    def done(self):
        return next((e[1] for e in self.events if e[0] == "done"), None)

    @property
    def error(self):
        return next((e[1] for e in self.events if e[0] == "error"), None)

    @property
    def ended(self) -> bool:
        return any(e[0] in ("done", "error", "cancelled") for e in self.events)


def request(prompt, max_tokens, sampling=GREEDY, **kw) -> tuple[EngineRequest, Collector]:
    sink = Collector()
    return EngineRequest(list(prompt), max_tokens, sampling, sink, **kw), sink


def drain(engine: BatchEngine, sinks, limit: int = 5000) -> None:
    for _ in range(limit):
        if all(s.ended for s in sinks):
            return
        engine.step()
    raise AssertionError("requests did not finish")


class OracleProposer(Proposer):
    """Trees that hold each row's true continuation (read from its context) as a chain of random depth, with
    decoy siblings, padded with decoys to one node count per step: so that batched trees accept several
    tokens per pass (random heads on a tiny model almost never do), with a different tree in every row."""

    uses_heads = False
    uses_context = True
    topk = 0

    def __init__(self, references: dict[tuple, list[int]], max_nodes: int, seed: int):
        self.references = references
        self.nodes = max_nodes
        self.rng = random.Random(seed)
        self.name = f"oracle{max_nodes}"

    @property
    def max_nodes(self) -> int:
        return self.nodes

    def propose(self, root, head_ids=None, head_probs=None, context=None) -> Proposal:
        width = self.rng.randint(1, self.nodes)
        all_parents, all_tokens = [], []
        for b, ctx in enumerate(context):
            prompt = next(p for p in self.references if tuple(ctx[: len(p)]) == p)
            truth = self.references[prompt]
            at = len(ctx) - len(prompt) - 1  # the root's index in the reference continuation
            parents, tokens, current = [-1], [int(root[b])], 0
            for depth in range(1, width):
                if at + depth < len(truth) and len(tokens) < width and self.rng.random() < 0.8:
                    parents.append(current)
                    tokens.append(truth[at + depth])
                    current = len(tokens) - 1
                while len(tokens) < width and self.rng.random() < 0.5:
                    parents.append(current)
                    tokens.append(self.rng.randrange(3, 128))  # a decoy (may equal the truth: then it is one)
            while len(tokens) < width:
                parents.append(self.rng.randrange(len(tokens)))
                tokens.append(self.rng.randrange(3, 128))
            all_parents.append(parents)
            all_tokens.append(tokens)
        parents = torch.tensor(all_parents)
        return Proposal(torch.tensor(all_tokens), buffers_from_parents(parents, width))


def test_greedy_answers_in_a_changing_batch_equal_solo_answers(dt):
    """Requests with different prompts, lengths and tree sizes join and leave a batch of 3 rows (so rows are
    refilled and moved); every answer equals plain greedy decoding of that prompt alone."""
    backbone = dt.model.backbone
    ps = prompts(7, seed=1)
    lengths = [5, 40, 17, 1, 33, 24, 60]
    refs = {tuple(p): plain(dt, p, n) for p, n in zip(ps, lengths)}
    small, large = (DynTree(dt.model, None, "oracle"), DynTree(dt.model, None, "oracle"))
    small.proposer = OracleProposer(refs, 4, seed=1)
    large.proposer = OracleProposer(refs, 9, seed=2)
    engine = BatchEngine(dt, max_batch=3, max_queue=8)
    engine.tree_for = lambda fields: {"small": small, "large": large}.get(fields.get("tree"), dt)
    sinks = []
    for i, (p, n) in enumerate(zip(ps, lengths)):
        req, sink = request(p, n, tree_fields={"tree": ["small", "large", "ar"][i % 3]})
        engine.submit(req)
        sinks.append(sink)
        if i == 1:  # a sampled request in the mix: verified alone, it must not disturb the greedy rows
            sampled, sampled_sink = request(ps[0], 50, SamplingConfig(temperature=1.0, seed=3),
                                            tree_fields={"tree": "large"})
            engine.submit(sampled)
    seen_batches = set()
    for _ in range(2000):
        if all(s.ended for s in sinks + [sampled_sink]):
            break
        engine.step()
        seen_batches.add(engine.batch_size)
    assert {2, 3} <= seen_batches
    for p, n, sink in zip(ps, lengths, sinks):
        outcome = sink.done
        assert outcome is not None, sink.events
        assert outcome.token_ids == refs[tuple(p)]
        streamed = [t for e in sink.events if e[0] == "text" for t in e[2]]
        assert streamed == outcome.token_ids[: len(streamed)]
    assert sampled_sink.done is not None and sampled_sink.done.stats["acceptance"].startswith("lossless")
    multi = [s.done.stats for s in sinks if s.done.stats["tree"].startswith("oracle")]
    assert max(s["mean_accepted_per_pass"] for s in multi) > 1.5  # the trees did get accepted
    assert backbone.config.eos_token_ids  # (the tiny model can stop early: the references stop there too)


def test_real_trees_in_a_batch_equal_solo_and_the_node_budget_hook(dt):
    """The server's own trees (random heads) batched: greedy answers equal solo; a hook that asks for plain
    decoding at 2+ rows gives the same answers with one node per row."""
    ps = prompts(4, seed=2)
    refs = [plain(dt, p, 20) for p in ps]
    for hook, fields in ((None, [{}, {"tree": "static"}, {"tree": "ar"}, {"tree": "dynamic", "tree_size": 5}]),
                         (lambda batch: 1 if batch >= 2 else None, [{}] * 4),
                         (lambda batch: 3, [{"tree": "static"}, {}] * 2)):
        engine = BatchEngine(dt, max_batch=4, tree_size_for=hook)
        sinks = []
        for p, f in zip(ps, fields):
            req, sink = request(p, 20, tree_fields=f)
            engine.submit(req)
            sinks.append(sink)
        drain(engine, sinks)
        assert [s.done.token_ids for s in sinks] == refs
        if hook is not None:
            budget = hook(4)
            assert all(s.done.stats["mean_tree_size"] <= budget for s in sinks)


def test_static_trees_over_hydra_heads_in_a_batch_equal_solo(dt):
    """Path-conditional heads in the server's batches: static trees (whole, and cut to a node budget) beside
    dynamic ones give every request plain greedy decoding's tokens."""
    from dyntree.heads import HydraHeads

    hydra = DynTree(dt.model, HydraHeads.random(dt.model.config, num_heads=4, scale=0.2), "note", tree="static")
    ps = prompts(3, seed=4)
    refs = [plain(dt, p, 20) for p in ps]
    for hook in (None, lambda batch: 5):
        engine = BatchEngine(hydra, max_batch=3, tree_size_for=hook)
        sinks = []
        for p, f in zip(ps, [{}, {"tree": "static"}, {"tree": "dynamic", "tree_size": 6}]):
            req, sink = request(p, 20, tree_fields=f)
            engine.submit(req)
            sinks.append(sink)
        drain(engine, sinks)
        assert [s.done.token_ids for s in sinks] == refs


def test_default_node_budget_turns_trees_off_for_large_batches():
    assert default_tree_size_for(1) is None and default_tree_size_for(7) is None
    assert default_tree_size_for(8) == 1 and default_tree_size_for(64) == 1


def test_seeded_sampling_alone_equals_the_library_and_beside_others_with_plain_decoding(dt):
    prompt = prompts(1, seed=4)[0]
    cfg = SamplingConfig(temperature=1.3, seed=11, top_k=40)
    solo = dt.generate(prompt, 24, sampling=cfg).token_ids
    engine = BatchEngine(dt, max_batch=4)
    req, sink = request(prompt, 24, cfg)
    engine.submit(req)
    drain(engine, [sink])
    assert sink.done.token_ids == solo
    # Beside greedy and other sampled requests, plain decoding draws the same tokens (rows are independent).
    ar = dt.with_tree("ar")
    ar_solo = ar.generate(prompt, 24, sampling=cfg).token_ids
    engine = BatchEngine(ar, max_batch=4)
    others = [request(p, 30, s) for p, s in zip(prompts(3, seed=5), (GREEDY, SamplingConfig(temperature=0.8, seed=1),
                                                                     GREEDY))]
    req, sink = request(prompt, 24, cfg)
    for r, _ in others[:2]:
        engine.submit(r)
    engine.step()
    engine.submit(req)
    engine.submit(others[2][0])
    drain(engine, [sink] + [s for _, s in others])
    assert sink.done.token_ids == ar_solo


def test_a_full_queue_is_refused_with_429_and_a_retry_hint(dt):
    engine = BatchEngine(dt, max_batch=2, max_queue=1)
    for p in prompts(3, seed=6):
        engine.submit(request(p, 8)[0])
    with pytest.raises(EngineRefusal) as refused:
        engine.submit(request([5, 6, 7], 8)[0])
    assert refused.value.status == 429 and refused.value.retry_after >= 1
    engine.step()  # two are admitted, one waits: still full
    assert engine.batch_size == 2 and engine.queue_depth == 1
    with pytest.raises(EngineRefusal):
        engine.submit(request([5, 6, 7], 8)[0])
    for _ in range(40):  # 8 tokens each: rows free up, and the queue with them
        engine.step()
    engine.submit(request([5, 6, 7], 8)[0])


def test_cancelled_requests_leave_at_the_next_step(dt):
    engine = BatchEngine(dt, max_batch=2, max_queue=4)
    (a, sa), (b, sb), (c, sc) = (request(p, 200) for p in prompts(3, seed=7))
    ha, _, hc = engine.submit(a), engine.submit(b), engine.submit(c)
    engine.step()
    assert engine.batch_size == 2 and engine.queue_depth == 1
    ha.cancel()
    hc.cancel()  # still queued: dropped without ever taking a row
    engine.step()
    assert engine.batch_size == 1 and engine.queue_depth == 0
    assert sa.events[-1] == ("cancelled",) and sc.events == [("cancelled",)]
    assert not sb.ended


def test_timeouts_end_requests_with_a_504(dt):
    engine = BatchEngine(dt, max_batch=1, max_queue=4)
    (a, sa), (b, sb) = request([5, 6, 7], 300, timeout=0.05), request([8, 9], 300, timeout=0.05)
    engine.submit(a)
    engine.submit(b)
    engine.step()
    time.sleep(0.06)
    engine.step()
    assert engine.batch_size == 0 and engine.queue_depth == 0
    for sink in (sa, sb):
        assert isinstance(sink.error, EngineRefusal) and sink.error.status == 504 and "timeout" in str(sink.error)


def test_shutdown_refuses_new_work_and_fails_the_rest_cleanly(dt):
    engine = BatchEngine(dt, max_batch=1, max_queue=4).start()
    (a, sa), (b, sb) = request([5, 6, 7], 400), request([8, 9], 400)
    engine.submit(a)
    engine.submit(b)
    engine.stop_accepting()
    with pytest.raises(EngineRefusal) as refused:
        engine.submit(request([1, 2], 4)[0])
    assert refused.value.status == 503
    engine.close(grace=0.0)
    for sink in (sa, sb):
        assert sink.ended
        if sink.error is not None:
            assert sink.error.status == 503 and "shutting down" in str(sink.error)


def test_background_thread_finishes_accepted_work_on_close(dt):
    engine = BatchEngine(dt, max_batch=2, max_queue=4).start()
    sinks = []
    for p in prompts(3, seed=8):
        req, sink = request(p, 6)
        engine.submit(req)
        sinks.append(sink)
    engine.close(grace=30.0)
    assert all(s.done is not None for s in sinks)


def test_bad_requests_are_refused_before_queueing(dt):
    engine = BatchEngine(dt, max_batch=1, max_seq_len=64)
    with pytest.raises(Exception, match="context"):
        engine.submit(request(list(range(3, 60)), 10)[0])
    with pytest.raises(Exception, match="max_tokens"):
        engine.submit(request([5], 0)[0])
    req, sink = request([5, 6], 4, tree_fields={"tree": "dynamic", "tree_size": 200, "topk": 2})
    engine.submit(req)
    engine.step()
    assert sink.error is not None and "exceeds" in str(sink.error)


@pytest.mark.slow
def test_default_model_batched_greedy_answers_equal_solo_answers():
    """The real model and bundled heads, its default dynamic tree: four chat prompts decoded together (then
    three, two, one as they finish) give plain greedy decoding's tokens, and the heads do get accepted."""
    dt = DynTree.from_pretrained("default")
    texts = ["Name three colours of the rainbow.", "What is the capital of France? Explain briefly.",
             "Write a haiku about the sea.", "Give two tips for learning to cook."]
    ids = [dt.encode(t) for t in texts]
    lengths = [20, 48, 33, 40]
    engine = BatchEngine(dt, max_batch=4)
    sinks = []
    for p, n in zip(ids, lengths):
        req, sink = request(p, n)
        engine.submit(req)
        sinks.append(sink)
    drain(engine, sinks)
    for p, n, sink in zip(ids, lengths, sinks):
        assert sink.done.token_ids == plain(dt, p, n)
    assert max(s.done.stats["mean_accepted_per_pass"] for s in sinks) > 1.2


def test_a_request_filling_the_context_gets_all_its_tokens(dt):
    """Prompt + max_tokens = the whole context, beside a request with a 63-node tree: near the end the trees
    no longer fit, the step falls back to plain decoding, and the answer is still plain decoding's, in full."""
    context = dt.model.config.max_position_embeddings
    prompt = prompts(1, seed=9)[0]
    n = context - len(prompt)
    engine = BatchEngine(dt, max_batch=2)
    (a, sa), (b, sb) = request(prompt, n, tree_fields={"tree": "static"}), request([5, 6, 7], 30)
    engine.submit(a)
    engine.submit(b)
    drain(engine, [sa, sb])
    reference = plain(dt, prompt, n)
    assert len(reference) == n  # no end of sequence before the context's end: the test reaches it
    assert sa.done.token_ids == reference
    assert sb.done.token_ids == plain(dt, [5, 6, 7], 30)


def test_early_pruning_applies_when_every_row_shares_the_tree(tiny_dir):
    """ProPD early pruning (`early_prune="LAYER:K"`) on a batch: greedy answers stay plain decoding's."""
    pruned = DynTree.from_pretrained(str(tiny_dir), heads="random", tree="dynamic", dtype="float32",
                                     early_prune="1:2")
    assert pruned.pruner is not None
    ps = prompts(3, seed=10)
    engine = BatchEngine(pruned, max_batch=3)
    calls = []
    forward = pruned.pruner.forward
    pruned.pruner.forward = lambda *a, **kw: calls.append(1) or forward(*a, **kw)
    sinks = []
    for p in ps:
        req, sink = request(p, 25)
        engine.submit(req)
        sinks.append(sink)
    drain(engine, sinks)
    for p, sink in zip(ps, sinks):
        assert sink.done.token_ids == plain(pruned, p, 25)
        assert sink.done.stats["tree"].endswith(":prune1:2")
        figures = sink.done.stats["early_prune"]
        assert (figures["layer"], figures["k"]) == (1, 2) and 0 <= figures["pruned_share"] <= 1
    assert calls  # the pruned pass did run


def test_work_on_its_own_thread_returns_its_result_or_raises_and_leaves_no_thread():
    """`on_own_thread`: the serve command loads there so that no OpenMP pool outlives it (see its docstring)."""
    before = threading.active_count()
    seen = []
    assert on_own_thread(lambda: seen.append(threading.current_thread().name) or 42) == 42
    assert seen == ["dyntree-load"]
    with pytest.raises(DynTreeError, match="bad model"):
        on_own_thread(lambda: (_ for _ in ()).throw(DynTreeError("bad model")))
    assert threading.active_count() == before
