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

    Rows of a batch may hold fewer real nodes than n (`pad_parents`): the rest are padding nodes, each a
    detached root (parent -1, depth 0). A padding node attends only to itself and the committed prefix, and
    is nobody's child, so verification, which walks from node 0 through children, never reaches it, and the
    cache never commits its slot.
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

    A fixed, small number of dense ops (one gather per depth level, no boolean indexing, one host read for
    the leaf count): on a CPU each tensor op costs microseconds, and dynamic trees rebuild these every step.
    """
    batch, n = parents.shape
    device = parents.device
    null = n  # an extra node, its own parent, standing for "past the root"
    linked = torch.cat([torch.where(parents < 0, null, parents),
                        torch.full((batch, 1), null, dtype=parents.dtype, device=device)], dim=1)
    # chain[b, i, t] = the t-th ancestor of node i (t = 0: itself), `null` past the root.
    links = [torch.arange(n + 1, device=device).expand(batch, n + 1)]
    for _ in range(max_depth):
        links.append(torch.gather(linked, 1, links[-1]))
    chain = torch.stack(links, dim=2)[:, :n]
    tree_mask = torch.zeros(batch, n, n + 1, dtype=torch.bool, device=device).scatter_(2, chain, True)[:, :, :n]
    depths = (chain[:, :, 1:] != null).sum(-1)
    # Leaves: nodes that are nobody's parent.
    is_parent = torch.zeros(batch, n + 1, dtype=torch.bool, device=device).scatter_(1, linked[:, :n], True)
    is_leaf = ~is_parent[:, :n]
    num_leaves = is_leaf.sum(1)
    width = int(num_leaves.max())
    # Leaves first, in node order (stable sort); each leaf's chain reversed so that column c holds depth c.
    leaves = torch.sort((~is_leaf).to(torch.uint8), dim=1, stable=True).indices[:, :width]
    leaf_chain = torch.gather(chain, 1, leaves[:, :, None].expand(batch, width, max_depth + 1))
    leaf_depth = torch.gather(depths, 1, leaves)[:, :, None]
    column = torch.arange(max_depth + 1, device=device)
    on_path = (column <= leaf_depth) & (torch.arange(width, device=device) < num_leaves[:, None])[:, :, None]
    retrieve = torch.gather(leaf_chain, 2, (leaf_depth - column).clamp(min=0))
    retrieve = torch.where(on_path, retrieve, -1)
    return TreeBuffers(parents=parents, depths=depths, tree_mask=tree_mask, retrieve_paths=retrieve)


def pad_parents(rows: list[list[int]], width: int) -> list[list[int]]:
    """Parent lists of different lengths (node 0 the root) padded to `width` nodes with padding nodes (-1):
    a batch step's rows may get different numbers of real nodes but share one `[B, width]` block."""
    if any(len(r) > width for r in rows):
        raise ValueError("a row has more nodes than the width it is padded to")
    return [list(r) + [-1] * (width - len(r)) for r in rows]
