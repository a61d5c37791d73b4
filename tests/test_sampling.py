"""Sampling: logit processing, seeded runs, lossless tree speculative sampling and typical acceptance.

The statistical tests use fixed seeds, so they are deterministic; their bounds are several standard
deviations wide for exact sampling and are shown to fail for typical acceptance on a crafted case.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dyntree.decoding import Decoder
from dyntree.errors import DynTreeError
from dyntree.heads import MedusaHeads
from dyntree.model import ModelConfig, Transformer
from dyntree.proposers import Proposal, Proposer, RootOnlyProposer, StaticTreeProposer
from dyntree.sampling import SamplingConfig, processed_probs
from dyntree.trees import StaticTree, buffers_from_parents, load_tree_spec
from dyntree.verify import verify_speculative, verify_tree, verify_typical

VOCAB = 64


@pytest.fixture(scope="module")
def tiny():
    return make_tiny()


def make_tiny():
    """A tiny random Llama with peaked, mostly local next-token distributions (so guesses are often right)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False, eos_token_id=None)
    sd = LlamaForCausalLM(cfg).eval().state_dict()
    sd["lm_head.weight"] = sd["lm_head.weight"] * 30
    for name in sd:  # weaker attention: the next token depends mostly (not only) on the current one
        if "o_proj" in name:
            sd[name] = sd[name] * 0.3
    backbone = Transformer(ModelConfig.from_hf(cfg), sd)
    heads = MedusaHeads.random(backbone.config, num_heads=4)
    name, paths = load_tree_spec("mc_sim_7b_63")
    proposer = StaticTreeProposer(StaticTree.build(paths, 10, 4, name))
    return backbone, heads, proposer


PROMPT = [1, 2, 3, 4, 5]


class BigramTreeProposer(Proposer):
    """Test proposer: a node's children are the top-`width` next tokens of the backbone fed that node's token
    alone. Data-dependent like a dynamic tree, and on a tiny model it guesses right often (random heads
    rarely do), so the statistical tests really exercise accepted candidates."""

    name = "bigram"
    uses_heads = False
    topk = 0
    max_nodes = 0  # set per instance

    def __init__(self, backbone, width: int = 3, depth: int = 3):
        hidden = backbone.forward(torch.arange(VOCAB)[:, None], backbone.new_cache(VOCAB, 1))
        self.table = backbone.logits(hidden[:, 0]).topk(width, -1).indices  # [V, width]
        parents, level = [-1], [0]
        for _ in range(depth):
            level_next = []
            for p in level:
                for _ in range(width):
                    parents.append(p)
                    level_next.append(len(parents) - 1)
            level = level_next
        self.parents = torch.tensor([parents])
        self.depth = depth
        self.max_nodes = len(parents)

    def propose(self, root, head_ids=None, head_probs=None, context=None) -> Proposal:
        batch = root.shape[0]
        level, tokens = root[:, None], [root[:, None]]
        for _ in range(self.depth):
            level = self.table[level].reshape(batch, -1)  # children grouped by parent, in node order
            tokens.append(level)
        buffers = buffers_from_parents(self.parents.expand(batch, -1).contiguous(), self.depth)
        return Proposal(torch.cat(tokens, 1), buffers)


def tv(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """Total variation distance between the empirical distribution of `samples` and `probs`."""
    emp = torch.bincount(samples, minlength=probs.numel()).double() / samples.numel()
    return 0.5 * float((emp - probs.double()).abs().sum())


def chi2_z(samples: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit of `samples` to `probs`, as a z-score (X^2 - df) / sqrt(2 df).

    Categories expected fewer than 5 times are pooled. Under exact sampling z is about standard normal, so
    z < Z_BOUND (4.5: false alarm ~ 1e-5) holds unless the distribution is wrong.
    """
    n = samples.numel()
    counts = torch.bincount(samples, minlength=probs.numel()).double()
    expected = probs.double() * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    if bool((obs[~keep] > 0).any()):
        return math.inf  # a token the model never emits
    obs, exp = obs[keep], exp[keep]
    df = obs.numel() - 1
    stat = float(((obs - exp) ** 2 / exp).sum())
    return (stat - df) / math.sqrt(2 * df)


Z_BOUND = 4.5


def crafted(parents: list[int], node_logits: torch.Tensor, tokens: list[int], batch: int):
    """A batch of identical trees whose nodes have the given logits (passed as hidden, identity projection)."""
    par = torch.tensor([parents]).expand(batch, -1)
    depth = int(buffers_from_parents(torch.tensor([parents]), len(parents)).depths.max())
    buffers = buffers_from_parents(par.contiguous(), max(depth, 1))
    proposal = Proposal(torch.tensor([tokens]).expand(batch, -1), buffers)
    return node_logits[None].expand(batch, -1, -1), proposal


# -- configuration and logit processing ------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(temperature=float("nan")), dict(top_p=0),
                                    dict(top_p=1.5), dict(top_k=-1), dict(mode="nucleus"), dict(eps=2),
                                    dict(alpha=-0.1), dict(seed=-3)])
def test_bad_sampling_settings_raise_one_clear_error(kwargs):
    with pytest.raises(DynTreeError):
        SamplingConfig(**kwargs)


def test_processed_probs_temperature_top_k_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]])
    p = processed_probs(logits, SamplingConfig(temperature=0.5))
    assert torch.allclose(p, torch.softmax(logits / 0.5, -1))
    assert torch.equal(processed_probs(logits, SamplingConfig()), torch.tensor([[1.0, 0, 0, 0, 0]]))
    p = processed_probs(logits, SamplingConfig(temperature=1.0, top_k=2))
    assert torch.allclose(p, torch.tensor([[math.e, 1, 0, 0, 0]]) / (math.e + 1))
    full = torch.softmax(logits, -1)[0]
    # top-p: the smallest prefix of the sorted tokens whose mass reaches top_p.
    top_p = float(full[:2].sum()) - 1e-4
    p = processed_probs(logits, SamplingConfig(temperature=1.0, top_p=top_p))[0]
    assert (p[:2] > 0).all() and (p[2:] == 0).all() and torch.isclose(p.sum(), torch.tensor(1.0))
    p = processed_probs(logits, SamplingConfig(temperature=1.0, top_p=1e-6))[0]
    assert p[0] == 1 and (p[1:] == 0).all()


# -- runs: seeds, plain sampling, greedy stays exact ------------------------------------------------------
def test_seed_reproduces_and_global_rng_is_untouched(tiny):
    backbone, heads, proposer = tiny
    dec = Decoder(backbone, heads, proposer, eos_token_ids=())
    torch.manual_seed(123)
    expected_global = torch.rand(3)
    torch.manual_seed(123)
    for mode in ("lossless", "typical"):
        a = dec.run([PROMPT], 16, sampling=SamplingConfig(0.8, seed=7, mode=mode)).consume().tokens
        b = dec.run([PROMPT], 16, sampling=SamplingConfig(0.8, seed=7, mode=mode)).consume().tokens
        c = dec.run([PROMPT], 16, sampling=SamplingConfig(0.8, seed=8, mode=mode)).consume().tokens
        assert a == b and a != c
    assert torch.equal(torch.rand(3), expected_global)


def test_plain_sampling_is_the_models_own_sampling(tiny):
    """Without heads, a seeded run draws each token from processed_probs with the run's generator."""
    backbone, _, _ = tiny
    cfg = SamplingConfig(temperature=0.9, top_p=0.95, top_k=20, seed=11)
    got = Decoder(backbone, None, RootOnlyProposer(), eos_token_ids=()).run([PROMPT], 25, sampling=cfg).consume()
    gen = cfg.generator()
    ids = list(PROMPT)
    for _ in range(25):  # reference: full forward over the whole sequence every step, no tree, no cache reuse
        hidden = backbone.forward(torch.tensor([ids]), backbone.new_cache(1, len(ids)))
        probs = processed_probs(backbone.logits(hidden[:, -1]), cfg)
        ids.append(int(torch.multinomial(probs, 1, generator=gen)))
    assert got.tokens[0] == ids[len(PROMPT):]


@pytest.mark.parametrize("mode", ["lossless", "typical"])
def test_temperature_zero_is_token_exact_greedy(tiny, mode):
    backbone, heads, proposer = tiny
    plain = Decoder(backbone, None, RootOnlyProposer(), eos_token_ids=()).run([PROMPT, [7, 8]], 24).consume()
    tree = Decoder(backbone, heads, proposer, eos_token_ids=()).run(
        [PROMPT, [7, 8]], 24, sampling=SamplingConfig(temperature=0, mode=mode, seed=1)).consume()
    assert tree.tokens == plain.tokens
    assert tree.stats.mean_accepted_per_pass > 1  # the tree did accept candidates


# -- lossless tree speculative sampling -------------------------------------------------------------------
def _crafted_case(batch: int):
    """Root with children 'a' (p 0.5), 'b' (p 0.2), 'c' (p 0.1); 'a' has a child 'd'; 0.2 mass elsewhere."""
    vocab = 8
    root_p = torch.tensor([0.5, 0.2, 0.1, 0.05, 0.05, 0.05, 0.03, 0.02])
    a_p = torch.tensor([0.1, 0.1, 0.1, 0.4, 0.1, 0.1, 0.05, 0.05])
    logits = torch.stack([root_p.log(), a_p.log(), torch.zeros(vocab), torch.zeros(vocab), torch.zeros(vocab)])
    parents = [-1, 0, 0, 0, 1]
    tokens = [7, 0, 1, 2, 3]
    hidden, proposal = crafted(parents, logits, tokens, batch)
    return hidden, proposal, root_p, a_p


def test_lossless_first_tokens_match_the_model_and_typical_fails_the_same_bound():
    samples = 20000
    hidden, proposal, root_p, a_p = _crafted_case(samples)
    tokens = proposal.tokens[0]

    def first_tokens(out):
        return torch.tensor([int(tokens[n[1]]) if n.numel() > 1 else int(out.next_tokens[b])
                             for b, n in enumerate(out.accepted_nodes)])

    cfg = SamplingConfig(temperature=1.0, seed=0)
    out = verify_speculative(lambda x: x, hidden, proposal, None, cfg, cfg.generator())
    first = first_tokens(out)
    assert chi2_z(first, root_p) < Z_BOUND and tv(first, root_p) < 0.02
    # Given that 'a' was accepted, the next token is the model's distribution at 'a' (accepted 'd' or bonus).
    via_a = [b for b, n in enumerate(out.accepted_nodes) if n.numel() > 1 and int(n[1]) == 1]
    second = torch.tensor([int(tokens[out.accepted_nodes[b][2]]) if out.accepted_nodes[b].numel() > 2
                           else int(out.next_tokens[b]) for b in via_a])
    assert len(via_a) > 8000 and chi2_z(second, a_p) < Z_BOUND
    # Typical acceptance accepts 'a' whenever p(a) clears the threshold, so it emits 'a' almost always.
    typ = SamplingConfig(temperature=1.0, seed=0, mode="typical")
    first = first_tokens(verify_typical(lambda x: x, hidden, proposal, None, typ, typ.generator()))
    assert chi2_z(first, root_p) > 100 * Z_BOUND and tv(first, root_p) > 0.4


def _exact_marginals(backbone, cfg: SamplingConfig, steps: int) -> list[torch.Tensor]:
    """Exact distributions of the 1st..steps-th sampled token after PROMPT, by enumerating every prefix."""
    prefixes = torch.tensor([PROMPT])
    weights = torch.ones(1, dtype=torch.float64)
    marginals = []
    for _ in range(steps):
        hidden = backbone.forward(prefixes, backbone.new_cache(prefixes.shape[0], prefixes.shape[1]))
        probs = processed_probs(backbone.logits(hidden[:, -1]), cfg).double()  # [P, V]
        joint = weights[:, None] * probs
        marginals.append(joint.sum(0))
        flat = (joint.flatten() > 1e-9).nonzero()[:, 0]  # drop prefixes that cannot matter at this precision
        prefixes = torch.cat([prefixes[flat // VOCAB], (flat % VOCAB)[:, None]], 1)
        weights = joint.flatten()[flat]
    return marginals


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_lossless_tree_decoding_matches_plain_sampling_end_to_end(tiny, top_p):
    """Marginals of the first tokens of many batched tree-decoding runs vs the exact sampling marginals."""
    backbone = tiny[0]
    proposer = BigramTreeProposer(backbone)
    samples, steps = 3000, 3
    cfg = SamplingConfig(temperature=0.8, top_p=top_p, seed=3)
    run = Decoder(backbone, None, proposer, eos_token_ids=()).run([PROMPT] * samples, steps, sampling=cfg).consume()
    got = torch.tensor(run.tokens)  # [S, steps]
    exact = _exact_marginals(backbone, cfg, steps)
    accepted_some = sum(a > 1 for a in run.stats.accepted_lengths) / len(run.stats.accepted_lengths)
    assert accepted_some > 0.3  # candidates were accepted often, so the test exercises the tree
    for position in range(steps):
        assert chi2_z(got[:, position], exact[position]) < Z_BOUND, position
    # The same bound rejects typical acceptance here (it favours the tree's candidates).
    typical = SamplingConfig(temperature=0.8, top_p=top_p, seed=3, mode="typical")
    run = Decoder(backbone, None, proposer, eos_token_ids=()).run([PROMPT] * samples, steps, sampling=typical).consume()
    got = torch.tensor(run.tokens)
    assert max(chi2_z(got[:, p], exact[p]) for p in range(1, steps)) > Z_BOUND


# -- typical acceptance -----------------------------------------------------------------------------------
def test_typical_with_eps_zero_accepts_every_candidate_with_positive_probability():
    # Root children: tokens 0 and 5 (cut by top-k: p = 0); node 1: tokens 1 and 6 (p = 0); node 3: token 4 (p 0.06).
    vocab = 8
    base = torch.tensor([3.0, 2.5, 2.0, 1.5, 1.0, -5.0, -6.0, -7.0])
    logits = base.expand(6, vocab).clone()
    parents = [-1, 0, 0, 1, 1, 3]
    tokens = [7, 0, 5, 1, 6, 4]
    hidden, proposal = crafted(parents, logits, tokens, 1)
    cfg = SamplingConfig(temperature=1.0, top_k=5, eps=0.0, seed=0, mode="typical")
    out = verify_typical(lambda x: x, hidden, proposal, None, cfg, cfg.generator())
    assert out.accepted_nodes[0].tolist() == [0, 1, 3, 5]  # every positive-probability node on the deepest path
    assert int(out.last_nodes[0]) == 5
    # With the default eps the low-probability nodes are not all accepted.
    default = SamplingConfig(temperature=1.0, top_k=5, seed=0, mode="typical")
    out = verify_typical(lambda x: x, hidden, proposal, None, default, default.generator())
    assert len(out.accepted_nodes[0]) < 4


def test_typical_eps_zero_accepts_whole_depth_every_pass(tiny):
    backbone, heads, proposer = tiny
    cfg = SamplingConfig(temperature=1.0, eps=0.0, seed=5, mode="typical")
    run = Decoder(backbone, heads, proposer, eos_token_ids=()).run([PROMPT], 41, sampling=cfg).consume()
    depth = proposer.tree.depth
    # 1 token from the prefill, then (depth + 1) per pass: every candidate has p > 0 under a full softmax.
    assert run.stats.accepted_lengths == [depth + 1] * 8


def test_typical_ties_in_length_go_to_the_higher_log_probability():
    vocab = 4
    root = torch.tensor([0.45, 0.40, 0.10, 0.05]).log()
    under_a = torch.tensor([0.3, 0.3, 0.3, 0.1]).log()  # a -> child token 2 with p 0.3
    under_b = torch.tensor([0.05, 0.05, 0.85, 0.05]).log()  # b -> child token 2 with p 0.85
    logits = torch.stack([root, under_a, under_b, torch.zeros(vocab), torch.zeros(vocab)])
    parents, tokens = [-1, 0, 0, 1, 2], [3, 0, 1, 2, 2]
    hidden, proposal = crafted(parents, logits, tokens, 1)
    cfg = SamplingConfig(temperature=1.0, seed=0, mode="typical")
    out = verify_typical(lambda x: x, hidden, proposal, None, cfg, cfg.generator())
    # Both depth-2 paths are accepted; log(0.40 * 0.85) > log(0.45 * 0.3), so the b path wins.
    assert out.accepted_nodes[0].tolist() == [0, 2, 4]


def test_verify_tree_dispatch_and_inactive_sequences():
    hidden, proposal, _, _ = _crafted_case(3)
    active = torch.tensor([True, False, True])
    for cfg in (SamplingConfig(), SamplingConfig(1.0, seed=0), SamplingConfig(1.0, seed=0, mode="typical")):
        out = verify_tree(lambda x: x, hidden, proposal, active, cfg, cfg.generator())
        assert out.accepted_nodes[1].tolist() == [0] and int(out.last_nodes[1]) == 0
    greedy = verify_tree(lambda x: x, hidden, proposal, None)
    assert greedy.accepted_nodes[0].tolist() == [0, 1, 4]  # argmax root -> token 0 (node 1) -> token 3 (node 4)
