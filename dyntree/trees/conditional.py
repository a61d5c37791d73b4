"""Depth-by-depth node selection for path-conditional heads (pure; the heads are behind `expand`).

With Hydra heads a node's children depend on the node's own path, so the candidates of depth d+1 exist only
once depth d is chosen. Each depth, one call of `expand` gives the top children (token, conditional
probability) of every frontier node of every sequence; a node's score is the product of the conditional
probabilities on its path, i.e. the heads' probability of the whole path. The tree is the `budget` best nodes.

Why this equals brute force over all paths (each node offering the same top children): rank nodes by
(score descending, depth ascending, tokens); a child never scores above its parent and is deeper, so it
ranks after it, and the best `budget` nodes of any set are ancestor-closed. A node among the best `budget`
of all paths is also among the best `budget` of the candidates generated so far (fewer rivals), so the
frontier of its depth (the generated candidates of that depth ranked within the best `budget`) holds it and
its children get generated; by induction every node of the global best set is generated, and the best
`budget` of the generated superset is exactly that set.
"""

from __future__ import annotations

from typing import Callable, Sequence

Path = tuple[int, ...]  # token ids below the root
# expand([(row, path), ...]) -> per request, the node's top children as (token, conditional probability).
Expand = Callable[[list[tuple[int, Path]]], Sequence[Sequence[tuple[int, float]]]]


def rank_key(path: Path, score: float) -> tuple:
    return (-score, len(path), path)


def best_ranked(scores: dict[Path, float], budget: int) -> list[Path]:
    """The `budget` best paths in rank order (ancestor-closed, parents first)."""
    return sorted(scores, key=lambda p: rank_key(p, scores[p]))[:budget]


def select_by_depth(expand: Expand, batch: int, budget: int, depth_limit: int) -> list[list[tuple[Path, float]]]:
    """Per sequence, the `budget` best (path, score) pairs in rank order, found with one `expand` call per
    depth (at most `depth_limit` depths)."""
    scores: list[dict[Path, float]] = [{} for _ in range(batch)]
    frontier: list[list[Path]] = [[()] for _ in range(batch)]
    if budget <= 0:
        return [[] for _ in range(batch)]
    for depth in range(depth_limit):
        requests = [(b, path) for b in range(batch) for path in frontier[b]]
        if not requests:
            break
        for (b, parent), children in zip(requests, expand(requests)):
            base = scores[b].get(parent, 1.0)
            for token, prob in children:
                scores[b][parent + (int(token),)] = base * float(prob)
        frontier = [[p for p in best_ranked(scores[b], budget) if len(p) == depth + 1] for b in range(batch)]
    return [[(p, scores[b][p]) for p in best_ranked(scores[b], budget)] for b in range(batch)]


class ExpandedChildren:
    """The children every `expand` call answered, kept by node: a draft's `rank_of` (a proposed node's rank
    among its parent's guesses and its conditional probability) reads them back."""

    def __init__(self):
        self._ranks: dict[tuple[int, Path], tuple[int, float]] = {}

    def record(self, requests: list[tuple[int, Path]], ids: list[list[int]],
               probs: list[list[float]]) -> list[list[tuple[int, float]]]:
        """Keep each requested node's children (`ids`, `probs`: per request, best first) and return them as
        `expand` answers them."""
        out = []
        for (b, path), row_ids, row_probs in zip(requests, ids, probs):
            out.append(list(zip(row_ids, row_probs)))
            for rank, (token, prob) in enumerate(zip(row_ids, row_probs)):
                self._ranks[(b, path + (token,))] = (rank, prob)
        return out

    def rank_of(self, row: int, path: Path) -> tuple[int, float]:
        return self._ranks[(row, path)]
