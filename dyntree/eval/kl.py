"""First-tree-token KL: how far a sampling method's output is from the model's own sampling distribution.

docs/sampling.md defines it. On a fixed context (prompt + the model's greedy first token as the tree root),
the model's sampling distribution p of the token after the root is known exactly; draw S emissions of that
token from a method (re-running only the random verification on one tree forward, which is exact because the
tree's hidden states do not depend on the random draws) and compute KL(p_hat || p) = sum_x p_hat(x)
log(p_hat(x) / p(x)) with p_hat the empirical distribution. It needs no smoothing (every method emits only
tokens with p > 0; otherwise it is infinite, and reported so) and has a positive small-sample bias
(~ (support - 1) / 2S), so it is reported next to the same estimate for S draws straight from p (the noise
floor a lossless method matches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..step import forward_tree, prefill, propose
from ..proposers import Proposal, Proposer
from ..sampling import SamplingConfig, processed_probs
from ..trees import TreeBuffers
from ..verify import verify_tree


def empirical_kl(samples: torch.Tensor, model_probs: torch.Tensor) -> float:
    """KL(p_hat || p) in nats: p_hat the empirical distribution of token ids `samples` [S], p `[V]`."""
    counts = torch.bincount(samples.flatten().cpu(), minlength=model_probs.numel()).double()
    p_hat = counts / counts.sum()
    p = model_probs.double().cpu()
    seen = p_hat > 0
    if bool((p[seen] <= 0).any()):
        return math.inf
    return float((p_hat[seen] * (p_hat[seen].log() - p[seen].log())).sum())


@dataclass
class TreeContext:
    """One fixed context for the KL estimate: the tree built after it and the model's logits at every node."""

    root: int
    proposal: Proposal  # batch 1
    node_logits: torch.Tensor  # [n, V]


@torch.inference_mode()
def build_tree_context(backbone, heads, proposer: Proposer, prompt_ids: list[int]) -> TreeContext:
    """Prefill `prompt_ids`, take the greedy next token as the root, build and run one tree over it."""
    cache = backbone.new_cache(1, len(prompt_ids) + proposer.max_nodes + 1)
    last = prefill(backbone, cache, [list(prompt_ids)])
    root = backbone.logits(last).argmax(-1)
    proposal = propose(heads, proposer, backbone, last, root, lambda: [list(prompt_ids) + [int(root[0])]])
    tree_hidden = forward_tree(backbone, proposal, cache)
    return TreeContext(int(root[0]), proposal, backbone.logits(tree_hidden[0]))


def _expand(proposal: Proposal, batch: int) -> Proposal:
    b = proposal.buffers
    buffers = TreeBuffers(*(t[:1].expand(batch, *t.shape[1:]) for t in
                            (b.parents, b.depths, b.tree_mask, b.retrieve_paths)))
    return Proposal(proposal.tokens[:1].expand(batch, -1), buffers)


def first_token_samples(context: TreeContext, sampling: SamplingConfig, num_samples: int,
                        generator: torch.Generator, chunk: int = 256) -> torch.Tensor:
    """`num_samples` draws of the token a method emits right after the root, from one tree forward.

    Verification only reads the node logits, so it is replayed with fresh random draws on a batch of copies
    of the same tree (the logits are passed as the "hidden states" with an identity projection).
    """
    out = []
    tokens = context.proposal.tokens
    done = 0
    while done < num_samples:
        m = min(chunk, num_samples - done)
        proposal = _expand(context.proposal, m)
        hidden = context.node_logits[None].expand(m, -1, -1)
        result = verify_tree(lambda x: x, hidden, proposal, None, sampling, generator)
        for b, nodes in enumerate(result.accepted_nodes):
            out.append(int(tokens[0, nodes[1]]) if nodes.numel() > 1 else int(result.next_tokens[b]))
        done += m
    return torch.tensor(out, dtype=torch.long)


@dataclass
class KLEstimate:
    """Per-context KLs (nats) of a method, next to the noise floor of the same number of direct draws."""

    method_kl: list[float]
    floor_kl: list[float]
    num_samples: int

    @property
    def mean(self) -> float:
        return sum(self.method_kl) / len(self.method_kl)

    @property
    def floor(self) -> float:
        return sum(self.floor_kl) / len(self.floor_kl)


def estimate_first_token_kl(contexts: list[TreeContext], sampling: SamplingConfig, num_samples: int,
                            seed: int = 0) -> KLEstimate:
    """The first-tree-token KL of `sampling` (lossless or typical) over `contexts`, and its floor."""
    gen = torch.Generator(device=contexts[0].node_logits.device).manual_seed(seed)
    method, floor = [], []
    for ctx in contexts:
        p = processed_probs(ctx.node_logits[:1], sampling)[0]
        method.append(empirical_kl(first_token_samples(ctx, sampling, num_samples, gen), p))
        direct = torch.multinomial(p, num_samples, replacement=True, generator=gen) if not sampling.is_greedy \
            else p.argmax().repeat(num_samples)
        floor.append(empirical_kl(direct, p))
    return KLEstimate(method, floor, num_samples)
