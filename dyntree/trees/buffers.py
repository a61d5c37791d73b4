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
    """Build all buffers from `parents` `[B, n]` (parent before child, root at 0, depth <= max_depth)."""
    batch, n = parents.shape
    device = parents.device
    nodes = torch.arange(n, device=device)
    tree_mask = torch.zeros(batch, n, n, dtype=torch.bool, device=device)
    tree_mask[:, nodes, nodes] = True
    depths = torch.zeros(batch, n, dtype=torch.long, device=device)
    ancestor = parents.clone()
    rows = torch.arange(batch, device=device)[:, None].expand(batch, n)
    for _ in range(max_depth):
        has = ancestor >= 0
        if not bool(has.any()):
            break
        depths += has.long()
        safe = ancestor.clamp(min=0)
        tree_mask[rows[has], nodes.expand(batch, n)[has], safe[has]] = True
        ancestor = torch.where(has, torch.gather(parents, 1, safe), ancestor)
    # Leaves: nodes that are nobody's parent.
    is_parent = torch.zeros(batch, n + 1, dtype=torch.bool, device=device)
    is_parent.scatter_(1, (parents + 1).clamp(min=0), True)  # parent -1 lands in column 0, ignored
    is_leaf = ~is_parent[:, 1:]
    num_leaves = is_leaf.sum(1)
    width = int(num_leaves.max())
    # Rank of each leaf within its tree, so leaf paths are listed in node order.
    leaf_rank = torch.cumsum(is_leaf.long(), 1) - 1
    retrieve = torch.full((batch, width, max_depth + 1), -1, dtype=torch.long, device=device)
    b_idx, leaf_idx = is_leaf.nonzero(as_tuple=True)
    # For each (tree, leaf), its ancestors-or-self j are placed at column depth[j].
    on_path = tree_mask[b_idx, leaf_idx]  # [L, n]
    l_idx, j_idx = on_path.nonzero(as_tuple=True)
    retrieve[b_idx[l_idx], leaf_rank[b_idx, leaf_idx][l_idx], depths[b_idx[l_idx], j_idx]] = j_idx
    return TreeBuffers(parents=parents, depths=depths, tree_mask=tree_mask, retrieve_paths=retrieve)
