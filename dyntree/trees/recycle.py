"""Recycled candidates (Token Recycling, arXiv 2408.08696): a table of each token's likely next tokens.

Every verified step shows which token followed which. The table keeps, per token id, up to k next-token ids
(most likely first: here the most recently observed successor first), and proposes candidate paths from a
step's root by following it. The paths join the dynamic tree like the lookup chain, inside the same node
budget. One table per proposer (so per tree the server built); a plain dict, no global state.

Each sequence has its own table, made from its own text (prompt + tokens emitted so far: the top-1 successors
that verification revealed), not the backbone's top-k at verified nodes. Being a function of the sequence's
text, it keeps sequences of a batch independent and a seeded run reproducible; `ContextTables` extends each
row's table incrementally as its text grows instead of rebuilding it every step.
"""

from __future__ import annotations

import heapq


class SuccessorTable:
    """Per token id, up to `k` next-token ids, most likely first."""

    def __init__(self, k: int = 2):
        if k < 1:
            raise ValueError("a successor table needs k >= 1")
        self.k = k
        self.next: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.next)

    def successors(self, token: int) -> list[int]:
        return self.next.get(int(token), [])

    def update(self, token: int, next_ids: list[int]) -> None:
        """Observe `next_ids` (most likely first) after `token`: they go in front, older entries move back,
        duplicates are dropped and the list is cut to k."""
        old = self.next.get(int(token), [])
        new = [int(t) for t in next_ids]
        merged = list(dict.fromkeys(new + old))
        self.next[int(token)] = merged[: self.k]

    def observe_sequence(self, tokens: list[int]) -> None:
        """Observe every consecutive pair of a token sequence (each token's successor is the next one)."""
        for a, b in zip(tokens, tokens[1:]):
            self.update(a, [b])

    @classmethod
    def from_sequences(cls, sequences, k: int = 2) -> "SuccessorTable":
        """A table seeded from token sequences (e.g. a distilled dataset's responses), most recent last."""
        table = cls(k)
        for tokens in sequences:
            table.observe_sequence([int(t) for t in tokens])
        return table

    def chain(self, root: int, length: int) -> list[int]:
        """Up to `length` tokens following the most likely successor from `root` (stops at unknown tokens)."""
        out, token = [], int(root)
        for _ in range(max(length, 0)):
            nxt = self.successors(token)
            if not nxt:
                break
            token = nxt[0]
            out.append(token)
        return out

    def tree(self, root: int, budget: int) -> list[tuple[int, ...]]:
        """Up to `budget` token paths (root excluded) from `root`, best first: a path's score is the product
        of 1 / (1 + rank) over its steps; ties go to the shallower, then to the earlier found. Every prefix of
        the returned list is ancestor-closed (a tree), and siblings hold distinct tokens."""
        out: list[tuple[int, ...]] = []
        heap: list[tuple[float, int, int, tuple[int, ...]]] = []
        counter = 0

        def push(path: tuple[int, ...], score: float) -> None:
            nonlocal counter
            last = path[-1] if path else int(root)
            for r, t in enumerate(self.successors(last)):
                heapq.heappush(heap, (-score / (1 + r), len(path) + 1, counter, path + (t,)))
                counter += 1

        push((), 1.0)
        while heap and len(out) < budget:
            neg, _, _, path = heapq.heappop(heap)
            out.append(path)
            push(path, -neg)
        return out


class ContextTables:
    """Per batch row, the successor table of that row's context, extended with the new pairs at each step.

    A row's cached table is reused when the new context extends the one it was built from (same length at
    least, same first token and same token at the old end); otherwise (another sequence took the row) it is
    rebuilt. A wrong reuse could only change which candidates are proposed, never what is accepted.
    """

    def __init__(self, k: int = 2):
        self.k = k
        self._rows: dict[int, tuple[int, int, int, SuccessorTable]] = {}  # row -> (len, first, last, table)

    def table(self, row: int, context: list[int]) -> SuccessorTable:
        cached = self._rows.get(row)
        n = len(context)
        if cached is not None and cached[0] <= n and cached[0] > 0 and context[0] == cached[1] \
                and context[cached[0] - 1] == cached[2]:
            start, table = cached[0] - 1, cached[3]
        else:
            start, table = 0, SuccessorTable(self.k)
        table.observe_sequence(context[start:])
        if n:
            self._rows[row] = (n, context[0], context[-1], table)
        return table
