"""The embedded default model: parity with transformers and token-exact tree decoding (slow tests)."""

from __future__ import annotations

import pytest
import torch

from dyntree.api import DynTree, resolve_heads
from dyntree.prompts import mt_bench_first_turns
from dyntree.decoding import Decoder
from dyntree.heads import MedusaHeads
from dyntree.proposers import RootOnlyProposer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_default(default_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model.model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompts(default_model):
    dt = DynTree(default_model, None)
    return [dt.encode(q) for q in mt_bench_first_turns(3)]


def test_default_model_shape(default_model):
    cfg = default_model.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.vocab_size, cfg.num_kv_heads) == (30, 576, 49152, 3)
    assert default_model.tokenizer.chat_template


def test_prefill_logits_match_transformers(default_model, hf_default, prompts):
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        ref = hf_default(ids).logits
    cache = default_model.backbone.new_cache(1, ids.shape[1] + 1)
    got = default_model.backbone.logits(default_model.backbone.forward(ids, cache))
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)


def test_plain_decoding_equals_transformers_generate(default_model, hf_default, prompts):
    for ids in prompts[:2]:
        ours = Decoder(default_model.backbone).run([ids], 40).consume().tokens[0]
        out = hf_default.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False,
                                  eos_token_id=list(default_model.config.eos_token_ids), pad_token_id=2)
        assert ours == out[0, len(ids):].tolist()


@pytest.mark.parametrize("heads_kind, trees", [("random", ("static",)), ("auto", ("dynamic", "static")),
                                               ("medusa", ("static",))])
def test_tree_decoding_is_token_exact(default_model, prompts, heads_kind, trees):
    """Both bundled sets (hydra: auto, and medusa) run static trees, the hydra ones also the default tree."""
    heads, _ = resolve_heads(heads_kind, default_model)
    for tree in trees:
        dt = DynTree(default_model, heads, tree=tree)
        for ids in prompts:
            ref = dt.generate(ids, 48, proposer=RootOnlyProposer()).token_ids
            result = dt.generate(ids, 48)
            assert result.token_ids == ref, tree
            if heads_kind != "random":  # trained heads: more than one token a pass
                assert result.stats.mean_accepted_per_pass > 1.2, tree
