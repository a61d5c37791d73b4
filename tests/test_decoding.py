"""Greedy tree decoding is token-exact against plain decoding, whatever the tree proposes."""

from __future__ import annotations

import random

import pytest
import torch

from dyntree.decoding import Decoder
from dyntree.heads import MedusaHeads
from dyntree.proposers import Proposal, Proposer, StaticTreeProposer
from dyntree.trees import StaticTree, buffers_from_parents, load_tree_spec


def plain(backbone, prompt, max_new, eos=()):
    return Decoder(backbone, eos_token_ids=eos).run([prompt], max_new).consume()


class OracleProposer(Proposer):
    """Builds random trees in which the true continuation hides at random branches (and sometimes breaks off).

    Random heads on a tiny model almost never guess right, which would leave multi-token acceptance and the
    KV moves of off-first-branch paths untested; this proposer forces them.
    """

    name = "oracle"
    uses_heads = False
    topk = 0
    max_nodes = 12

    def __init__(self, reference: list[int], vocab: int, seed: int):
        self.reference = reference  # the plain-decoding continuation, root included at index 0
        self.vocab = vocab
        self.rng = random.Random(seed)
        self.position = 0

    def propose(self, root, head_ids=None, head_probs=None, context=None) -> Proposal:
        ref_index = self.reference.index(int(root[0]), self.position) if int(root[0]) in self.reference[
            self.position:] else None
        parents, tokens = [-1], [int(root[0])]
        true_depth = self.rng.randint(0, 4)
        current = 0
        for d in range(true_depth):
            for _ in range(self.rng.randint(0, 2)):  # decoy siblings before the true child
                parents.append(current)
                tokens.append(self.rng.randrange(self.vocab))
            if ref_index is not None and ref_index + d + 1 < len(self.reference):
                tok = self.reference[ref_index + d + 1]
            else:
                tok = self.rng.randrange(self.vocab)
            parents.append(current)
            tokens.append(tok)
            current = len(tokens) - 1
        # Decoys may repeat a true token under another parent: verification must follow the right branch.
        tokens = torch.tensor([tokens])
        parents_t = torch.tensor([parents])
        # Siblings must hold distinct tokens; drop later duplicates by giving them a fresh token.
        for i in range(1, tokens.shape[1]):
            for j in range(1, i):
                if parents[i] == parents[j] and tokens[0, i] == tokens[0, j]:
                    tokens[0, i] = (tokens[0, j] + 1) % self.vocab
        if ref_index is not None:
            self.position = ref_index
        return Proposal(tokens=tokens, buffers=buffers_from_parents(parents_t, 8))


@pytest.mark.parametrize("seed", range(12))
def test_oracle_trees_are_lossless(tiny_backbone, seed):
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, tiny_backbone.config.vocab_size, (int(torch.randint(1, 20, (1,), generator=gen)),),
                           generator=gen).tolist()
    ref = plain(tiny_backbone, prompt, 40)
    proposer = OracleProposer(ref.tokens[0], tiny_backbone.config.vocab_size, seed)
    run = Decoder(tiny_backbone, proposer=proposer, eos_token_ids=()).run([prompt], 40).consume()
    assert run.tokens[0] == ref.tokens[0]
    assert run.stats.mean_accepted_per_pass > 1.2  # the oracle really made it accept several tokens
    assert run.stats.new_tokens == 40 == 1 + sum(run.stats.accepted_lengths)


@pytest.mark.parametrize("tree", ["mc_sim_7b_63", [[0], [0, 0], [1], [0, 0, 0]]])
def test_static_tree_with_random_heads_is_lossless(tiny_backbone, tree):
    heads = MedusaHeads.random(tiny_backbone.config, num_heads=4, scale=0.5)
    name, paths = load_tree_spec(tree)
    proposer = StaticTreeProposer(StaticTree.build(paths, 10, 4, name))
    for seed in range(4):
        prompt = torch.randint(3, 128, (7 + seed,), generator=torch.Generator().manual_seed(seed)).tolist()
        ref = plain(tiny_backbone, prompt, 30)
        run = Decoder(tiny_backbone, heads, proposer, eos_token_ids=()).run([prompt], 30).consume()
        assert run.tokens[0] == ref.tokens[0]


def test_batch_decoding_equals_single_runs(tiny_backbone):
    heads = MedusaHeads.random(tiny_backbone.config, num_heads=4, scale=0.5)
    proposer = StaticTreeProposer(StaticTree.build(load_tree_spec("mc_sim_7b_63")[1], 10, 4))
    prompts = [torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 11, 6)]
    batch = Decoder(tiny_backbone, heads, proposer, eos_token_ids=()).run(prompts, 25).consume()
    for b, prompt in enumerate(prompts):
        assert batch.tokens[b] == plain(tiny_backbone, prompt, 25).tokens[0]


def test_eos_inside_an_accepted_path_stops_there(tiny_backbone):
    prompt = [5, 17, 33, 2 + 40]
    ref = plain(tiny_backbone, prompt, 30).tokens[0]
    eos = ref[9]  # pretend the 10th token is EOS
    first = ref.index(eos)
    proposer = OracleProposer(ref, 128, seed=1)
    run = Decoder(tiny_backbone, proposer=proposer, eos_token_ids=(eos,)).run([prompt], 30).consume()
    assert run.tokens[0] == ref[: first + 1]
    assert run.stats.stop_reasons == ["eos"]


@pytest.mark.parametrize("max_new", [1, 2, 7])
def test_exact_max_new_tokens(tiny_backbone, max_new):
    ref = plain(tiny_backbone, [4, 5, 6], 40).tokens[0]
    proposer = OracleProposer(ref, 128, seed=3)
    run = Decoder(tiny_backbone, proposer=proposer, eos_token_ids=()).run([[4, 5, 6]], max_new).consume()
    assert run.tokens[0] == ref[:max_new]
    assert run.stats.stop_reasons == ["length"]


def test_context_limit_stops_cleanly(tiny_backbone):
    limit = tiny_backbone.config.max_position_embeddings
    run = plain(tiny_backbone, list(range(3, 3 + 100)) * 5, 100)  # 500 prompt tokens, context 512
    assert run.stats.stop_reasons == ["context"]
    assert len(run.tokens[0]) < 100 and 500 + len(run.tokens[0]) <= limit + 1
