"""Context lookup: a draft branch copied from earlier text, merged into a step's dynamic tree.

Answers repeat their prompt and themselves (names, code, lists, quoted passages). When the last few tokens
before the root occurred earlier in the context, the tokens that followed them then are a cheap guess of what
follows now (prompt-lookup decoding). The heads guess from one hidden state and cannot see such copies; a
lookup chain can reach past the heads' depth. So the dynamic tree gets the chain as one extra branch: the
chain's nodes are placed first, and the heads' best nodes fill the rest of the same node budget (a chain
token that equals a head's guess is one node, not two), so a step costs what it did without lookup.

All functions are pure (lists of ints in, lists out): easy to test against brute force.
"""

from __future__ import annotations


def find_chain(context: list[int], max_len: int, max_ngram: int = 3, min_ngram: int = 2) -> tuple[list[int], int]:
    """Tokens that followed the most recent earlier occurrence of the context's last n-gram.

    Tries n = max_ngram down to min_ngram and takes the first n that matches; returns (chain, n), or ([], 0)
    when nothing matches. The chain holds at most `max_len` tokens and never extends past the context.
    """
    size = len(context)
    if max_len <= 0:
        return [], 0
    for n in range(min(max_ngram, size - 1), min_ngram - 1, -1):
        if n <= 0:
            break
        suffix = context[size - n:]
        last = suffix[-1]
        # The most recent match first: candidate end positions i (the match is context[i-n+1 .. i]).
        for i in range(size - 2, n - 2, -1):
            if context[i] == last and context[i - n + 1 : i + 1] == suffix:
                return context[i + 1 : i + 1 + max_len], n
    return [], 0


def merge_chain(head_paths: list[tuple[int, ...]], chain: list[int], budget: int) -> list[tuple[int, ...]]:
    """The token paths of a tree of `budget` non-root nodes: the chain's prefixes first, then head paths.

    `head_paths` are token paths (root excluded) in the heads' selection order, which is ancestor-closed for
    every prefix; chain prefixes are ancestor-closed too, so the union stays a tree. Duplicates are merged.
    Returns at most `budget` distinct paths, chain prefixes first, then heads' paths in their order.
    """
    out: list[tuple[int, ...]] = []
    seen: set[tuple[int, ...]] = set()
    for d in range(1, min(len(chain), budget) + 1):
        path = tuple(chain[:d])
        out.append(path)
        seen.add(path)
    for path in head_paths:
        if len(out) >= budget:
            break
        if path not in seen:
            seen.add(path)
            out.append(path)
    return out


def merge_scored(score_of: dict[tuple[int, ...], float], budget: int) -> list[tuple[int, ...]]:
    """The `budget` best token paths of a candidate set, by score; `score_of` maps every candidate path (the
    heads' nodes and the chain's prefixes, a path proposed by both with the higher of its two scores) to its
    score.

    Scores never increase from a node to its child within either source, so the union's scores do not
    either, and taking nodes by descending score (the shallower first on ties) keeps every chosen node's
    parent chosen.
    """
    ranked = sorted(score_of, key=lambda p: (-score_of[p], len(p)))
    chosen: list[tuple[int, ...]] = []
    taken: set[tuple[int, ...]] = set()
    for path in ranked:
        if len(chosen) >= budget:
            break
        if len(path) == 1 or path[:-1] in taken:
            chosen.append(path)
            taken.add(path)
    return chosen


class LookupBranch:
    """One dynamic tree's context-lookup branch: finds each step's chain, scores its nodes by how often
    chain nodes at that depth were accepted so far, merges them with the heads' nodes, and keeps the counts.

    max_len: chain tokens per tree; ngram: (longest, shortest) suffix n-gram matched in the context;
    merge: "first" (chain nodes placed first, heads fill the rest; measured better) or "score" (chain nodes
    scored by their measured per-depth acceptance compete with the heads' nodes).
    """

    def __init__(self, max_len: int, ngram: tuple[int, int] = (3, 2), merge: str = "first"):
        self.max_len = max_len
        self.ngram = (int(ngram[0]), int(ngram[1]))
        self.merge = merge
        self.proposed = [0] * max_len
        self.accepted = [0] * max_len

    def chain(self, context: list[int]) -> list[int]:
        return find_chain(context, self.max_len, *self.ngram)[0]

    def rates(self) -> list[float]:
        """Measured rate at which chain node d was accepted given its parent was (Laplace-smoothed)."""
        return [(a + 1.0) / (p + 2.0) for a, p in zip(self.accepted, self.proposed)]

    def merge_into(self, head_paths: list[tuple[int, ...]], meta: dict, chain: list[int],
                   budget: int) -> list[tuple[int, ...]]:
        """The tree's token paths (every prefix a tree): the heads' paths in selection order merged with the
        chain's prefixes. `meta` maps each head path to (score, rank, head probability) and gains the chain's
        paths (rank -1 when no head guessed them; a path both proposed keeps the better score)."""
        chain_score = 1.0
        for d, rate in zip(range(1, min(len(chain), budget) + 1), self.rates()):
            chain_score *= rate
            path = tuple(chain[:d])
            if path in meta:
                score, rank, prob = meta[path]
                meta[path] = (max(score, chain_score), rank, prob)
            else:
                meta[path] = (chain_score, -1, 0.0)
        if self.merge == "score":
            return merge_scored({path: m[0] for path, m in meta.items()}, budget)
        return merge_chain(head_paths, chain, budget)

    def record(self, chain_nodes: list[int], parents: list[int], accepted: set[int]) -> None:
        """Count one verified tree: chain node d was tried when its parent was accepted."""
        for d, node in enumerate(chain_nodes[: self.max_len]):
            if parents[node] not in accepted:
                break
            self.proposed[d] += 1
            self.accepted[d] += node in accepted
