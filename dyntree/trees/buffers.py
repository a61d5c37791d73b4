"""Tree buffers shared by every proposer: built from a parent array with batched tensor ops.

Node 0 is the root (the token already chosen by the previous step); nodes are ordered so that a parent
always comes before its children. Everything else (attention mask, depths, root-to-leaf paths) follows
from `parents`, in O(depth * n) tensor work and without host round-trips per node.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TreeBuffers:
    """Layout of one step's trees, for a batch of B trees with n nodes each.

    parents        [B, n]    index of each node's parent, -1 for the root
    depths         [B, n]    0 for the root; a node's position is the cache length + its depth
    tree_mask      [B, n, n] tree_mask[b, i, j]: node i may attend to node j (j is i or an ancestor)
    retrieve_paths [B, P, D+1] node indices of every root-to-leaf path, padded with -1
    """

    parents: torch.Tensor
    depths: torch.Tensor
    tree_mask: torch.Tensor
    retrieve_paths: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return self.parents.shape[1]


def buffers_from_parents(parents: torch.Tensor, max_depth: int) -> TreeBuffers:
    """Build all buffers from `parents` `[B, n]` (parent before child, root at 0, depth <= max_depth).

    A fixed number of dense ops per depth level (no boolean indexing, one host read for the leaf count):
    on a CPU each tensor op costs microseconds, and dynamic trees rebuild these buffers every step.
    """
    batch, n = parents.shape
    device = parents.device
    nodes = torch.arange(n, device=device).expand(batch, n)
    # chain[:, :, t] = the t-th ancestor of each node (t = 0: itself), -1 past the root.
    chain = torch.full((batch, n, max_depth + 1), -1, dtype=torch.long, device=device)
    chain[:, :, 0] = nodes
    tree_mask = torch.zeros(batch, n, n, dtype=torch.bool, device=device)
    tree_mask.scatter_(2, nodes[:, :, None], True)
    ancestor = parents
    for t in range(1, max_depth + 1):
        has = ancestor >= 0
        chain[:, :, t] = ancestor
        # Mark the ancestor; nodes without one re-mark themselves (already True).
        tree_mask.scatter_(2, torch.where(has, ancestor, nodes)[:, :, None], True)
        ancestor = torch.where(has, torch.gather(parents, 1, ancestor.clamp(min=0)), ancestor)
    depths = (chain[:, :, 1:] >= 0).sum(-1)
    # Leaves: nodes that are nobody's parent.
    is_parent = torch.zeros(batch, n + 1, dtype=torch.bool, device=device)
    is_parent.scatter_(1, (parents + 1).clamp(min=0), True)  # parent -1 lands in column 0, ignored
    is_leaf = ~is_parent[:, 1:]
    num_leaves = is_leaf.sum(1)
    width = int(num_leaves.max())
    # Leaves first, in node order (stable sort), then each leaf's chain reversed so column c holds depth c.
    leaves = torch.sort((~is_leaf).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    leaf_chain = torch.gather(chain, 1, leaves[:, :, None].expand(batch, width, max_depth + 1))
    leaf_depth = torch.gather(depths, 1, leaves)[:, :, None]
    column = torch.arange(max_depth + 1, device=device)
    back = (leaf_depth - column).clamp(min=0)
    retrieve = torch.where(column <= leaf_depth, torch.gather(leaf_chain, 2, back), -1)
    real = torch.arange(width, device=device)[None, :] < num_leaves[:, None]
    retrieve = torch.where(real[:, :, None], retrieve, -1)
    return TreeBuffers(parents=parents, depths=depths, tree_mask=tree_mask, retrieve_paths=retrieve)
