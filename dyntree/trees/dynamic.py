"""Dynamic trees: the candidate tree is chosen anew at every step from the heads' current guesses.

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
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import DynTreeError
from .buffers import buffers_from_parents
from .latency import LatencyModel, choose_tree_size
from .lookup import find_chain, merge_chain, merge_scored

DEFAULT_TREE_SIZE = 8  # measured best fixed size on a 2-core CPU (docs/dynamic-trees.md)
DEFAULT_TOPK = 8  # top-4 and top-10 were no better at 8 nodes (docs/dynamic-trees.md)
# Raw head probabilities are over-confident; flattening them (T=2) orders nodes across depths about as well
# as calibrated scores do, with no calibration data (docs/dynamic-trees.md). Calibrated scores use T=1.
DEFAULT_TREE_TEMPERATURE = 2.0
DEFAULT_LOOKUP = 6  # lookup-chain tokens per tree (docs/dynamic-trees.md); 0 = heads only
SCORE_MODES = ("prob", "rank", "binned")

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


# -- calibration -----------------------------------------------------------------------------------------
@dataclass
class AcceptanceStats:
    """How often a node was accepted given that its parent was, per head depth and per rank / probability bin.

    Raw head probabilities are over-confident; these counts turn them into measured acceptance rates. They
    are collected online from each step's verification (`observe`) or loaded from a file collected on
    other prompts. A factor is shrunk towards the raw marginal while counts are few:
    `(accepted + c * p) / (proposed + c)`, so an empty table means raw probabilities.
    """

    num_heads: int
    topk: int
    bins: int = 10
    prior_strength: float = 8.0
    proposed_rank: torch.Tensor = field(default=None)  # [K, m]
    accepted_rank: torch.Tensor = field(default=None)
    proposed_bin: torch.Tensor = field(default=None)  # [K, bins]
    accepted_bin: torch.Tensor = field(default=None)

    def __post_init__(self):
        for name, width in (("proposed_rank", self.topk), ("accepted_rank", self.topk),
                            ("proposed_bin", self.bins), ("accepted_bin", self.bins)):
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros(self.num_heads, width, dtype=torch.float64))

    def bin_of(self, probs: torch.Tensor) -> torch.Tensor:
        return (probs * self.bins).long().clamp(0, self.bins - 1)

    def factors(self, probs: torch.Tensor, mode: str) -> torch.Tensor:
        """Per-node factors `[B, K, m]` for marginals `probs` `[B, K, m]` under a score mode."""
        if mode == "prob":
            return probs
        k, m = probs.shape[1], probs.shape[2]
        c = self.prior_strength
        if mode == "rank":
            acc = self.accepted_rank[:k, :m].to(probs.device)
            prop = self.proposed_rank[:k, :m].to(probs.device)
            return ((acc + c * probs) / (prop + c)).clamp(0.0, 1.0)
        if mode == "binned":
            bins = self.bin_of(probs)  # [B, K, m]
            heads = torch.arange(k, device=probs.device)[None, :, None].expand_as(bins)
            acc = self.accepted_bin.to(probs.device)[heads, bins]
            prop = self.proposed_bin.to(probs.device)[heads, bins]
            return ((acc + c * probs) / (prop + c)).clamp(0.0, 1.0)
        raise DynTreeError(f"unknown tree score {mode!r}: choose from {', '.join(SCORE_MODES)}")

    def update(self, depths: torch.Tensor, ranks: torch.Tensor, probs: torch.Tensor, parents: torch.Tensor,
               accepted: torch.Tensor) -> None:
        """Count one tree (1-D tensors over its n nodes; `accepted` is a bool mask of the accepted path)."""
        parent_list, acc = parents.tolist(), accepted.tolist()
        seen = [i for i in range(1, len(parent_list)) if acc[parent_list[i]]]
        d, r, p = depths.tolist(), ranks.tolist(), probs.tolist()
        self.record([d[i] - 1 for i in seen], [r[i] for i in seen], [p[i] for i in seen], [acc[i] for i in seen])

    def record(self, heads: list[int], ranks: list[int], probs: list[float], accepted: list[bool]) -> None:
        """Count nodes whose parent was accepted: their head (depth - 1), rank, probability and outcome."""
        keep = [i for i, h in enumerate(heads) if h < self.num_heads]
        if not keep:
            return
        head_t = torch.tensor([heads[i] for i in keep])
        rank_t = torch.tensor([ranks[i] for i in keep])
        bin_t = torch.tensor([min(max(int(probs[i] * self.bins), 0), self.bins - 1) for i in keep])
        ones = torch.ones(len(keep), dtype=torch.float64)
        hits = torch.tensor([float(accepted[i]) for i in keep], dtype=torch.float64)
        in_range = rank_t < self.topk
        self.proposed_rank.index_put_((head_t[in_range], rank_t[in_range]), ones[in_range], accumulate=True)
        self.accepted_rank.index_put_((head_t[in_range], rank_t[in_range]), hits[in_range], accumulate=True)
        self.proposed_bin.index_put_((head_t, bin_t), ones, accumulate=True)
        self.accepted_bin.index_put_((head_t, bin_t), hits, accumulate=True)

    def rates(self, which: str = "rank") -> torch.Tensor:
        acc = self.accepted_rank if which == "rank" else self.accepted_bin
        prop = self.proposed_rank if which == "rank" else self.proposed_bin
        return torch.where(prop > 0, acc / prop.clamp_min(1), torch.full_like(acc, float("nan")))

    # -- persistence ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": "dyntree-acceptance", "num_heads": self.num_heads, "topk": self.topk,
                "bins": self.bins, "prior_strength": self.prior_strength,
                **{k: getattr(self, k).tolist() for k in ("proposed_rank", "accepted_rank", "proposed_bin",
                                                           "accepted_bin")}}

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict()) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AcceptanceStats":
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text())
            if data.get("format") != "dyntree-acceptance":
                raise ValueError("not a dyntree acceptance-statistics file")
            stats = cls(int(data["num_heads"]), int(data["topk"]), int(data["bins"]), float(data["prior_strength"]),
                        *(torch.tensor(data[k], dtype=torch.float64) for k in
                          ("proposed_rank", "accepted_rank", "proposed_bin", "accepted_bin")))
            if stats.proposed_rank.shape != (stats.num_heads, stats.topk) or \
                    stats.proposed_bin.shape != (stats.num_heads, stats.bins):
                raise ValueError("table shapes do not match num_heads/topk/bins")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DynTreeError(f"cannot read acceptance statistics {path}: {exc}".splitlines()[0]) from exc
        return stats

    def resized(self, num_heads: int, topk: int) -> "AcceptanceStats":
        """A copy covering `num_heads` x `topk` (new cells start empty, extra ones are dropped)."""
        out = AcceptanceStats(num_heads, topk, self.bins, self.prior_strength)
        k, m = min(num_heads, self.num_heads), min(topk, self.topk)
        out.proposed_rank[:k, :m] = self.proposed_rank[:k, :m]
        out.accepted_rank[:k, :m] = self.accepted_rank[:k, :m]
        out.proposed_bin[:k] = self.proposed_bin[:k]
        out.accepted_bin[:k] = self.accepted_bin[:k]
        return out


# -- the proposer ----------------------------------------------------------------------------------------
class DynamicTreeProposer:
    """Builds each step's tree from the heads' current top-m guesses (see the module docstring).

    tree_size:   nodes per tree, root included.
    topk:        guesses taken from each head (m).
    temperature: applied to the head probabilities before renormalising over the top-m (default 2 with
                 raw probabilities, 1 with calibrated scores).
    score:       "prob" (marginals), "rank" (measured acceptance per head and rank) or "binned" (measured
                 acceptance per head and probability bin: calibrated probabilities).
    calibration: an `AcceptanceStats` or a file saved by one; default: an empty table.
    learn:       update the table online from every step's verification.
    latency:     a `LatencyModel` (or a file saved by one): then `tree_size` is the largest tree, and each
                 step takes the size with the most expected tokens per second (`choose_tree_size`; ProPD's
                 dynamic tree generation). Expected tokens come from the node scores, so a calibrated
                 `score` ("binned", "rank") suits it best.
    lookup:      at most this many tokens copied from the context (`trees.lookup`) form one more branch,
                 inside the same `tree_size` budget; 0 = heads only. Needs `context` in `propose`.
    lookup_ngram: (longest, shortest) suffix n-gram matched in the context.
    lookup_merge: "first" (the chain's nodes are placed first, heads fill the rest; the default, measured
                 better) or "score" (chain nodes scored by their measured per-depth acceptance compete with
                 the heads' nodes).
    """

    uses_heads = True

    def __init__(self, num_heads: int, topk: int = DEFAULT_TOPK, tree_size: int = DEFAULT_TREE_SIZE,
                 temperature: float | None = None, score: str = "prob", calibration=None,
                 learn: bool | None = None, renormalize: bool = True, latency=None, lookup: int = DEFAULT_LOOKUP,
                 lookup_ngram: tuple[int, int] = (3, 2), lookup_merge: str = "first"):
        if not isinstance(tree_size, int) or tree_size < 2:
            raise DynTreeError(f"tree size must be an integer of at least 2 (root + 1 candidate), got {tree_size!r}")
        if not isinstance(topk, int) or topk < 1:
            raise DynTreeError(f"topk must be a positive integer, got {topk!r}")
        if num_heads < 1:
            raise DynTreeError("a dynamic tree needs at least one head")
        if temperature is None:
            temperature = DEFAULT_TREE_TEMPERATURE if score == "prob" else 1.0
        if not temperature > 0:
            raise DynTreeError(f"tree temperature must be positive, got {temperature!r}")
        if score not in SCORE_MODES:
            raise DynTreeError(f"unknown tree score {score!r}: choose from {', '.join(SCORE_MODES)}")
        possible = sum(topk ** d for d in range(1, num_heads + 1))
        if tree_size - 1 > possible:
            raise DynTreeError(f"tree size {tree_size} exceeds the {possible + 1} nodes that {num_heads} heads x "
                               f"top-{topk} can form")
        self.num_heads = num_heads
        self.topk = topk
        self.tree_size = tree_size
        self.max_nodes = tree_size
        self.temperature = float(temperature)
        self.renormalize = renormalize
        self.score = score
        if isinstance(calibration, (str, os.PathLike)):
            calibration = AcceptanceStats.load(calibration)
        if calibration is None:
            calibration = AcceptanceStats(num_heads, topk)
        elif (calibration.num_heads, calibration.topk) != (num_heads, topk):
            calibration = calibration.resized(num_heads, topk)
        self.stats = calibration
        self.learn = (score != "prob") if learn is None else bool(learn)
        if isinstance(latency, (str, os.PathLike)):
            latency = LatencyModel.load(latency)
        self.latency = latency
        if not isinstance(lookup, int) or lookup < 0:
            raise DynTreeError(f"lookup must be a non-negative integer (tokens copied from the context), "
                               f"got {lookup!r}")
        if not (1 <= lookup_ngram[1] <= lookup_ngram[0]):
            raise DynTreeError(f"lookup n-gram range must be max >= min >= 1, got {lookup_ngram!r}")
        if lookup_merge not in ("first", "score"):
            raise DynTreeError(f"lookup merge must be 'first' or 'score', got {lookup_merge!r}")
        self.lookup = lookup
        self.lookup_merge = lookup_merge
        self.lookup_ngram = (int(lookup_ngram[0]), int(lookup_ngram[1]))
        self.uses_context = lookup > 0  # the decoding loop passes each sequence's tokens so far
        self.lookup_proposed = [0] * lookup
        self.lookup_accepted = [0] * lookup
        self._chains: list[list[int]] = []
        self._last = None  # the latest proposal and its node lists, for `observe`
        size = f"auto{tree_size}" if latency is not None else f"n{tree_size}"
        self.name = f"dynamic:{size}:k{topk}" + ("" if score == "prob" else f":{score}") + (
            f":lookup{lookup}" if lookup else "")

    def propose(self, root: torch.Tensor, head_ids: torch.Tensor, head_probs: torch.Tensor,
                context: list[list[int]] | None = None):
        from ..proposal import Proposal  # noqa: PLC0415 - proposal imports trees

        depth = min(self.num_heads, head_ids.shape[1])
        ids = head_ids[:, :depth, : self.topk]
        probs = marginals(head_probs[:, :depth, : self.topk], self.temperature, self.renormalize)
        factors = self.stats.factors(probs, self.score)
        chosen, chosen_scores = select_nodes(factors, self.tree_size)
        use_lookup = self.lookup > 0 and context is not None
        if use_lookup:
            return self._propose_with_lookup(root, ids, probs, chosen, chosen_scores, context)
        if self.latency is not None:  # selection order: every prefix is a tree, so cutting keeps it closed
            keep = choose_tree_size(chosen_scores, self.latency, self.tree_size) - 1
            chosen = [nodes[:keep] for nodes in chosen]
            chosen_scores = [row[:keep] for row in chosen_scores]
        batch, m = root.shape[0], ids.shape[2]
        prob_rows = probs.tolist() if self.learn else None
        parents, flat, scores, ranks, node_probs = [], [], [], [], []
        for row, (nodes, node_scores) in enumerate(zip(chosen, chosen_scores)):
            nodes, node_scores, _ = canonical_order(nodes, node_scores)
            parents.append([-1] + [p for p, _, _ in nodes])
            flat.append([(d - 1) * m + r for _, d, r in nodes])
            ranks.append([-1] + [r for _, _, r in nodes])
            scores.append([1.0] + node_scores)
            if prob_rows is not None:
                node_probs.append([1.0] + [prob_rows[row][d - 1][r] for _, d, r in nodes])
        device = root.device
        flat_t = torch.tensor(flat, dtype=torch.long, device=device)
        tokens = torch.cat([root[:, None], torch.gather(ids.reshape(batch, -1), 1, flat_t)], dim=1)
        buffers = buffers_from_parents(torch.tensor(parents, dtype=torch.long, device=device), depth)
        proposal = Proposal(tokens=tokens, buffers=buffers, scores=torch.tensor(scores, dtype=torch.float64),
                            ranks=torch.tensor(ranks, dtype=torch.long, device=device),
                            node_probs=torch.tensor(node_probs, dtype=torch.float64) if node_probs else None)
        # What `observe` needs, kept as Python lists (no tensor work per node later).
        self._chains = []
        self._last = (proposal, parents, ranks, node_probs) if self.learn else None
        return proposal

    def _propose_with_lookup(self, root, ids, probs, chosen, chosen_scores, context):
        """The tree from the heads' best nodes and each sequence's lookup chain (see `trees.lookup`).

        With a latency model the size is chosen on the merged order (chain first), whose prefixes are trees,
        so a step with a trusted chain can afford more nodes than the heads alone would justify.
        """
        from ..proposal import Proposal  # noqa: PLC0415 - proposal imports trees

        id_rows, prob_rows = ids.tolist(), probs.tolist()
        chains = [find_chain(ctx, self.lookup, *self.lookup_ngram)[0] for ctx in context]
        merged = [self._lookup_candidates(nodes, node_scores, id_rows[row], prob_rows[row], chains[row])
                  for row, (nodes, node_scores) in enumerate(zip(chosen, chosen_scores))]
        if self.latency is not None:
            keep = choose_tree_size([[meta[p][0] for p in paths] for paths, meta in merged], self.latency,
                                    self.tree_size) - 1
            merged = [(paths[:keep], meta) for paths, meta in merged]
        parents, tokens, scores, ranks, node_probs = [], [], [], [], []
        self._chains = []
        for row, (paths, meta) in enumerate(merged):
            row_parents, row_tokens, row_scores, row_ranks, row_probs, chain_nodes = \
                self._tree_from_paths(paths, meta, chains[row])
            tokens.append([int(root[row])] + row_tokens)
            parents.append(row_parents)
            scores.append(row_scores)
            ranks.append(row_ranks)
            node_probs.append(row_probs)
            self._chains.append(chain_nodes)
        device = root.device
        max_depth = max([ids.shape[1]] + [len(c) for c in chains])
        buffers = buffers_from_parents(torch.tensor(parents, dtype=torch.long, device=device), max_depth)
        proposal = Proposal(tokens=torch.tensor(tokens, dtype=torch.long, device=device), buffers=buffers,
                            scores=torch.tensor(scores, dtype=torch.float64),
                            ranks=torch.tensor(ranks, dtype=torch.long, device=device),
                            node_probs=torch.tensor(node_probs, dtype=torch.float64))
        self._last = (proposal, parents, ranks, node_probs)
        return proposal

    def _lookup_candidates(self, nodes: list[Node], node_scores: list[float], ids: list[list[int]],
                           probs: list[list[float]], chain: list[int]):
        """One row's token paths (a tree in every prefix) from the heads' nodes in selection order and a
        lookup chain, plus per path (score, rank or -1 for lookup-only nodes, head probability)."""
        paths, meta = [], {}
        for (parent, d, r), score in zip(nodes, node_scores):
            path = (paths[parent - 1] if parent > 0 else ()) + (ids[d - 1][r],)
            paths.append(path)
            meta[path] = (score, r, probs[d - 1][r])
        budget = len(nodes)
        chain_rates = self.lookup_rates()
        chain_score = 1.0
        for d in range(1, min(len(chain), budget) + 1):
            chain_score *= chain_rates[d - 1]
            path = tuple(chain[:d])
            if path in meta:  # the heads guessed it too: keep the better of the two estimates
                score, r, p = meta[path]
                meta[path] = (max(score, chain_score), r, p)
            else:
                meta[path] = (chain_score, -1, 0.0)
        if self.lookup_merge == "score":
            return merge_scored({path: m[0] for path, m in meta.items()}, budget), meta
        return merge_chain(paths, chain, budget), meta

    @staticmethod
    def _tree_from_paths(paths: list[tuple[int, ...]], meta: dict, chain: list[int]):
        """Parents, node tokens (root excluded), scores, ranks, head probabilities and the chain's node
        indices of the tree holding `paths`. Breadth-first; siblings most likely first, because verification
        projects the first-child chain in one call and other nodes one by one."""
        index: dict[tuple[int, ...], int] = {(): 0}
        out_paths: list[tuple[int, ...]] = []
        for d in range(1, max((len(p) for p in paths), default=0) + 1):
            level = [p for p in paths if len(p) == d]
            level.sort(key=lambda p: (index[p[:-1]], -meta[p][0], p[-1]))
            for p in level:
                out_paths.append(p)
                index[p] = len(out_paths)
        chain_set = {tuple(chain[:d]) for d in range(1, len(chain) + 1)}
        parents = [-1] + [index[p[:-1]] for p in out_paths]
        tokens = [p[-1] for p in out_paths]
        scores = [1.0] + [meta[p][0] for p in out_paths]
        ranks = [-1] + [meta[p][1] for p in out_paths]
        node_probs = [1.0] + [meta[p][2] for p in out_paths]
        chain_nodes = [index[p] for p in out_paths if p in chain_set]
        return parents, tokens, scores, ranks, node_probs, chain_nodes

    def lookup_rates(self) -> list[float]:
        """Measured rate at which lookup-chain node d was accepted given its parent was (Laplace-smoothed)."""
        return [(a + 1.0) / (p + 2.0) for a, p in zip(self.lookup_accepted, self.lookup_proposed)]

    def observe(self, proposal, verification, active: torch.Tensor | None = None) -> None:
        """Feed one step's verification back into the acceptance table (when learning) and into the lookup
        chain's per-depth acceptance counts (when lookup is on)."""
        last = self._last
        if last is None or last[0] is not proposal:
            return
        _, parents, ranks, node_probs = last
        active_rows = None if active is None else active.tolist()
        heads, seen_ranks, seen_probs, hits = [], [], [], []
        for b, nodes in enumerate(verification.accepted_nodes):
            if active_rows is not None and not active_rows[b]:
                continue
            accepted = set(nodes.tolist())
            if self._chains:
                for d, i in enumerate(self._chains[b]):
                    if parents[b][i] not in accepted or d >= len(self.lookup_proposed):
                        break
                    self.lookup_proposed[d] += 1
                    self.lookup_accepted[d] += i in accepted
            if not self.learn:
                continue
            row_parents, depth = parents[b], [0] * len(parents[b])
            for i in range(1, len(row_parents)):
                depth[i] = depth[row_parents[i]] + 1
                if row_parents[i] in accepted and ranks[b][i] >= 0:  # rank -1: a lookup-only node
                    heads.append(depth[i] - 1)
                    seen_ranks.append(ranks[b][i])
                    seen_probs.append(node_probs[b][i])
                    hits.append(i in accepted)
        if self.learn:
            self.stats.record(heads, seen_ranks, seen_probs, hits)


def static_paths_from_stats(stats: AcceptanceStats, tree_size: int) -> list[list[int]]:
    """The best *fixed* tree for measured acceptance rates: what a calibrated static tree looks like.

    Same exact selection as the dynamic trees, on per-(depth, rank) rates instead of a step's marginals
    (Medusa builds its static trees the same way from rates measured on calibration data).
    """
    rates = torch.where(stats.proposed_rank > 0, stats.accepted_rank / stats.proposed_rank.clamp_min(1),
                        torch.zeros_like(stats.accepted_rank)).clamp(0.0, 1.0)
    nodes, _ = best_first_nodes(rates.tolist(), tree_size - 1)
    _, _, paths = canonical_order(nodes, [0.0] * len(nodes))
    return [list(p) for p in paths]


def collect_acceptance_stats(dt, prompts, max_new_tokens: int = 64, tree_size: int = 32, topk: int = 10,
                             stats: AcceptanceStats | None = None, progress=None) -> AcceptanceStats:
    """Decode `prompts` (text or ids) with a learning dynamic tree on `dt` (a `DynTree`) and return its table.

    Use prompts that are not the benchmark's. A wide tree sees more (depth, rank) cells per step.
    """
    # Heads only (every node then teaches the table), at temperature 1: the probability bins must be those
    # that the calibrated scores ("rank", "binned", temperature 1 by default) look up.
    proposer = DynamicTreeProposer(dt.heads.num_heads, topk, tree_size=tree_size, calibration=stats, learn=True,
                                   lookup=0, temperature=1.0)
    for i, prompt in enumerate(prompts):
        dt.decoder(proposer).run([dt.encode(prompt)], max_new_tokens).consume()
        if progress is not None:
            progress(i + 1, len(prompts))
    return proposer.stats
