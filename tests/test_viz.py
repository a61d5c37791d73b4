"""`dyntree viz`: recording proposals through the observe hook, and drawing them."""

from __future__ import annotations

import pytest
import torch

from dyntree.decoding import Decoder
from dyntree.errors import DynTreeError
from dyntree.heads import MedusaHeads
from dyntree.model import ModelConfig, Transformer
from dyntree.proposers import RootOnlyProposer
from dyntree.proposers import DynamicTreeProposer
from dyntree.viz import RecordingProposer, TreeSnapshot, _layout, parse_steps, render_tree, token_label


def test_parse_steps():
    assert parse_steps("3,1-2, 5") == [1, 2, 3, 5]
    for bad in ("", "0", "a", "2-x"):
        with pytest.raises(DynTreeError):
            parse_steps(bad)


def test_layout_puts_parents_between_their_children():
    depth, slot = _layout([-1, 0, 0, 1, 1, 2])
    assert depth == [0, 1, 1, 2, 2, 2]
    assert slot[3:] == [0.0, 1.0, 2.0]
    assert slot[1] == 0.5 and slot[2] == 2.0 and slot[0] == 1.25


def test_render_tree_writes_png(tmp_path):
    snap = TreeSnapshot(step=2, tokens=[5, 6, 7, 8], texts=[" the", "\n", " tree", "s"], parents=[-1, 0, 0, 2],
                        scores=[1.0, 0.6, 0.3, 0.1], accepted=[0, 2], next_token_text=".", method="dynamic")
    out = render_tree(snap, tmp_path / "sub" / "tree.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["tree.png"]  # no temporary file left behind
    assert token_label(" a\nb") == "\u2423a\\nb"


def test_recording_proposer_keeps_chosen_steps_and_output():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      eos_token_id=None, tie_word_embeddings=True)
    backbone = Transformer(ModelConfig.from_hf(cfg), LlamaForCausalLM(cfg).eval().state_dict())
    heads = MedusaHeads.random(backbone.config, num_heads=3)
    prompt = [[1, 2, 3, 4]]
    plain = Decoder(backbone, heads, RootOnlyProposer()).run(prompt, 12, stop_at_eos=False).consume()
    recorder = RecordingProposer(DynamicTreeProposer(3, topk=4, size=10), steps={2, 3})
    run = Decoder(backbone, heads, recorder).run(prompt, 12, stop_at_eos=False).consume()
    assert run.tokens == plain.tokens
    assert [step for step, _, _ in recorder.records] == [2, 3]
    for _, proposal, verification in recorder.records:
        assert proposal.tokens.shape == (1, 10)
        assert verification.accepted_nodes[0][0].item() == 0
