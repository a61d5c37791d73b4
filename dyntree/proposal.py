"""Proposers turn the heads' guesses into the candidate tree of one step.

A proposer sees the root tokens (already decided) and the heads' top-k `[B, K, k]` ids and probabilities,
and returns a `Proposal`: the tree's tokens and its buffers. Verification and the decoding loop do not care
how the tree was chosen, so static trees, dynamic trees and ProPD's sized trees are interchangeable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .trees import StaticTree, TreeBuffers, buffers_from_parents


@dataclass
class Proposal:
    tokens: torch.Tensor  # [B, n], node 0 = root
    buffers: TreeBuffers
    scores: torch.Tensor | None = None  # [B, n] optional per-node scores (visualisation, calibration)
    ranks: torch.Tensor | None = None  # [B, n] optional: each node's rank among its head's guesses (-1 root)
    node_probs: torch.Tensor | None = None  # [B, n] optional: each node's own head probability (1 root)


class Proposer(Protocol):
    """What the decoding loop needs from a tree builder."""

    name: str
    uses_heads: bool
    topk: int  # how many guesses per head the proposer reads

    def propose(self, root: torch.Tensor, head_ids: torch.Tensor | None, head_probs: torch.Tensor | None) -> Proposal:
        ...

    # Optional: `observe(proposal, verification, active)` is called after each verification when present,
    # so a proposer can learn from what was accepted (e.g. dynamic trees' acceptance statistics).
    # Optional: `uses_context = True` makes callers pass `context=` (each sequence's tokens so far) to
    # `propose` (e.g. the dynamic tree's lookup branch); see `propose_step`.


def propose_step(proposer: Proposer, root: torch.Tensor, head_ids: torch.Tensor | None,
                 head_probs: torch.Tensor | None, context: Callable[[], list[list[int]]]) -> Proposal:
    """One step's proposal; `context()` (each sequence's prompt + tokens so far, root last) is built and
    passed only for proposers that read it (`uses_context`), so the others do not pay for the copy."""
    if getattr(proposer, "uses_context", False):
        return proposer.propose(root, head_ids, head_probs, context=context())
    return proposer.propose(root, head_ids, head_probs)


class RootOnlyProposer:
    """No heads: the tree is the root alone, i.e. plain autoregressive decoding on the same kernels."""

    name = "ar"
    uses_heads = False
    topk = 0

    def __init__(self):
        self._buffers: dict[int, TreeBuffers] = {}

    def propose(self, root, head_ids=None, head_probs=None) -> Proposal:
        batch = root.shape[0]
        if batch not in self._buffers:
            self._buffers[batch] = buffers_from_parents(torch.full((batch, 1), -1, device=root.device), 0)
        return Proposal(tokens=root[:, None], buffers=self._buffers[batch])


class StaticTreeProposer:
    """Medusa's fixed tree: node tokens are gathered from the heads' top-k by (head, rank)."""

    uses_heads = True

    def __init__(self, tree: StaticTree):
        self.tree = tree
        self.name = f"static:{tree.name}"
        self.topk = tree.topk
        self._buffers: dict[tuple[int, torch.device], TreeBuffers] = {}

    def _batched(self, batch: int, device) -> TreeBuffers:
        key = (batch, torch.device(device))
        if key not in self._buffers:
            b = self.tree.buffers
            self._buffers[key] = TreeBuffers(*(t.to(device).expand(batch, *t.shape[1:]) for t in
                                               (b.parents, b.depths, b.tree_mask, b.retrieve_paths)))
        return self._buffers[key]

    def propose(self, root, head_ids, head_probs=None) -> Proposal:
        batch = root.shape[0]
        flat = head_ids[:, : self.tree.depth, : self.topk].reshape(batch, -1)
        index = self.tree.gather_index.to(root.device)
        tokens = torch.cat([root[:, None], flat[:, index]], dim=1)
        scores = None
        if head_probs is not None:
            scores = torch.cat([torch.ones_like(root, dtype=head_probs.dtype)[:, None],
                                head_probs[:, : self.tree.depth, : self.topk].reshape(batch, -1)[:, index]], dim=1)
        return Proposal(tokens=tokens, buffers=self._batched(batch, root.device), scores=scores)
