"""Greedy verification: the longest tree path that the backbone itself would have generated.

The walk starts at the root (always accepted, it was chosen by the previous step), takes the backbone's
argmax at the current node and moves to the child holding that token, if any. Siblings hold distinct tokens,
so at most one child matches. Only the nodes on the accepted path need the vocabulary projection: on a CPU a
row of lm_head costs about as much as several transformer layers, so the projection is computed lazily, one
row per accepted node (batched across sequences), never for the whole tree.
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


def verify_greedy(logits_fn, hidden: torch.Tensor, proposal: Proposal, active: torch.Tensor | None = None) -> Verification:
    """Walk every tree of the batch from its root; `logits_fn` maps `[m, H]` states to `[m, V]` logits."""
    batch, n = proposal.tokens.shape
    device = hidden.device
    current = torch.zeros(batch, dtype=torch.long, device=device)
    walking = torch.ones(batch, dtype=torch.bool, device=device) if active is None else active.clone()
    next_tokens = torch.zeros(batch, dtype=torch.long, device=device)
    paths: list[list[int]] = [[0] for _ in range(batch)]
    parents, tokens = proposal.buffers.parents, proposal.tokens
    rows = torch.arange(batch, device=device)
    while bool(walking.any()):
        idx = rows[walking]
        best = logits_fn(hidden[idx, current[idx]]).argmax(-1)
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
