"""Node selection for dynamic trees: the best nodes of one step's tree from the heads' guesses (pure functions).

Each head d (0-based) offers its top-m tokens with probabilities; renormalised over those m (optionally
sharpened or flattened by a temperature) they are the step's *marginals* `[B, K, m]`. A candidate node is a
path of ranks `(r_0, ..., r_{d})` - head 0's r_0-th guess, then head 1's r_1-th guess, ... - and its score
is the product of its per-head factors (the marginals, or calibrated acceptance rates, see
`AcceptanceStats`). The tree is the n-1 best nodes plus the root.

Why best-first is exact: every factor is <= 1, so a node never scores above its parent, and a node never
scores above its previous sibling once siblings are sorted by factor. Give each node a *generator* - its
previous sibling, or its parent when it is a first child; generators precede the nodes they generate in the
total order (score descending, then the path of sorted positions ascending), so popping a heap that only
ever adds a popped node's next sibling and first child yields the nodes exactly in that order: the result
equals brute force over all prefixes, in O(n log n) with at most 2 pushes per pop. The same order puts a
parent before its children even when their scores are equal (a factor of exactly 1.0), so the chosen set
is always ancestor-closed and the result is deterministic.

The root's own probability is a factor common to every node of a step's tree, so at a fixed tree size it
cannot change which nodes are chosen; it is not used.
"""

from __future__ import annotations

import heapq

import torch

# One chosen node: (parent node index, head depth 1..K, rank among that head's top-m).
Node = tuple[int, int, int]


def marginals(head_probs: torch.Tensor, temperature: float = 1.0, renormalize: bool = True) -> torch.Tensor:
    """Per-head guess probabilities `[B, K, m]` renormalised over the top-m, with an optional temperature.

    `p ** (1/T)` renormalised over the top-m equals softmax(logits / T) restricted to those tokens.
    """
    probs = head_probs.double()
    if temperature != 1.0:
        probs = probs.clamp_min(1e-30) ** (1.0 / temperature)
    if renormalize:
        probs = probs / probs.sum(-1, keepdim=True).clamp_min(1e-30)
    return probs.clamp(0.0, 1.0)


def best_first_nodes(factors: list[list[float]], budget: int) -> tuple[list[Node], list[float]]:
    """The `budget` best nodes of one tree from per-head factors `[K][m]` (each in [0, 1]).

    Returns the nodes in selection order (parent before child; node i of the tree is entry i-1, the root is
    node 0) and their path scores. Ties are broken by the path of sorted positions, so the set is
    ancestor-closed and deterministic; see the module docstring for why this equals brute force.
    """
    depth_limit = len(factors)
    if depth_limit == 0 or budget <= 0:
        return [], []
    width = len(factors[0])
    # Per head: ranks sorted by factor (descending, rank ascending on ties) and the sorted factors.
    order = [sorted(range(width), key=lambda r, f=f: (-f[r], r)) for f in factors]
    sorted_factors = [[f[r] for r in o] for f, o in zip(factors, order)]
    nodes: list[Node] = []
    scores: list[float] = []
    # Heap entry: (-score, positions path, parent node index, parent score, depth, position).
    heap = [(-sorted_factors[0][0], (0,), 0, 1.0, 1, 0)]
    while heap and len(nodes) < budget:
        neg, path, parent, parent_score, depth, pos = heapq.heappop(heap)
        score = -neg
        nodes.append((parent, depth, order[depth - 1][pos]))
        scores.append(score)
        index = len(nodes)  # this node's index in the tree (root = 0)
        if pos + 1 < width:  # next sibling
            s = parent_score * sorted_factors[depth - 1][pos + 1]
            heapq.heappush(heap, (-s, path[:-1] + (pos + 1,), parent, parent_score, depth, pos + 1))
        if depth < depth_limit:  # first child
            s = score * sorted_factors[depth][0]
            heapq.heappush(heap, (-s, path + (0,), index, score, depth + 1, 0))
    return nodes, scores


def select_nodes(factors: torch.Tensor, tree_size: int) -> tuple[list[list[Node]], list[list[float]]]:
    """Batched selection: factors `[B, K, m]` -> per row the `tree_size - 1` best nodes and their scores.

    One host transfer for the whole batch, then a small heap per row (no per-node tensor work).
    """
    rows = factors.tolist()
    chosen = [best_first_nodes(row, tree_size - 1) for row in rows]
    return [c[0] for c in chosen], [c[1] for c in chosen]


def canonical_order(nodes: list[Node], scores: list[float]) -> tuple[list[Node], list[float], list[tuple[int, ...]]]:
    """Reorder nodes as the static builder does (by depth, then rank path): returns nodes, scores, paths.

    Same node order means identical buffers for the same path set, whichever builder made them.
    """
    paths: list[tuple[int, ...]] = []
    for parent, _, rank in nodes:
        paths.append((paths[parent - 1] if parent > 0 else ()) + (rank,))
    perm = sorted(range(len(nodes)), key=lambda i: (len(paths[i]), paths[i]))
    new_index = {old + 1: new + 1 for new, old in enumerate(perm)}
    new_index[0] = 0
    out_nodes = [(new_index[nodes[i][0]], nodes[i][1], nodes[i][2]) for i in perm]
    return out_nodes, [scores[i] for i in perm], [paths[i] for i in perm]


def brute_force_nodes(factors: list[list[float]], budget: int) -> list[tuple[tuple[int, ...], float]]:
    """Reference: score every prefix, sort by the same total order, keep `budget`. Exponential; tests only."""
    depth_limit = len(factors)
    width = len(factors[0])
    order = [sorted(range(width), key=lambda r, f=f: (-f[r], r)) for f in factors]
    items = []

    def walk(positions: tuple[int, ...], score: float):
        depth = len(positions)
        if depth == depth_limit:
            return
        for pos in range(width):
            s = score * factors[depth][order[depth][pos]]
            path = positions + (pos,)
            items.append((-s, path))
            walk(path, s)

    walk((), 1.0)
    items.sort()
    return [(tuple(order[d][p] for d, p in enumerate(path)), -neg) for neg, path in items[:budget]]


def static_paths_from_stats(stats, tree_size: int) -> list[list[int]]:
    """The best *fixed* tree for measured acceptance rates (`stats`, an `AcceptanceStats`): what a calibrated
    static tree looks like.

    Same exact selection as the dynamic trees, on per-(depth, rank) rates instead of a step's marginals
    (Medusa builds its static trees the same way from rates measured on calibration data).
    """
    rates = torch.where(stats.proposed_rank > 0, stats.accepted_rank / stats.proposed_rank.clamp_min(1),
                        torch.zeros_like(stats.accepted_rank)).clamp(0.0, 1.0)
    nodes, _ = best_first_nodes(rates.tolist(), tree_size - 1)
    _, _, paths = canonical_order(nodes, [0.0] * len(nodes))
    return [list(p) for p in paths]
