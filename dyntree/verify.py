"""Greedy verification: the longest tree path that the backbone itself would have generated.

The walk starts at the root (always accepted, it was chosen by the previous step), takes the backbone's
argmax at the current node and moves to the child holding that token, if any. Siblings hold distinct tokens,
so at most one child matches. Only the nodes on the accepted path need the vocabulary projection: on a CPU a
row of lm_head costs about as much as several transformer layers, so it is never computed for the whole tree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .proposal import Proposal


@dataclass
class Verification:
    accepted_nodes: list[torch.Tensor]  # per sequence, node indices root-first; len = accepted_len
    next_tokens: torch.Tensor  # [B] the backbone's token after the last accepted node (next step's root)
    last_nodes: torch.Tensor  # [B] index of the last accepted node (its hidden state feeds the heads)

    @property
    def accepted_len(self) -> list[int]:
        return [int(a.numel()) for a in self.accepted_nodes]


def first_child_chain(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """`[B, D+1]` nodes of each tree's first-child chain from the root (-1 padded).

    Proposers list a node's most likely child first, so this is the path most likely to be accepted.
    """
    batch, n = parents.shape
    sentinel = n
    first_child = torch.full((batch, n + 1), sentinel, dtype=torch.long, device=parents.device)
    nodes = torch.arange(n, device=parents.device).expand(batch, n)
    first_child.scatter_reduce_(1, (parents + 1).clamp(min=0), nodes, reduce="amin")
    first_child = first_child[:, 1:]  # column c = first child of node c
    chain = [torch.zeros(batch, dtype=torch.long, device=parents.device)]
    for _ in range(max_depth):
        prev = chain[-1]
        nxt = torch.where(prev >= 0, first_child.gather(1, prev.clamp(min=0)[:, None])[:, 0], -1)
        chain.append(torch.where(nxt >= n, -1, nxt))
    return torch.stack(chain, 1)


def verify_greedy(logits_fn, hidden: torch.Tensor, proposal: Proposal, active: torch.Tensor | None = None) -> Verification:
    """Walk every tree of the batch from its root; `logits_fn` maps `[m, H]` states to `[m, V]` logits.

    The first-child chain is projected in one batched call up front (a few rows cost about one row with the
    prepacked kernels); nodes off that chain are projected lazily when the walk reaches them.
    """
    batch, n = proposal.tokens.shape
    device = hidden.device
    parents, tokens = proposal.buffers.parents, proposal.tokens
    max_depth = int(proposal.buffers.depths.max())
    choice = torch.full((batch, n), -1, dtype=torch.long, device=device)  # backbone's argmax at a node
    walking = torch.ones(batch, dtype=torch.bool, device=device) if active is None else active.clone()
    chain = first_child_chain(parents, max_depth)
    rows_b, rows_node = (chain >= 0).logical_and(walking[:, None]).nonzero(as_tuple=True)
    chain_nodes = chain[rows_b, rows_node]
    if chain_nodes.numel():
        choice[rows_b, chain_nodes] = logits_fn(hidden[rows_b, chain_nodes]).argmax(-1)
    current = torch.zeros(batch, dtype=torch.long, device=device)
    next_tokens = torch.zeros(batch, dtype=torch.long, device=device)
    paths: list[list[int]] = [[0] for _ in range(batch)]
    rows = torch.arange(batch, device=device)
    while bool(walking.any()):
        idx = rows[walking]
        best = choice[idx, current[idx]]
        missing = best < 0
        if bool(missing.any()):
            need = idx[missing]
            best[missing] = logits_fn(hidden[need, current[need]]).argmax(-1)
        next_tokens[idx] = best
        # The child of the current node whose token is the backbone's choice (at most one).
        match = (parents[idx] == current[idx, None]) & (tokens[idx] == best[:, None])
        found, child = match.max(dim=1)
        for b, ok, c in zip(idx.tolist(), found.tolist(), child.tolist()):
            if ok:
                paths[b].append(c)
                current[b] = c
            else:
                walking[b] = False
    accepted = [torch.tensor(p, dtype=torch.long, device=device) for p in paths]
    return Verification(accepted_nodes=accepted, next_tokens=next_tokens, last_nodes=current)
