"""The one decoding step's own rules (`dyntree.step`): how a sequence takes tokens, and how rows that sample
are verified beside others."""

from __future__ import annotations

import torch

from dyntree.proposers import Proposal
from dyntree.sampling import Sampler, SamplingConfig
from dyntree.step import take_tokens
from dyntree.trees import buffers_from_parents
from dyntree.verify import verify_rows, verify_tree


def test_take_tokens_stops_at_eos_or_the_limit():
    assert take_tokens(0, [5, 6, 7], 10, {6}) == ([5, 6], "eos")
    assert take_tokens(8, [5, 6, 7], 10, set()) == ([5, 6], "length")
    assert take_tokens(9, [5, 6], 10, {5}) == ([5], "eos")  # both at once: end of sequence says more
    assert take_tokens(0, [5, 6], 10, ()) == ([5, 6], "")
    assert take_tokens(10, [5], 10, ()) == ([], "length")


def test_a_sampling_row_draws_the_same_beside_any_rows():
    """Each row that samples has its own sampler: its draws are those of its own unpadded tree alone, whatever
    the widest tree of the batch and whichever rows sit beside it (greedy or sampling)."""
    vocab, width = 16, 6
    gen = torch.Generator().manual_seed(0)
    own = [[-1, 0, 0, 1], [-1, 0, 1, 2, 2, 0], [-1, 0]]  # three rows' trees, padded below to `width`
    parents = torch.tensor([p + [-1] * (width - len(p)) for p in own])
    tokens = torch.randint(0, vocab, (3, width), generator=gen)
    proposal = Proposal(tokens, buffers_from_parents(parents, 4))
    logits = torch.randn(3, width, vocab, generator=gen) * 3  # "hidden states" under an identity projection
    config = SamplingConfig(temperature=1.0, seed=7)
    for greedy_neighbour in (True, False):
        samplers = [Sampler(config), Sampler(None if greedy_neighbour else config), Sampler(config)]
        result = verify_rows(lambda x: x, logits, proposal, [len(p) for p in own], samplers,
                             torch.ones(3, dtype=torch.bool))
        for b in (0, 2):
            n = len(own[b])
            alone = verify_tree(lambda x: x, logits[b : b + 1, :n], proposal.rows([b], n), None, config,
                                Sampler(config).generator)
            assert result.accepted_nodes[b].tolist() == alone.accepted_nodes[0].tolist()
            assert int(result.next_tokens[b]) == int(alone.next_tokens[0])
        if greedy_neighbour:
            walked = verify_tree(lambda x: x, logits, proposal)
            assert result.accepted_nodes[1].tolist() == walked.accepted_nodes[1].tolist()
