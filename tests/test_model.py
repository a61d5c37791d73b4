"""The native backbone matches transformers' own model on the same weights (prefill and tree steps)."""

from __future__ import annotations

import pytest
import torch

from conftest import backbone_from_hf, tiny_hf_model
from dyntree.errors import DynTreeError
from dyntree.model import ModelConfig, attention_mask, causal_block
from dyntree.trees import StaticTree

VARIANTS = {
    "llama-untied-gqa": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-bias-mha": ("llama", {"attention_bias": True, "num_key_value_heads": 4}),
    "llama3-rope-scaling": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 64}}),
    "llama-linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "llama-mlp-bias": ("llama", {"mlp_bias": True, "attention_bias": True}),
    "qwen2-bias": ("qwen2", {}),
    "mistral": ("mistral", {"sliding_window": None}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_prefill_logits_match_transformers(variant):
    model_type, overrides = VARIANTS[variant]
    hf = tiny_hf_model(model_type, seed=1, **overrides)
    ours = backbone_from_hf(hf)
    ids = torch.randint(0, hf.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids).logits
    cache = ours.new_cache(2, 64)
    got = ours.logits(ours.forward(ids, cache))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["llama-untied-gqa", "qwen2-bias", "llama3-rope-scaling"])
def test_tree_step_logits_match_transformers_on_every_path(variant):
    """Each tree node's logits equal transformers' logits for prefix + the node's root-to-node path."""
    model_type, overrides = VARIANTS[variant]
    hf = tiny_hf_model(model_type, seed=2, **overrides)
    ours = backbone_from_hf(hf)
    gen = torch.Generator().manual_seed(5)
    prefix = torch.randint(0, hf.config.vocab_size, (1, 9), generator=gen)
    tree = StaticTree.build([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [2]], topk=3, num_heads=3)
    n = tree.num_nodes
    tokens = torch.randint(0, hf.config.vocab_size, (1, n), generator=gen)
    cache = ours.new_cache(1, 64)
    ours.forward(prefix, cache)
    cache.lengths[:] = prefix.shape[1]
    got = ours.logits(ours.forward(tokens, cache, block_mask=tree.buffers.tree_mask,
                                   depths=tree.buffers.depths))[0]
    parents = tree.buffers.parents[0].tolist()
    for node in range(n):
        path, cur = [], node
        while cur >= 0:
            path.append(cur)
            cur = parents[cur]
        seq = torch.cat([prefix[0], tokens[0, path[::-1]]])[None]
        with torch.no_grad():
            ref = hf(seq).logits[0, -1]
        torch.testing.assert_close(got[node], ref, rtol=1e-4, atol=1e-4)


def test_layer_subrange_composes_to_full_forward(tiny_backbone):
    """ProPD runs layers [0, e) then [e, L): the two halves must equal one full pass."""
    bb = tiny_backbone
    ids = torch.randint(0, bb.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    full_cache = bb.new_cache(1, 16)
    full = bb.forward(ids, full_cache)
    cache = bb.new_cache(1, 16)
    slots = torch.arange(6)[None]
    mask = attention_mask(cache.lengths, slots, causal_block(1, 6))
    h = bb.run_layers(bb.embed(ids), slots, cache, slots, mask, 0, 1)
    h = bb.run_layers(h, slots, cache, slots, mask, 1, None)
    torch.testing.assert_close(bb.final_norm(h), full)
    torch.testing.assert_close(cache.keys, full_cache.keys)


def test_batched_sequences_of_different_lengths_match_single(tiny_backbone):
    bb = tiny_backbone
    gen = torch.Generator().manual_seed(9)
    a = torch.randint(0, bb.config.vocab_size, (1, 8), generator=gen)
    b = torch.randint(0, bb.config.vocab_size, (1, 5), generator=gen)
    cache = bb.new_cache(2, 32)
    padded = torch.zeros(2, 8, dtype=torch.long)
    padded[0], padded[1, :5] = a[0], b[0]
    bb.forward(padded, cache)
    cache.lengths[:] = torch.tensor([8, 5])
    nxt = torch.tensor([[7], [9]])
    got = bb.forward(nxt, cache)
    for row, seq in enumerate((a, b)):
        single = bb.new_cache(1, 32)
        ref = bb.forward(torch.cat([seq, nxt[row:row + 1]], dim=1), single)[:, -1]
        torch.testing.assert_close(got[row], ref, rtol=1e-5, atol=1e-5)


def test_unsupported_architecture_is_a_clear_error():
    from transformers import GPT2Config

    with pytest.raises(DynTreeError, match="unsupported architecture 'gpt2'"):
        ModelConfig.from_hf(GPT2Config())


def test_context_limit_is_a_clear_error(tiny_backbone):
    cache = tiny_backbone.new_cache(1, 64)
    with pytest.raises(DynTreeError, match="context limit"):
        tiny_backbone.forward(torch.zeros(1, 65, dtype=torch.long), cache)


def test_cache_not_made_by_new_cache_may_end_inside_an_attention_block(tiny_backbone):
    from dyntree.model import KVCache

    ids = torch.randint(0, tiny_backbone.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(1))
    odd = KVCache.zeros(tiny_backbone.config, 1, 7)
    torch.testing.assert_close(tiny_backbone.forward(ids, odd), tiny_backbone.forward(ids, tiny_backbone.new_cache(1, 7)))


def test_cache_rows_are_views_of_the_batch(tiny_backbone):
    """A prefill into a fresh row view fills that row of the batch and no other; a shared-length view commits
    into the batch's own lengths."""
    ids = torch.randint(0, tiny_backbone.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(3))
    batch = tiny_backbone.new_cache(3, 16)
    batch.lengths.fill_(2)
    view = batch.rows(1, 1, fresh=True)
    assert view.batch_size == 1 and int(view.lengths[0]) == 0
    hidden = tiny_backbone.forward(ids, view)
    alone = tiny_backbone.new_cache(1, 16)
    torch.testing.assert_close(hidden, tiny_backbone.forward(ids, alone))
    torch.testing.assert_close(batch.keys[:, 1, :, :6], alone.keys[:, 0, :, :6])
    assert not batch.keys[:, 0].any() and not batch.keys[:, 2].any()
    assert batch.lengths.tolist() == [2, 2, 2]  # a fresh view's lengths are its own
    shared = batch.rows(1, 2)
    shared.commit(1, torch.tensor([2, 3]))
    assert batch.lengths.tolist() == [2, 2, 4]
