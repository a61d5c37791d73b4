"""One step's node budget for a whole batch (ProPD's dynamic tree generation, batched). Pure functions.

Each sequence b offers candidate nodes in selection order (every prefix is a tree), each with a score: an
estimate of the probability that its whole path is accepted, so taking k of them adds `1 + sum of the k
scores` tokens in expectation. A batch step verifies a `[B, n]` block: every row holds its real nodes and is
padded to the step's width n with nodes that can never be accepted (`trees.buffers.pad_parents`), and what
the step costs depends on the batch size and n (`latency.BatchLatency`), not on how many nodes are real.

The budget is chosen by one ranking across the batch: all active rows' candidates, best first, each row's in
its own order. For a width n the step takes, from that ranking, every node whose row still has fewer than
n - 1 nodes: a padded slot costs what a real node costs, so a row is never left below the width while it has
candidates. The width with the most expected tokens per second wins (the smaller on ties). Rows that have
finished get the root alone, count nothing, and still cost their share of the block; when no width beats the
root alone (large batches, where a bigger block costs nearly proportionally more), every tree shrinks to the
root: plain decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Allocation:
    """Nodes per row (root excluded), the step's width (root included), and the model's expectations."""

    counts: list[int]
    width: int
    expected_tokens: float  # over the active rows, roots included
    seconds: float  # the cost model's seconds for this width

    @property
    def rate(self) -> float:
        return self.expected_tokens / self.seconds


def ranking(scores: list[list[float]], active: list[bool]) -> list[tuple[int, int]]:
    """Every active row's candidates in one order, best first: `(row, index in the row)`.

    A k-way merge of the rows by score (ties: lower row, then earlier index), each row read in its own order,
    so the first k entries of any row are always its first k candidates (a tree) even where a row's scores
    are not sorted (a lookup chain merged in front of the heads' nodes).
    """
    heads = {b: 0 for b, row in enumerate(scores) if active[b] and row}
    out = []
    while heads:
        b = max(heads, key=lambda r: (scores[r][heads[r]], -r))
        out.append((b, heads[b]))
        heads[b] += 1
        if heads[b] == len(scores[b]):
            del heads[b]
    return out


def allocate_nodes(scores: list[list[float]], active: list[bool], cost: Callable[[int], float],
                   max_size: int) -> Allocation:
    """The step's allocation: `cost(n)` is the step's seconds at width n (this batch size, root included);
    `max_size` the widest tree allowed (root included). See the module docstring for the rule."""
    order = ranking(scores, active)
    base = float(sum(bool(a) for a in active))  # every active row's root (the bonus token) is certain
    batch = len(scores)
    best = Allocation([0] * batch, 1, base, cost(1))
    for width in range(2, max_size + 1):
        counts = [0] * batch
        expected = base
        for b, i in order:
            if counts[b] < width - 1:
                counts[b] += 1
                expected += scores[b][i]
        if max(counts, default=0) < width - 1:
            break  # no row can fill this width: wider steps only cost more
        candidate = Allocation(counts, width, expected, cost(width))
        if candidate.rate > best.rate:
            best = candidate
    return best

