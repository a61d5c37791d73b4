"""The proposer contract: what the decoding loop needs from anything that builds a step's candidate tree.

A proposer sees the root tokens (already decided), the heads' draft of the step (`heads.draft`: each head's
top-k `[B, K, k]` ids and probabilities, or for trees built depth by depth the draft itself) and, if it asks
for them, each sequence's tokens so far; it returns a `Proposal`: the tree's tokens and buffers.
After verification the loop calls `observe`, so a proposer can learn from what was accepted (the feedback
hook is part of the interface, as in transformers' `CandidateGenerator`). Verification and the loop do not
care how a tree was chosen, so static trees, dynamic trees and ProPD's sized trees are interchangeable.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch

from ..trees import TreeBuffers, buffers_from_parents


@dataclass
class Proposal:
    tokens: torch.Tensor  # [B, n], node 0 = root
    buffers: TreeBuffers
    scores: torch.Tensor | None = None  # [B, n] optional per-node scores (visualisation, calibration)
    ranks: torch.Tensor | None = None  # [B, n] optional: each node's rank among its head's guesses (-1 root)
    node_probs: torch.Tensor | None = None  # [B, n] optional: each node's own head probability (1 root)

    def rows(self, index: list[int], width: int) -> "Proposal":
        """The trees of rows `index` alone, cut to their first `width` nodes (buffers rebuilt for that width):
        what sampling rows are verified on, so that padding added for other rows never changes their draws."""
        rows = torch.tensor(index, dtype=torch.long, device=self.tokens.device)
        parents = self.buffers.parents[rows, :width]
        depth = int(self.buffers.depths[rows, :width].max())
        return Proposal(tokens=self.tokens[rows, :width], buffers=buffers_from_parents(parents, depth))


class Proposer(ABC):
    """Builds one step's tree.

    name:         how reports call it.
    uses_heads:   the loop computes the heads' top-`topk` guesses for it (False: they are passed as None).
    uses_context: the loop passes `context` (each sequence's prompt + tokens so far, root last) to `propose`.
    topk:         guesses per head it reads.
    max_nodes:    the largest tree it can return (root included): the loop reserves that much cache.
    """

    name: str = "proposer"
    uses_heads: bool = True
    uses_context: bool = False
    topk: int = 0

    @property
    @abstractmethod
    def max_nodes(self) -> int:
        ...

    # Whether it builds its tree depth by depth (path-conditional heads): it is then passed the heads' `draft`
    # (`heads.PathDraft`: the heads evaluated on requested paths) instead of head_ids/head_probs.
    conditional: bool = False

    @abstractmethod
    def propose(self, root: torch.Tensor, head_ids: torch.Tensor | None, head_probs: torch.Tensor | None,
                context: list[list[int]] | None = None, draft=None) -> Proposal:
        ...

    def prepare(self, batch_size: int) -> None:
        """Do now any one-off work a run of `batch_size` sequences would otherwise do in its first step (a
        benchmark calls it before timing). Default: nothing."""

    def plan_step(self, active: torch.Tensor) -> bool:
        """Called by the loop before each step with the rows still decoding (`[B]` bool). False: this step
        is plain decoding (the heads are not run and the tree is the root alone). Default: always a tree."""
        return True

    def observe(self, proposal: Proposal, verification, active: torch.Tensor | None = None) -> None:
        """Called after each verification of `proposal` (`verify.Verification`); rows where `active` is False
        belong to finished sequences. Default: nothing to learn."""


def propose_step(proposer: Proposer, root: torch.Tensor, draft, context: Callable[[], list[list[int]]]) -> Proposal:
    """One step's proposal from the heads' `draft` (`heads.draft(...)`; None when no heads ran).
    `context()` is built and passed only for proposers that read it (`uses_context`), so the others do not pay
    for the copy. Proposers that build trees depth by depth get the draft itself; the others read each head's
    top-k from it."""
    ctx = context() if proposer.uses_context else None
    if draft is not None and proposer.conditional:
        return proposer.propose(root, None, None, ctx, draft=draft)
    return proposer.propose(root, getattr(draft, "ids", None), getattr(draft, "probs", None), ctx)
