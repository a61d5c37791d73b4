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
