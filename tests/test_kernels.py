"""Row-count independence: a row's result is bit-identical whether computed alone or among n rows.

Greedy tree decoding is exact only with this property (a plain pass multiplies 1 row, a tree pass n), so it
is checked per dtype on whatever CPU runs the tests.
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_hf_model
from dyntree.kernels import AttentionPlan, Dense, attend, padded_key_count
from dyntree.model import ModelConfig, Transformer
from dyntree.trees import buffers_from_parents

DTYPES = [torch.float32, torch.bfloat16]
ROW_COUNTS = [2, 3, 8, 17, 64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(960, 576), (576, 1536), (3072, 576), (37, 19)])
def test_dense_rows_do_not_depend_on_row_count(dtype, shape):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=gen).to(dtype)
    dense = Dense(weight, torch.randn(shape[0], generator=gen).to(dtype))
    x = torch.randn(64, shape[1], generator=gen).to(dtype)
    alone = torch.cat([dense(x[i : i + 1]) for i in range(64)])
    for rows in ROW_COUNTS:
        assert torch.equal(dense(x[:rows]), alone[:rows]), f"{rows} rows"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("context", [7, 60, 200])
def test_attention_root_row_does_not_depend_on_tree_size(dtype, context):
    """The root of an n-node tree (which sees the context and itself) gets the bits of a 1-token pass."""
    gen = torch.Generator().manual_seed(context)
    heads, kv_heads, dim = 9, 3, 64
    keys = torch.randn(1, kv_heads, padded_key_count(context + 64), dim, generator=gen).to(dtype)
    values = torch.randn(keys.shape, generator=gen).to(dtype)
    query = torch.randn(1, heads, 64, dim, generator=gen).to(dtype)

    def run(n):
        total = padded_key_count(context + n)
        mask = torch.zeros(1, 1, n, total, dtype=torch.bool)
        mask[..., :context] = True
        mask[0, 0, :, context : context + n] = torch.ones(n, n, dtype=torch.bool).tril()  # a chain
        plan = AttentionPlan(mask, torch.arange(total)[None], total, heads, kv_heads)
        return attend(query[:, :, :n], keys[:, :, :total], values[:, :, :total], plan)

    alone = run(1)
    for n in ROW_COUNTS:
        assert torch.equal(run(n)[:, :, :1], alone), f"{n} nodes"


def _tiny_backbone(dtype):
    hf = tiny_hf_model(seed=4)
    return Transformer(ModelConfig.from_hf(hf.config), hf.state_dict(), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tree_root_hidden_state_equals_the_plain_pass(dtype):
    """Whole forward: the root of trees of 2..64 nodes vs a plain 1-token pass after the same prefix."""
    backbone = _tiny_backbone(dtype)
    gen = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, backbone.config.vocab_size, (1, 23), generator=gen)
    root = torch.randint(0, backbone.config.vocab_size, (1, 1), generator=gen)

    def prefilled():
        cache = backbone.new_cache(1, 128)
        backbone.forward(prefix, cache)
        cache.lengths[:] = prefix.shape[1]
        return cache

    plain = backbone.forward(root, prefilled())[0, 0]
    for n in ROW_COUNTS:
        parents = torch.tensor([[-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, n)]])
        buffers = buffers_from_parents(parents, 8)
        tokens = torch.cat([root, torch.randint(0, backbone.config.vocab_size, (1, n - 1), generator=gen)], 1)
        tree = backbone.forward(tokens, prefilled(), block_mask=buffers.tree_mask, depths=buffers.depths)
        assert torch.equal(tree[0, 0], plain), f"{n} nodes"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("context", [57, 62, 120])
def test_every_tree_node_equals_plain_decoding_of_its_path(dtype, context):
    """Each node of a branching tree (its ancestors in scattered slots, some across an attention block
    boundary) gets the bits plain decoding of its root-to-node path gives it, one token per pass."""
    backbone = _tiny_backbone(dtype)
    gen = torch.Generator().manual_seed(context)
    vocab = backbone.config.vocab_size
    prefix = torch.randint(0, vocab, (1, context), generator=gen)
    parents = [-1, 0, 0, 1, 1, 0, 3, 3, 4, 6, 2, 9, 9, 6, 11]
    tokens = torch.randint(0, vocab, (1, len(parents)), generator=gen)
    cache = backbone.new_cache(1, 256)
    backbone.forward(prefix, cache)
    cache.lengths[:] = context
    buffers = buffers_from_parents(torch.tensor([parents]), 8)
    tree = backbone.forward(tokens, cache, block_mask=buffers.tree_mask, depths=buffers.depths)
    prefilled_keys, prefilled_values = cache.keys.clone(), cache.values.clone()
    for node in range(len(parents)):
        path = []
        while node >= 0:
            path.insert(0, node)
            node = parents[node]
        cache.keys.copy_(prefilled_keys)
        cache.values.copy_(prefilled_values)
        cache.lengths[:] = context
        for index in path:
            step = backbone.forward(tokens[:, index : index + 1], cache)
            cache.lengths += 1
        assert torch.equal(tree[0, path[-1]], step[0, 0]), f"node {path[-1]}"


@pytest.mark.parametrize("dim", [8, 64])
def test_attention_rows_do_not_depend_on_their_place_or_count(dim):
    """At a small head size some CPUs give a row other bits by where it sits among the products' rows (an AMD
    Zen 5 does with 9 value columns) or by how many come with it: the plan takes the measured layout, so a
    query gets the same bits alone, among 64 rows, and moved to any other place (ProPD's survivors move)."""
    from dyntree.kernels import attention_layout

    multiple, columns = attention_layout(dim)
    assert multiple in (1, 2, 4, 8, 16) and columns > dim
    gen = torch.Generator().manual_seed(dim)
    heads, kv_heads, context = 4, 2, 30
    total = padded_key_count(context + 64)
    keys = torch.randn(1, kv_heads, total, dim, generator=gen)
    values = torch.randn(keys.shape, generator=gen)
    query = torch.randn(1, heads, 64, dim, generator=gen)

    def run(rows):  # each query sees the context only: the rows may come in any order
        mask = torch.zeros(1, 1, len(rows), total, dtype=torch.bool)
        mask[..., :context] = True
        plan = AttentionPlan(mask, torch.arange(total)[None], total, heads, kv_heads, dim)
        assert plan.rows % multiple == 0
        return attend(query[:, :, rows], keys, values, plan).clone()

    full = run(torch.arange(64))
    for n in (1, 3, 5, 6, 10, 17, 64):
        rows = torch.randperm(64, generator=gen)[:n]
        assert torch.equal(run(rows), full[:, :, rows]), f"{n} rows"
