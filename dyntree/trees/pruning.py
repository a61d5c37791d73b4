"""Early pruning of a tree (ProPD, arXiv 2402.13485): which nodes go on past layer l. Pure tensor functions.

After the first l layers an early head gives, for every node with children, its guess of the next token. A
child whose token is not among its parent's early top-k is dropped, and so is its whole subtree; the later
layers run on the survivors only. Any such rule is lossless: verification reads the full model's logits at the
survivors, so a pruned node can only fail to be accepted. What a rule costs is the accepted tokens it drops.

Node order is kept throughout (a parent before its children), so the survivors' own parents, depths and
attention mask are the original ones re-indexed (`subset_buffers`).
"""

from __future__ import annotations

import torch

from .buffers import TreeBuffers, buffers_from_parents


def within_topk(row_logits: torch.Tensor, child_logits: torch.Tensor, k: int) -> torch.Tensor:
    """True where a child's logit would rank among the top `k` of its parent's logits (ties kept).

    row_logits `[m, S]` the parent's logits over a vocabulary (the whole one, or a subset); child_logits `[m]`
    the child token's logit under the same parent. "Rank < k" is "fewer than k other tokens score higher",
    which is `child >= the k-th largest row value`, whether or not the child's token is in the row. Over a
    vocabulary subset the rank can only be lower, so a subset keeps a superset of what the full vocabulary
    keeps.
    """
    return child_logits >= topk_floor(row_logits, k)


def topk_floor(row_logits: torch.Tensor, k: int) -> torch.Tensor:
    """`[m]` the k-th largest value of each row (-inf when a row has no more than k values): a child is within
    its parent's top-k exactly when its logit is at least this."""
    if k >= row_logits.shape[-1]:
        return torch.full(row_logits.shape[:-1], float("-inf"), device=row_logits.device)
    return row_logits.topk(k, dim=-1).values[..., -1]


def ancestor_closed(tree_mask: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """`[B, n]` survivors: nodes whose own test and every ancestor's passed (`ok` `[B, n]`; the root always
    survives). `tree_mask[b, i, j]` is "j is i or an ancestor of i", so one reduction closes the set."""
    ok = ok.clone()
    ok[:, 0] = True
    return ~(tree_mask & ~ok[:, None, :]).any(-1)


def equal_counts(keep: torch.Tensor) -> torch.Tensor:
    """Survivor sets of one size for the whole batch (tensors stay `[B, n']`): a row with fewer survivors
    keeps its earliest dropped nodes back, in node order, up to the largest count. Every parent precedes its
    children and the earliest dropped node's parent survives, so the sets stay ancestor-closed. Keeping a node
    is always safe; it only gives back less time."""
    counts = keep.sum(1, keepdim=True)
    target = counts.max()
    dropped_rank = (~keep).cumsum(1)  # 1 for the earliest dropped node of a row, 2 for the next...
    return keep | (~keep & (dropped_rank <= target - counts))


def survivor_index(keep: torch.Tensor) -> torch.Tensor:
    """`[B, n']` original indices of the survivors, ascending, from a mask with equal counts per row."""
    batch = keep.shape[0]
    return keep.nonzero()[:, 1].view(batch, -1)


def subset_buffers(buffers: TreeBuffers, index: torch.Tensor) -> TreeBuffers:
    """The buffers of the tree made of nodes `index` `[B, n']` (ascending, ancestor-closed, root first)."""
    batch, n = buffers.parents.shape
    new_of_old = torch.full((batch, n), -1, dtype=torch.long, device=index.device)
    new_of_old.scatter_(1, index, torch.arange(index.shape[1], device=index.device).expand_as(index))
    old_parents = buffers.parents.gather(1, index)
    parents = torch.where(old_parents < 0, -1, new_of_old.gather(1, old_parents.clamp(min=0)))
    return buffers_from_parents(parents, int(buffers.depths.max()))


def pruned_children_hit(parents: torch.Tensor, tokens: torch.Tensor, keep: torch.Tensor, last: torch.Tensor,
                        next_tokens: torch.Tensor) -> torch.Tensor:
    """`[B]` True where the verified path ended at node `last` (original index) with the model's next token
    held by one of its dropped children: in the unpruned tree that child would have been accepted (greedy), so
    pruning cost this pass at least one token."""
    children = parents == last[:, None]
    return (children & ~keep & (tokens == next_tokens[:, None])).any(1)
