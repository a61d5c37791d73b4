"""EAGLE-style feature drafter: drafts equal a brute-force recomputation over the whole feature sequence,
decoding stays token-exact (batch 1 and > 1), save/load, bad checkpoints, training lowers the loss."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from dyntree.config import TreeConfig
from dyntree.decoding import Decoder
from dyntree.eagle import EagleDraft, EagleHeads
from dyntree.errors import DynTreeError
from dyntree.heads import HEADS_CONFIG, HEADS_FILE, MedusaHeads
from dyntree.interop import load_heads
from dyntree.proposers import build_proposer
from dyntree.trees.conditional import select_by_depth


def backbone_states(backbone, tokens: list[int]) -> torch.Tensor:
    """The backbone's normed state at every position of `tokens` `[T, H]` (f_t guesses token t+1)."""
    cache = backbone.new_cache(1, len(tokens) + 1)
    return backbone.forward(torch.tensor([tokens]), cache)[0]


def brute_force_children(heads, backbone, states, tokens, root, path, topk):
    """Children of the node `path` below `root`, recomputing the drafter over the full pair sequence at every
    depth: context pairs (f_t, token t+1), then the drafter's own output features along the path."""
    features = [s for s in states]
    next_ids = list(tokens[1:]) + [root]
    with torch.no_grad():
        for token in path:
            out = heads.sequence_features(torch.stack(features)[None], torch.tensor([next_ids]),
                                          backbone.embed_tokens)[0]
            features.append(out[-1])
            next_ids.append(token)
        out = heads.sequence_features(torch.stack(features)[None], torch.tensor([next_ids]), backbone.embed_tokens)
        probs, ids = torch.softmax(heads.feature_logits(out[0, -1], backbone.lm_head.weight_t), -1).topk(topk)
    return ids.tolist(), probs.tolist()


def test_drafts_equal_brute_force_over_the_feature_sequence(tiny_backbone):
    """Rows of different lengths: `start` over the prompts, one `advance` of accepted pairs, then every node the
    depth-by-depth tree reaches has the children a from-scratch causal pass over its features gives."""
    heads = EagleHeads.random(tiny_backbone.config, num_heads=3, scale=0.3, seed=2)
    gen = torch.Generator().manual_seed(3)
    sequences = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (9, 14)]
    prompt_lens, accepted = [4, 7], [3, 2]
    states = [backbone_states(tiny_backbone, s) for s in sequences]
    state = heads.new_state(2, 32)
    hidden = torch.zeros(2, max(prompt_lens), tiny_backbone.config.hidden_size)
    for b, n in enumerate(prompt_lens):
        hidden[b, :n] = states[b][:n]
    prompts = [s[:n] for s, n in zip(sequences, prompt_lens)]
    heads.start(state, tiny_backbone, hidden, prompts, torch.tensor([s[n] for s, n in zip(sequences, prompt_lens)]))
    features = [states[b][n : n + a] for b, (n, a) in enumerate(zip(prompt_lens, accepted))]
    heads.advance(state, tiny_backbone, features,
                  [sequences[b][n + 1 : n + a + 1] for b, (n, a) in enumerate(zip(prompt_lens, accepted))])
    held = [n + a for n, a in zip(prompt_lens, accepted)]
    assert state.lengths.tolist() == held
    roots = torch.tensor([sequences[b][held[b]] for b in range(2)])
    topk = 3
    draft = heads.draft(tiny_backbone, torch.zeros(2, 64), roots, topk, state)
    chosen = select_by_depth(draft.expand, 2, 10, heads.num_heads)
    checked = 0
    for b in range(2):
        context = sequences[b][: held[b]]
        for path in [()] + [p for p, _ in chosen[b] if len(p) < heads.num_heads]:
            want_ids, want_probs = brute_force_children(heads, tiny_backbone, states[b][: held[b]], context,
                                                        int(roots[b]), path, topk)
            got = draft.expand([(b, path)])
            assert [t for t, _ in got[0]] == want_ids
            assert [p for _, p in got[0]] == pytest.approx(want_probs, rel=1e-4, abs=1e-6)
            checked += 1
    assert checked >= 4


def test_eagle_drafts_through_the_one_contract(tiny_backbone):
    """rows, rank_of, grow, and drafting without a state (a latency measurement's), like every head type."""
    heads = EagleHeads.random(tiny_backbone.config, num_heads=3, scale=0.3)
    hidden = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    root = torch.tensor([4, 8, 15])
    draft = heads.draft(tiny_backbone, hidden, root, 4)
    assert isinstance(draft, EagleDraft) and draft.ids is None
    whole = draft.expand([(1, ()), (2, ())])
    alone = draft.rows(2, 3).expand([(0, ())])
    assert [t for t, _ in alone[0]] == [t for t, _ in whole[1]]
    first = whole[1][1][0]
    assert draft.rank_of(2, (first,))[0] == 1
    deeper = draft.expand([(2, (first,))])
    assert len(deeper[0]) == 4
    heads.draft(tiny_backbone, hidden, root, 4).grow(6)
    assert MedusaHeads.random(tiny_backbone.config).new_state(3, 8) is None  # stateless heads: hooks are no-ops


@pytest.mark.parametrize("prompts", [[[1, 5, 6, 7, 8, 9]], [[1, 5, 6, 7, 8], [1, 9, 10], [1, 20, 21, 22, 23, 24, 25]]])
@pytest.mark.parametrize("tree", ["dynamic", "static"])
def test_eagle_decoding_is_token_exact(tiny_backbone, prompts, tree):
    heads = EagleHeads.random(tiny_backbone.config, num_heads=3, scale=0.3, seed=1)
    config = TreeConfig(kind="dynamic", size=10, topk=3) if tree == "dynamic" else TreeConfig(
        kind="static", static_tree=[[0], [1], [0, 0], [0, 1], [0, 0, 0]])
    proposer = build_proposer(config, heads.num_heads, conditional=heads.conditional)
    plain = Decoder(tiny_backbone).run(prompts, 24, stop_at_eos=False).consume().tokens
    run = Decoder(tiny_backbone, heads, proposer).run(prompts, 24, stop_at_eos=False).consume()
    assert run.tokens == plain


def test_a_drafter_that_learnt_the_backbone_gets_tokens_accepted(tiny_backbone):
    """Training a few hundred steps on the backbone's own greedy text makes trees accept more than one token
    a step, still token-exact: the state and the tree drafting line up with what the drafter was trained on."""
    from dyntree.training.eagle import EagleObjective

    prompt = [1, 5, 6, 7, 8]
    plain = Decoder(tiny_backbone).run([prompt], 60, stop_at_eos=False).consume().tokens[0]
    tokens = prompt + plain
    states = backbone_states(tiny_backbone, tokens)
    torch.manual_seed(0)
    heads = EagleHeads.for_backbone(tiny_backbone.config, depth=3).init_weights(seed=0)
    objective = EagleObjective(heads, tiny_backbone.lm_head.weight_t.float(), tiny_backbone.embed_tokens.float())
    optimizer = torch.optim.AdamW(heads.parameters(), lr=3e-3)
    features, next_ids = states[None, :-1], torch.tensor([tokens[1:]])
    lengths = torch.tensor([len(tokens) - 1])
    for _ in range(150):
        loss, _ = objective(features, next_ids, lengths)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    proposer = build_proposer(TreeConfig(kind="dynamic", size=8, topk=3, lookup=0, recycle=0), 3, conditional=True)
    run = Decoder(tiny_backbone, heads, proposer).run([prompt], 60, stop_at_eos=False).consume()
    assert run.tokens[0] == plain
    assert run.stats.mean_accepted_per_pass > 1.5
    # Offline replay on the recorded continuation (states of every position) accepts what decoding accepted.
    from dyntree.eval.replay import replay, with_states

    record = with_states([{"tokens": tokens, "prompt_len": len(prompt)}], tiny_backbone)[0]
    make = lambda: build_proposer(TreeConfig(kind="dynamic", size=8, topk=3, lookup=0, recycle=0), 3,  # noqa: E731
                                  conditional=True)
    assert replay(make(), record, heads=heads, backbone=tiny_backbone).accepted_lengths == run.stats.accepted_lengths
    with pytest.raises(ValueError, match="states"):
        replay(make(), {"tokens": tokens, "prompt_len": len(prompt), "hidden": record["hidden"]}, heads=heads,
               backbone=tiny_backbone)
    # Per-depth logits along the sequence: depth 1 of the step with root j is the draft's first guess there.
    logits = heads.logits_along(tiny_backbone, record["states"], torch.tensor(tokens), len(prompt))
    assert logits.shape[:2] == (len(plain), 3)
    draft = heads.draft_along(tiny_backbone, record["states"], torch.tensor(tokens), len(prompt), 1)
    k = 5
    first = draft.rows(k, k + 1).expand([(0, ())])[0][0][0]
    assert int(logits[k, 0].argmax()) == first
    second = draft.rows(k, k + 1).expand([(0, (tokens[len(prompt) + k + 1],))])[0][0][0]
    assert int(logits[k, 1].argmax()) == second


def test_eagle_round_trip(tmp_path, tiny_backbone):
    heads = EagleHeads.random(tiny_backbone.config, num_heads=3, scale=0.3)
    heads.save(tmp_path)
    meta = json.loads((tmp_path / HEADS_CONFIG).read_text())
    assert meta["head_type"] == "eagle" and meta["drafter"]["num_kv_heads"] == 2
    loaded = load_heads(tmp_path, tiny_backbone.config)
    assert isinstance(loaded, EagleHeads)
    for (name, p), (_, q) in zip(heads.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p, q), name
    hidden, root = torch.randn(2, 64, generator=torch.Generator().manual_seed(0)), torch.tensor([3, 4])
    a = heads.draft(tiny_backbone, hidden, root, 5).expand([(0, ()), (1, ())])
    b = loaded.draft(tiny_backbone, hidden, root, 5).expand([(0, ()), (1, ())])
    assert a == b


def test_default_model_sized_drafter_is_small():
    """SmolLM2-135M's shape: hidden 576, 9 heads of 64 (3 key/value heads), MLP 1536, vocab 49152."""
    config = SimpleNamespace(hidden_size=576, vocab_size=49152, model_type="llama", num_heads=9, num_kv_heads=3,
                             head_dim=64, intermediate_size=1536, rms_norm_eps=1e-5)
    heads = EagleHeads.for_backbone(config, depth=4)
    size = sum(p.numel() for p in heads.parameters()) * 4
    assert size < 18 * 2**20  # fp32, lm_head shared (never stored)


def test_bad_eagle_checkpoints_are_one_line_errors(tmp_path, tiny_backbone):
    from safetensors.torch import load_file, save_file

    heads = EagleHeads.random(tiny_backbone.config, num_heads=2)
    heads.save(tmp_path)
    tensors = load_file(str(tmp_path / HEADS_FILE))
    broken = dict(tensors)
    del broken["q_weight"]
    save_file(broken, str(tmp_path / HEADS_FILE))
    with pytest.raises(DynTreeError, match="q_weight is missing") as err:
        load_heads(tmp_path, tiny_backbone.config)
    assert "\n" not in str(err.value)
    broken = dict(tensors, down_weight=torch.zeros(3, 3))
    save_file(broken, str(tmp_path / HEADS_FILE))
    with pytest.raises(DynTreeError, match="down_weight is \\(3, 3\\)"):
        load_heads(tmp_path, tiny_backbone.config)
    save_file(tensors, str(tmp_path / HEADS_FILE))
    meta = json.loads((tmp_path / HEADS_CONFIG).read_text())
    del meta["drafter"]["head_dim"]
    (tmp_path / HEADS_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(DynTreeError, match="lacks the drafter layer's head_dim") as err:
        load_heads(tmp_path, tiny_backbone.config)
    assert "\n" not in str(err.value)
    meta["drafter"] = "nonsense"
    (tmp_path / HEADS_CONFIG).write_text(json.dumps(meta))
    with pytest.raises(DynTreeError, match="corrupt heads checkpoint"):
        load_heads(tmp_path, tiny_backbone.config)


def test_objective_matches_brute_force_and_a_few_steps_lower_it(tiny_backbone):
    """The loss is CE against the backbone's own next choice + w * smooth L1 to its next feature, position by
    position; a few optimiser steps on a tiny model lower it."""
    from dyntree.training.eagle import EagleObjective

    gen = torch.Generator().manual_seed(5)
    sequences = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (12, 8)]
    states = [backbone_states(tiny_backbone, s) for s in sequences]
    features = torch.zeros(2, 11, 64)
    next_ids = torch.zeros(2, 11, dtype=torch.long)
    for b, s in enumerate(sequences):
        features[b, : len(s) - 1] = states[b][:-1]
        next_ids[b, : len(s) - 1] = torch.tensor(s[1:])
    lengths = torch.tensor([11, 7])
    heads = EagleHeads.for_backbone(tiny_backbone.config, depth=2).init_weights(seed=0)
    lm, embed = tiny_backbone.lm_head.weight_t.float(), tiny_backbone.embed_tokens.float()
    objective = EagleObjective(heads, lm, embed, feature_loss=2.0)
    loss, stats = objective(features, next_ids, lengths)
    ce, l1 = [], []
    with torch.no_grad():
        for b in range(2):
            n = int(lengths[b])
            out = heads.sequence_features(features[b : b + 1, :n], next_ids[b : b + 1, :n], embed)[0]
            for t in range(n - 1):
                target = int((features[b, t + 1] @ lm).argmax())
                ce.append(-torch.log_softmax(out[t] @ lm, -1)[target])
                l1.append(torch.nn.functional.smooth_l1_loss(out[t], features[b, t + 1], reduction="none"))
    want = torch.stack(ce).mean() + 2.0 * torch.cat(l1).mean()
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5)
    assert stats.tolist()[0][0] == 16
    optimizer = torch.optim.AdamW(heads.parameters(), lr=3e-3)
    first = float(loss.detach())
    for _ in range(40):
        loss, _ = objective(features, next_ids, lengths)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(objective(features, next_ids, lengths)[0].detach()) < 0.8 * first


def test_objective_over_a_vocabulary_subset_scores_choices_inside_it(tiny_backbone):
    """With a vocabulary subset the drafter's logits cover the subset only: the loss is CE over it against the
    given choices that fall inside (others are misses, out of the loss), brute force position by position."""
    from dyntree.training.eagle import EagleObjective, subset_of_choices

    gen = torch.Generator().manual_seed(6)
    tokens = torch.randint(3, 128, (14,), generator=gen)
    states = backbone_states(tiny_backbone, tokens.tolist())
    features, next_ids = states[None, :-1], tokens[None, 1:]
    choices = torch.randint(3, 40, (1, 13), generator=gen)
    vocab, coverage = subset_of_choices([(None, None, choices[0])], tiny_backbone.config.vocab_size, 8)
    assert vocab.numel() == 8 and 0 < coverage < 1
    base = EagleHeads.for_backbone(tiny_backbone.config, depth=2).init_weights(seed=0)
    heads = EagleHeads(base.config, vocab)
    heads.load_state_dict(base.state_dict())
    lm, embed = tiny_backbone.lm_head.weight_t.float(), tiny_backbone.embed_tokens.float()
    loss, stats = EagleObjective(heads, lm, embed)(features, next_ids, torch.tensor([13]), choices)
    with torch.no_grad():
        out = heads.sequence_features(features, next_ids, embed)[0]
    ce, hits, ids = [], 0, vocab.tolist()
    for t in range(12):
        target = int(choices[0, t + 1])
        logits = out[t] @ lm[:, vocab]
        if target in ids:
            ce.append(-torch.log_softmax(logits, -1)[ids.index(target)])
            hits += int(ids[int(logits.argmax())] == target)
    assert float(loss.detach()) == pytest.approx(float(torch.stack(ce).mean()), rel=1e-5)
    assert stats.tolist() == [[12, hits]]
    assert heads.local_ids(torch.tensor([ids[3], 127])).tolist() == [3, -1]


def test_unrolled_steps_are_the_drafts_decoding_makes(tiny_backbone):
    """Step k of the unrolled teacher-forced pass at position t is the depth-k node a draft at root t-k+2 makes
    along the true tokens (its chain of own features, the true context before it), for every t and k."""
    heads = EagleHeads.random(tiny_backbone.config, num_heads=3, scale=0.3, seed=8)
    gen = torch.Generator().manual_seed(9)
    tokens = torch.randint(3, 128, (15,), generator=gen)
    states = backbone_states(tiny_backbone, tokens.tolist())[:-1]  # f_0 .. f_13
    with torch.no_grad():
        outs = heads.unrolled_features(states[None], tokens[None, 1:], tiny_backbone.embed_tokens, 3)
    start = 2
    along = heads.logits_along(tiny_backbone, states, tokens, start)  # [roots, depth, V]
    lm = tiny_backbone.lm_head.weight_t
    checked = 0
    for k in (1, 2, 3):
        for t in range(k - 1, 13):
            root = t - k + 2
            if root < start or root - start >= along.shape[0]:
                continue
            want = along[root - start, k - 1]
            got = heads.feature_logits(outs[k - 1][0, t], lm)
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)  # other shapes: float noise only
            checked += 1
    assert checked >= 30


def test_unrolled_training_scores_every_step(tiny_backbone):
    from dyntree.training.eagle import EagleObjective

    tokens = torch.randint(3, 128, (12,), generator=torch.Generator().manual_seed(2))
    states = backbone_states(tiny_backbone, tokens.tolist())[:-1]
    heads = EagleHeads.for_backbone(tiny_backbone.config, depth=3).init_weights(seed=0)
    objective = EagleObjective(heads, tiny_backbone.lm_head.weight_t.float(), tiny_backbone.embed_tokens.float(),
                               steps=3, decay=0.5)
    loss, stats = objective(states[None], tokens[None, 1:], torch.tensor([11]))
    assert [int(n) for n, _ in stats.tolist()] == [10, 9, 8]  # step k needs t >= k - 1 and t + 1 < 11
    loss.backward()
    assert heads.q_weight.grad is not None and heads.q_weight.grad.abs().sum() > 0


def test_train_cli_eagle_end_to_end(tmp_path):
    """`dyntree distill` then `dyntree train --head-type eagle`: the saved drafter loads and decodes token-exact."""
    from dyntree.cli import main as cli_main
    from dyntree.loading import load_model

    from training_support import write_model_dir, write_prompt_file

    model_dir = write_model_dir(tmp_path / "model")
    prompts = write_prompt_file(tmp_path / "prompts.jsonl", 12)
    assert cli_main(["distill", "--model", str(model_dir), "--out", str(tmp_path / "data"), "--prompts",
                     str(prompts), "--max-new-tokens", "16", "--batch-size", "6", "--shard-size", "6",
                     "--dtype", "float32"]) == 0
    assert cli_main(["train", "--model", str(model_dir), "--data", str(tmp_path / "data"), "--out",
                     str(tmp_path / "eagle"), "--head-type", "eagle", "--num-heads", "3", "--epochs", "6",
                     "--batch-size", "64", "--lr", "3e-3", "--feature-loss", "1.0", "--val-fraction", "0.5", "--unroll", "2",
                     "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "eagle" / "training_report.json").read_text())
    assert report["data"]["sequences"] == 12 and report["validation"]["positions"] > 0
    history = report["history"]
    assert history[0]["step"] == 0 and history[-1]["loss"] < history[0]["loss"]  # better than untrained
    loaded = load_model(model_dir, weights="float32")
    heads = load_heads(tmp_path / "eagle", loaded.config)
    assert isinstance(heads, EagleHeads) and heads.num_heads == 3
    proposer = build_proposer(TreeConfig(kind="dynamic", size=8, topk=3), 3, conditional=True)
    ids = [[1, 9, 10, 11], [1, 30, 31]]
    plain = Decoder(loaded.backbone).run(ids, 16, stop_at_eos=False).consume().tokens
    assert Decoder(loaded.backbone, heads, proposer).run(ids, 16, stop_at_eos=False).consume().tokens == plain


def test_engine_batches_eagle_rows_token_exact_and_keeps_each_rows_drafter_state(tiny_model_dir):
    """The server's continuous batching with eagle heads: more requests than rows (rows retire and compact,
    new ones are admitted), mixed trees (groups draft from a selection of rows). Every answer equals plain
    greedy decoding, and at every step each row's drafter state is what a fresh start over its whole context
    gives (so compaction and growth moved the right rows)."""
    import random

    from dyntree.api import DynTree
    from dyntree.engine import BatchEngine, EngineRequest
    from dyntree.sampling import GREEDY

    base = DynTree.from_pretrained(str(tiny_model_dir), heads=None, tree="ar", dtype="float32")
    backbone = base.model.backbone
    heads = EagleHeads.random(backbone.config, num_heads=4, scale=0.3, seed=4)  # the static tree is 4 deep
    dt = DynTree(base.model, heads, "eagle (random)", tree="dynamic")
    rng = random.Random(7)
    ps = [[rng.randrange(3, 128) for _ in range(rng.randrange(3, 30))] for _ in range(5)]
    refs = [Decoder(backbone).run([p], 16).consume().tokens[0] for p in ps]
    engine = BatchEngine(dt, max_batch=3)
    sinks = []
    for p, fields in zip(ps, [{}, {"tree": "static"}, {}, {"tree": "dynamic", "tree_size": 5}, {"tree": "ar"}]):
        events = []
        engine.submit(EngineRequest(list(p), 16, GREEDY, events.append, tree_fields=fields))
        sinks.append(events)
    checked = 0
    for _ in range(500):
        if all(any(e[0] in ("done", "error") for e in s) for s in sinks):
            break
        engine.step()
        for b, row in enumerate(engine._rows):
            context = row.request.prompt_ids + row.tokens
            states = backbone_states(backbone, context[:-1])
            fresh = heads.new_state(1, 64)
            heads.start(fresh, backbone, states[None], [context[:-1]], torch.tensor([context[-1]]))
            held = len(context) - 1
            assert int(engine._drafter.lengths[b]) == held == int(engine._cache.lengths[b])
            torch.testing.assert_close(engine._drafter.last[b], fresh.last[0], atol=1e-3, rtol=1e-3)
            torch.testing.assert_close(engine._drafter.keys[b, :, :held], fresh.keys[0, :, :held], atol=1e-3,
                                       rtol=1e-3)  # batched vs one row: float noise only
            checked += 1
    assert all(any(e[0] == "done" for e in s) for s in sinks), [[str(e[1]) for e in s if e[0] == "error"] for s in sinks]
    answers = [next(e[1] for e in s if e[0] == "done").token_ids for s in sinks]
    assert answers == refs
    assert checked > 10
