"""The dynamic tree proposer (arXiv 2502.05947): each step's tree is chosen anew from the heads' guesses.

It composes four parts, each replaceable and tested on its own:
- node selection (`trees.selection`): the exact best-first choice of the step's best nodes;
- acceptance statistics (`trees.acceptance`): measured rates that replace raw probabilities as node scores;
- the lookup branch (`trees.lookup.LookupBranch`): a chain copied from the context, inside the same budget;
- the size policy (`trees.allocation.allocate_nodes`): with a latency model, one node budget for the whole
  batch, chosen by expected tokens per second and given out by one ranking across the batch (ProPD's dynamic
  tree generation), else the configured size. Rows may then hold different numbers of real nodes; the step's
  block is padded with nodes that can never be accepted (`trees.buffers.pad_parents`). When even the best
  tree is expected to be slower than plain decoding (a measured plain step, no heads), the next steps skip the
  heads and decode plainly, probing again after a back-off that doubles while trees keep losing.
"""

from __future__ import annotations

import os

import torch

from ..config import TreeConfig
from ..errors import DynTreeError
from ..trees import buffers_from_parents
from ..trees.acceptance import AcceptanceStats
from ..trees.allocation import allocate_nodes
from ..trees.buffers import pad_parents
from ..trees.conditional import select_by_depth
from ..trees.latency import BatchLatency, LatencyModel
from ..trees.lookup import LookupBranch, merge_chain
from ..trees.recycle import ContextTables
from ..trees.selection import Node, canonical_order, marginals, select_nodes
from .base import Proposal, Proposer


CONDITIONAL_TREE_TEMPERATURE = 1.5


class DynamicTreeProposer(Proposer):
    """Builds each step's tree from the heads' current top-m guesses (and the context lookup branch).

    `config` is a dynamic `TreeConfig` (or its fields as keywords, e.g. `DynamicTreeProposer(4, size=16)`);
    `latency` (a `LatencyModel` measured at batch 1, or a `BatchLatency`) overrides `config.latency` for a
    size chosen per step. `recycle` (overrides `config.recycle`; 0 = off): up to that many recycled candidates
    (each token's successors in the sequence's own text, `trees.recycle.ContextTables`) join each tree that
    has no lookup chain, before the heads' nodes, inside the same node budget.
    """

    uses_heads = True

    def __init__(self, num_heads: int, config: TreeConfig | None = None, latency=None, recycle: int | None = None,
                 recycle_k: int = 2, conditional: bool = False, **fields):
        if config is None:
            config = TreeConfig(kind="dynamic", **fields)
        elif fields:
            config = config.replace(**fields)
        if config.kind != "dynamic":
            raise DynTreeError(f"a dynamic tree proposer needs a dynamic tree config, got {config.kind!r}")
        if num_heads < 1:
            raise DynTreeError("a dynamic tree needs at least one head")
        topk, size = config.resolved_topk, config.resolved_size
        possible = sum(topk ** d for d in range(1, num_heads + 1))
        if size - 1 > possible:
            raise DynTreeError(f"tree size {size} exceeds the {possible + 1} nodes that {num_heads} heads x "
                               f"top-{topk} can form")
        latency = latency if latency is not None else config.latency
        if isinstance(latency, (str, os.PathLike)):
            latency = LatencyModel.load(latency)
        if config.auto and latency is None:
            raise DynTreeError("tree size 'auto' needs a latency model (DynTree measures one per machine)")
        self.config = config
        self.num_heads = num_heads
        self.topk = topk
        self.tree_size = size
        self.latency: LatencyModel | BatchLatency | None = latency
        self._batch_latency = BatchLatency.from_model(latency) if latency is not None else None
        self._active: list[bool] | None = None  # rows still decoding this step (`plan_step`)
        self._backoff: dict[int, list[int]] = {}  # batch size -> [plain steps left, next back-off]
        self.temperature = config.resolved_tree_temperature
        self.score = config.resolved_score
        # Path-conditional (hydra) heads: the tree is chosen depth by depth through `draft.expand`; their
        # path probabilities are used as they are (the per-(head, rank) acceptance table models marginals).
        self.conditional = bool(conditional)
        if self.conditional and (config.score not in (None, "prob") or config.calibration is not None):
            raise DynTreeError("path-conditional (hydra) heads score nodes by path probability: calibrated scores "
                               "(rank, binned, a calibration table) model Medusa heads only")
        if self.conditional:  # a node never gets more children than the budget can hold
            self.topk = max(1, min(topk, size - 1))
        # Hydra heads' conditional probabilities are tempered like Medusa marginals, with their own measured
        # default (T=1.5 replayed best on MT-Bench, against 1 and 2: docs/dynamic-trees.md).
        self.conditional_temperature = float(config.tree_temperature or CONDITIONAL_TREE_TEMPERATURE)
        self.learn = config.resolved_learn and not self.conditional
        self.stats = _acceptance_table(config.calibration, num_heads, topk)
        lookup = config.resolved_lookup
        self.lookup = LookupBranch(lookup, config.lookup_ngram, config.lookup_merge) if lookup else None
        self.uses_context = self.lookup is not None
        if recycle is not None:  # the keyword overrides the config's (experiments, replay)
            config = config.replace(recycle=recycle)
            self.config = config
        self.recycle = config.resolved_recycle
        # Recycling reads each sequence's own text (its successor pairs), like the lookup branch.
        self.successors = ContextTables(recycle_k) if self.recycle else None
        self.uses_context = self.uses_context or self.successors is not None
        self._chains: list[list[int]] = []  # per row: the lookup chain's node indices in the latest tree
        self._last = None  # the latest proposal and its node lists, for `observe`
        size_label = f"auto{size}" if latency is not None else f"n{size}"
        self.name = f"dynamic:{size_label}:k{topk}" + ("" if self.score == "prob" else f":{self.score}") + (
            f":lookup{lookup}" if lookup else "") + (f":recycle{self.recycle}" if self.recycle else "") + (
            ":hydra" if self.conditional else "")

    @property
    def max_nodes(self) -> int:
        return self.tree_size

    def prepare(self, batch_size: int) -> None:
        """Measure (or read from the cache) this batch size's latency now, not inside a run's first step."""
        if self._batch_latency is not None:
            self._batch_latency.model(batch_size)

    def plan_step(self, active: torch.Tensor) -> bool:
        """Remember the rows still decoding (finished rows get no nodes); False while backing off to plain
        decoding because trees were expected to be slower than it at this batch size."""
        self._active = [bool(a) for a in active.tolist()]
        state = self._backoff.get(len(self._active))
        if state is not None and state[0] > 0:
            state[0] -= 1
            return False
        return True

    def propose(self, root: torch.Tensor, head_ids: torch.Tensor | None, head_probs: torch.Tensor | None,
                context: list[list[int]] | None = None, draft=None) -> Proposal:
        if self.conditional:
            if draft is None:
                raise DynTreeError("a tree over path-conditional heads needs their draft (`heads.PathDraft`)")
            return self._propose_conditional(root, draft, context)
        depth = min(self.num_heads, head_ids.shape[1])
        ids = head_ids[:, :depth, : self.topk]
        probs = marginals(head_probs[:, :depth, : self.topk], self.temperature, self.config.renormalize)
        factors = self.stats.factors(probs, self.score)
        chosen, chosen_scores = select_nodes(factors, self.tree_size)
        if self.recycle or (self.lookup is not None and context is not None):
            return self._propose_with_lookup(root, ids, probs, chosen, chosen_scores, context)
        counts = self._counts_for(chosen_scores)
        chosen = [nodes[:k] for nodes, k in zip(chosen, counts)]  # selection order: every prefix is a tree
        chosen_scores = [row[:k] for row, k in zip(chosen_scores, counts)]
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
        width = 1 + max(counts, default=0)
        flat_t = torch.tensor([f + [0] * (width - 1 - len(f)) for f in flat], dtype=torch.long, device=device)
        parents_t = torch.tensor(pad_parents(parents, width), dtype=torch.long, device=device)
        tokens = torch.cat([root[:, None], torch.gather(ids.reshape(batch, -1), 1, flat_t)], dim=1)
        tokens = torch.where(parents_t < 0, root[:, None], tokens)  # padding nodes repeat the root
        buffers = buffers_from_parents(parents_t, depth)
        proposal = Proposal(tokens=tokens, buffers=buffers,
                            scores=torch.tensor(_pad(scores, width, 0.0), dtype=torch.float64),
                            ranks=torch.tensor(_pad(ranks, width, -1), dtype=torch.long, device=device),
                            node_probs=torch.tensor(_pad(node_probs, width, 0.0), dtype=torch.float64)
                            if node_probs else None)
        # What `observe` needs, kept as Python lists (no tensor work per node later).
        self._chains = []
        self._last = (proposal, parents, ranks, node_probs) if self.learn else None
        return proposal

    def _counts_for(self, score_rows: list[list[float]]) -> list[int]:
        """Nodes per row this step (root excluded): the configured size, or with a latency model the batch's
        allocation with the most expected tokens per second (`allocate_nodes`)."""
        active, self._active = self._active, None  # set by `plan_step` for this step only
        if self._batch_latency is None:
            return [min(len(row), self.tree_size - 1) for row in score_rows]
        batch = len(score_rows)
        active = active if active is not None and len(active) == batch else [True] * batch
        latency = self._batch_latency
        allocation = allocate_nodes(score_rows, active, lambda n: latency.cost(batch, n), self.tree_size)
        plain = latency.plain_cost(batch)
        if plain is not None:
            state = self._backoff.setdefault(batch, [0, 0])
            if allocation.rate < sum(active) / plain:  # plain decoding is expected to be faster
                state[1] = min(max(2 * state[1], 4), 64)
                state[0] = state[1]
            else:
                state[1] = 0
        return allocation.counts

    def _propose_conditional(self, root: torch.Tensor, draft, context) -> Proposal:
        """Depth by depth over path-conditional heads (`trees.conditional.select_by_depth`), then the same
        merge with the lookup chain and recycled paths as the Medusa trees."""
        budget = self.tree_size - 1
        temperature, renormalize = self.conditional_temperature, self.config.renormalize

        def expand(requests):
            """The children's conditional probabilities, renormalised over the top-k and tempered as the
            Medusa marginals are (`trees.selection.marginals`)."""
            out = []
            for children in draft.expand(requests):
                probs = [max(p, 1e-30) ** (1.0 / temperature) for _, p in children]
                total = sum(probs) if renormalize else 1.0
                out.append([(t, min(p / total, 1.0)) for (t, _), p in zip(children, probs)])
            return out

        chosen = select_by_depth(expand, root.shape[0], budget, self.num_heads)
        rows = []
        for row, row_choice in enumerate(chosen):
            meta = {}
            for path, score in row_choice:
                rank, prob = draft.rank_of(row, path)
                meta[path] = (score, rank, prob)
            rows.append(([path for path, _ in row_choice], meta))
        return self._merged_proposal(root, rows, context, self.num_heads)

    def _propose_with_lookup(self, root, ids, probs, chosen, chosen_scores, context) -> Proposal:
        """The tree from the heads' best nodes and each sequence's lookup chain."""
        id_rows, prob_rows = ids.tolist(), probs.tolist()
        rows = [_head_paths(nodes, node_scores, id_rows[row], prob_rows[row])
                for row, (nodes, node_scores) in enumerate(zip(chosen, chosen_scores))]
        return self._merged_proposal(root, rows, context, ids.shape[1])

    def _merged_proposal(self, root, rows, context, head_depth: int) -> Proposal:
        """The tree of each row's head paths (selection order, with their meta) merged with its lookup chain
        and recycled paths inside the node budget.

        With a latency model the size is chosen on the merged order (chain first), whose prefixes are trees,
        so a step with a trusted chain can afford more nodes than the heads alone would justify.
        """
        if self.lookup is not None and context is not None:
            chains = [self.lookup.chain(ctx) for ctx in context]
        else:
            chains = [[] for _ in rows]
        roots = root.tolist()
        budget = self.tree_size - 1
        merged = []
        for row, (paths, meta) in enumerate(rows):
            # Recycled paths (only where no lookup chain was found: measured better than always) go before
            # the heads' paths; score 0 puts them last with lookup_merge "score".
            if self.successors is not None and not chains[row] and context is not None:
                recycled = self.successors.table(row, context[row]).tree(roots[row], min(self.recycle, budget))
                for path in recycled:
                    meta.setdefault(path, (0.0, -1, 0.0))
                paths = recycled + paths  # duplicates are merged below
            if self.lookup is not None:
                merged.append((self.lookup.merge_into(paths, meta, chains[row], budget), meta))
            else:
                merged.append((merge_chain(paths, [], budget), meta))
        counts = self._counts_for([[meta[p][0] for p in paths] for paths, meta in merged])
        merged = [(paths[:k], meta) for (paths, meta), k in zip(merged, counts)]
        parents, tokens, scores, ranks, node_probs = [], [], [], [], []
        self._chains = []
        for row, (paths, meta) in enumerate(merged):
            row_parents, row_tokens, row_scores, row_ranks, row_probs, chain_nodes = \
                _tree_from_paths(paths, meta, chains[row])
            tokens.append([int(root[row])] + row_tokens)
            parents.append(row_parents)
            scores.append(row_scores)
            ranks.append(row_ranks)
            node_probs.append(row_probs)
            self._chains.append(chain_nodes)
        device = root.device
        max_depth = max([head_depth] + [len(p) for paths, _ in merged for p in paths])
        width = max(len(row) for row in parents)
        tokens = [row + [row[0]] * (width - len(row)) for row in tokens]  # padding nodes repeat the root
        buffers = buffers_from_parents(torch.tensor(pad_parents(parents, width), dtype=torch.long, device=device),
                                       max_depth)
        proposal = Proposal(tokens=torch.tensor(tokens, dtype=torch.long, device=device), buffers=buffers,
                            scores=torch.tensor(_pad(scores, width, 0.0), dtype=torch.float64),
                            ranks=torch.tensor(_pad(ranks, width, -1), dtype=torch.long, device=device),
                            node_probs=torch.tensor(_pad(node_probs, width, 0.0), dtype=torch.float64))
        self._last = (proposal, parents, ranks, node_probs)
        return proposal

    def lookup_rates(self) -> list[float]:
        """The lookup branch's measured per-depth acceptance (empty without lookup)."""
        return self.lookup.rates() if self.lookup is not None else []

    def observe(self, proposal, verification, active: torch.Tensor | None = None) -> None:
        """Feed one step's verification back into the acceptance table (when learning), into the lookup
        branch's per-depth counts (when lookup is on)."""
        last = self._last
        if last is None or last[0] is not proposal:
            return
        _, parents, ranks, node_probs = last
        active_rows = None if active is None else active.tolist()
        for b, nodes in enumerate(verification.accepted_nodes):
            if active_rows is not None and not active_rows[b]:
                continue
            accepted = set(nodes.tolist())
            if self._chains and self.lookup is not None:
                self.lookup.record(self._chains[b], parents[b], accepted)
            if self.learn:
                self.stats.record_tree(parents[b], ranks[b], node_probs[b], accepted)




def _pad(rows: list[list], width: int, fill) -> list[list]:
    """Per-node lists padded to the step's width (the padding nodes' values: never read for a decision)."""
    return [list(row) + [fill] * (width - len(row)) for row in rows]


def _acceptance_table(calibration, num_heads: int, topk: int) -> AcceptanceStats:
    """The acceptance table to start from: a file, a table (resized to these heads), or an empty one."""
    if isinstance(calibration, (str, os.PathLike)):
        calibration = AcceptanceStats.load(calibration)
    if calibration is None:
        return AcceptanceStats(num_heads, topk)
    if (calibration.num_heads, calibration.topk) != (num_heads, topk):
        return calibration.resized(num_heads, topk)
    return calibration


def _head_paths(nodes: list[Node], node_scores: list[float], ids: list[list[int]], probs: list[list[float]]):
    """One row's head nodes (selection order) as token paths, plus per path (score, rank, head probability)."""
    paths, meta = [], {}
    for (parent, d, r), score in zip(nodes, node_scores):
        path = (paths[parent - 1] if parent > 0 else ()) + (ids[d - 1][r],)
        paths.append(path)
        meta[path] = (score, r, probs[d - 1][r])
    return paths, meta


def _tree_from_paths(paths: list[tuple[int, ...]], meta: dict, chain: list[int]):
    """Parents, node tokens (root excluded), scores, ranks, head probabilities and the chain's node indices
    of the tree holding `paths`. Breadth-first; siblings most likely first, because verification projects the
    first-child chain in one call and other nodes one by one."""
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
