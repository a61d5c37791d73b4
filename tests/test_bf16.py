"""bf16 end to end: greedy tree decoding is token-exact against plain decoding in bf16 (tiny and default model)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_hf_model
from dyntree.decoding import Decoder
from dyntree.heads import MedusaHeads
from dyntree.model import ModelConfig, Transformer
from dyntree.proposers import Proposer
from dyntree.trees import buffers_from_parents


class PathProposer(Proposer):
    """Trees holding the plain continuation as a first-child chain of random length, with decoy siblings
    after each true child (random heads on a tiny model would almost never be accepted)."""

    name = "path"
    uses_heads = False
    topk = 0
    max_nodes = 16

    def __init__(self, reference: list[int], vocab: int, seed: int):
        self.reference = reference
        self.vocab = vocab
        self.rng = random.Random(seed)
        self.position = 0

    def propose(self, root, head_ids=None, head_probs=None, context=None):
        self.position = self.reference.index(int(root[0]), self.position)
        parents, tokens = [-1], [int(root[0])]
        current = 0
        for depth in range(1, self.rng.randint(1, 5)):
            parent = current
            true_index = self.position + depth
            if true_index < len(self.reference):
                parents.append(parent)
                tokens.append(self.reference[true_index])
                current = len(tokens) - 1
            for _ in range(self.rng.randint(0, 2)):
                decoy = self.rng.randrange(self.vocab)
                if true_index >= len(self.reference) or decoy != self.reference[true_index]:
                    parents.append(parent)
                    tokens.append(decoy)
        return SimpleNamespace(tokens=torch.tensor([tokens]), buffers=buffers_from_parents(torch.tensor([parents]), 8))


def _bf16_tiny_backbone():
    hf = tiny_hf_model(seed=6)
    return Transformer(ModelConfig.from_hf(hf.config), hf.state_dict(), dtype=torch.bfloat16)


def plain(backbone, prompt, max_new):
    return Decoder(backbone, eos_token_ids=()).run([prompt], max_new).consume().tokens[0]


@pytest.mark.parametrize("seed", range(6))
def test_bf16_tree_decoding_is_token_exact(seed):
    backbone = _bf16_tiny_backbone()
    prompt = torch.randint(3, backbone.config.vocab_size, (5 + 3 * seed,),
                           generator=torch.Generator().manual_seed(seed)).tolist()
    reference = plain(backbone, prompt, 40)
    run = Decoder(backbone, proposer=PathProposer(reference, backbone.config.vocab_size, seed),
                  eos_token_ids=()).run([prompt], 40).consume()
    assert run.tokens[0] == reference
    assert run.stats.mean_accepted_per_pass > 1.2


def test_bf16_backbone_drives_fp32_heads():
    """Heads stay fp32 on a bf16 backbone (they cast its state): the draft step runs and keeps its dtype."""
    backbone = _bf16_tiny_backbone()
    heads = MedusaHeads.random(backbone.config, num_heads=3)
    hidden = backbone.forward(torch.tensor([[5, 6, 7]]), backbone.new_cache(1, 16))[:, -1]
    assert hidden.dtype == torch.bfloat16
    ids, probs = heads.topk(hidden, backbone.lm_head, 4)
    assert ids.shape == (1, 3, 4) and probs.dtype == torch.float32
    assert backbone.logits(hidden).dtype == torch.float32


@pytest.mark.slow
def test_bf16_default_model_tree_decoding_is_token_exact():
    from dyntree.loading import load_model

    loaded = load_model("default", dtype="bfloat16")
    backbone = loaded.backbone
    for seed, text in enumerate(["Write a haiku about the sea.", "What is the capital of France? Explain briefly."]):
        chat = loaded.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                    tokenize=False)
        prompt = loaded.tokenizer.encode(chat, add_special_tokens=False)
        reference = plain(backbone, prompt, 48)
        run = Decoder(backbone, proposer=PathProposer(reference, backbone.config.vocab_size, seed),
                      eos_token_ids=()).run([prompt], 48).consume()
        assert run.tokens[0] == reference
