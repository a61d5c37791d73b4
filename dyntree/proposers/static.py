"""Trees that do not change between steps: none at all (plain decoding) and Medusa's fixed trees."""

from __future__ import annotations

import torch

from ..trees import StaticTree, TreeBuffers, buffers_from_parents
from .base import Proposal, Proposer


class RootOnlyProposer(Proposer):
    """No heads: the tree is the root alone, i.e. plain autoregressive decoding on the same kernels."""

    name = "ar"
    uses_heads = False
    topk = 0

    def __init__(self):
        self._buffers: dict[int, TreeBuffers] = {}

    @property
    def max_nodes(self) -> int:
        return 1

    def propose(self, root, head_ids=None, head_probs=None, context=None, draft=None) -> Proposal:
        batch = root.shape[0]
        if batch not in self._buffers:
            self._buffers[batch] = buffers_from_parents(torch.full((batch, 1), -1, device=root.device), 0)
        return Proposal(tokens=root[:, None], buffers=self._buffers[batch])


class StaticTreeProposer(Proposer):
    """Medusa's fixed tree: node tokens are gathered from the heads' top-k by (head, rank)."""

    def __init__(self, tree: StaticTree):
        self.tree = tree
        self.name = f"static:{tree.name}"
        self.topk = tree.topk
        self._buffers: dict[tuple[int, torch.device], TreeBuffers] = {}

    @property
    def max_nodes(self) -> int:
        return self.tree.num_nodes

    def _batched(self, batch: int, device) -> TreeBuffers:
        key = (batch, torch.device(device))
        if key not in self._buffers:
            b = self.tree.buffers
            self._buffers[key] = TreeBuffers(*(t.to(device).expand(batch, *t.shape[1:]) for t in
                                               (b.parents, b.depths, b.tree_mask, b.retrieve_paths)))
        return self._buffers[key]

    def propose(self, root, head_ids, head_probs=None, context=None, draft=None) -> Proposal:
        batch = root.shape[0]
        flat = head_ids[:, : self.tree.depth, : self.topk].reshape(batch, -1)
        index = self.tree.gather_index.to(root.device)
        tokens = torch.cat([root[:, None], flat[:, index]], dim=1)
        scores = None
        if head_probs is not None:
            scores = torch.cat([torch.ones_like(root, dtype=head_probs.dtype)[:, None],
                                head_probs[:, : self.tree.depth, : self.topk].reshape(batch, -1)[:, index]], dim=1)
        return Proposal(tokens=tokens, buffers=self._batched(batch, root.device), scores=scores)
