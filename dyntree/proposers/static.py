"""Trees that do not change between steps: none at all (plain decoding) and Medusa's fixed trees.

A fixed tree is a list of rank paths: (0, 2) is "the top guess after the root, then the third guess after
that". Medusa heads guess from the state alone, so every node's token is gathered from the heads' top-k at
once. Path-conditional (hydra) heads guess given the path above a node, so the same rank paths are read
depth by depth: each depth, one `draft.expand` call gives the children of every node that has some in the
tree, and a child of rank r takes its parent's r-th guess (Hydra's own trees are such static trees).
"""

from __future__ import annotations

import torch

from ..errors import DynTreeError
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
    """Medusa's fixed tree: node tokens are gathered from the heads' top-k by (head, rank), or, over
    path-conditional heads (`conditional`), read depth by depth along each node's own path."""

    def __init__(self, tree: StaticTree, conditional: bool = False):
        self.tree = tree
        self.conditional = bool(conditional)
        self.name = f"static:{tree.name}" + (":hydra" if self.conditional else "")
        self.topk = tree.topk
        self._buffers: dict[tuple[int, torch.device], TreeBuffers] = {}
        # Per depth, the nodes (rank paths, () the root) whose children the tree holds, and those children.
        children: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
        for path in tree.paths:
            children.setdefault(path[:-1], []).append(path)
        self._levels = [[(parent, children[parent]) for parent in sorted(children, key=lambda p: (len(p), p))
                         if len(parent) == depth] for depth in range(tree.depth)]

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
        if self.conditional:
            return self._propose_along_paths(root, draft)
        batch = root.shape[0]
        flat = head_ids[:, : self.tree.depth, : self.topk].reshape(batch, -1)
        index = self.tree.gather_index.to(root.device)
        tokens = torch.cat([root[:, None], flat[:, index]], dim=1)
        scores = None
        if head_probs is not None:
            scores = torch.cat([torch.ones_like(root, dtype=head_probs.dtype)[:, None],
                                head_probs[:, : self.tree.depth, : self.topk].reshape(batch, -1)[:, index]], dim=1)
        return Proposal(tokens=tokens, buffers=self._batched(batch, root.device), scores=scores)

    def _propose_along_paths(self, root, draft) -> Proposal:
        """Node tokens from the heads' guesses given each node's path: one `draft.expand` per depth for all
        rows. Scores are each node's own (conditional) probability, as the gathered tree's are its head's."""
        if draft is None:
            raise DynTreeError("a static tree over path-conditional heads needs their draft (`heads.PathDraft`)")
        batch = root.shape[0]
        tokens = [{(): ()} for _ in range(batch)]  # per row: rank path -> token path
        probs = [{} for _ in range(batch)]
        for level in self._levels:
            wanted = [(b, parent, kids) for b in range(batch) for parent, kids in level]
            answers = draft.expand([(b, tokens[b][parent]) for b, parent, _ in wanted])
            for (b, parent, kids), guesses in zip(wanted, answers):
                for child in kids:
                    token, prob = guesses[child[-1]]
                    tokens[b][child] = tokens[b][parent] + (int(token),)
                    probs[b][child] = float(prob)
        paths = self.tree.paths
        node_tokens = torch.tensor([[int(root[b])] + [tokens[b][p][-1] for p in paths] for b in range(batch)],
                                   dtype=torch.long, device=root.device)
        scores = torch.tensor([[1.0] + [probs[b][p] for p in paths] for b in range(batch)], dtype=torch.float64)
        return Proposal(tokens=node_tokens, buffers=self._batched(batch, root.device), scores=scores)
