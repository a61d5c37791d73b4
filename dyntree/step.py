"""One decoding step over a set of rows: propose -> tree forward (early-pruned or not) -> verify -> commit.

The library's loop (`decoding.DecodeRun`: `DynTree.generate`/`stream` and the bench) and the server's
continuous batching (`engine.BatchEngine`) both decode through `DecodeStep`, so a feature of the step (a tree
policy, early pruning, a sampling rule) exists once and the bench times what the server runs. What differs
between them stays with the caller: which rows decode, when a sequence stops, where its tokens go.

Bookkeeping, for a row whose cache holds L committed tokens and whose next token (the root) is already chosen:
the tree (root + candidates) is written at slots L..L+n-1 with positions L + depth; the accepted path's keys and
values are moved to L..L+a-1; its a-1 candidate tokens plus the backbone's token after them are the row's new
tokens, and that last token is its next root.

Rows may hold trees of different policies (one `propose` call per group of rows sharing a proposer): the trees
are padded to one node count with nodes whose parent is -1, which see only committed tokens and themselves and
are never accepted. The kernels give every row the same bits whatever the other rows hold (`kernels.py`), so a
greedy row decodes the same tokens alone or in any batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .early import EarlyPruner, PruneStats
from .heads import MedusaHeads
from .model import Transformer
from .proposers import Proposal, Proposer, RootOnlyProposer, propose_step
from .sampling import Sampler
from .trees import buffers_from_parents
from .verify import verify_rows


# -- the stages, also used alone by measurements that replay a step (eval.kl, benchmarks) ----------------------
def prefill(backbone: Transformer, cache, prompts: list[list[int]]) -> torch.Tensor:
    """Run the prompts (`[B]` lists, right-padded) into an empty cache; the last prompt token's normed hidden
    state of each sequence `[B, H]`."""
    return last_states(prefill_states(backbone, cache, prompts), prompts)


def prefill_states(backbone: Transformer, cache, prompts: list[list[int]]) -> torch.Tensor:
    """`prefill`, keeping every prompt token's normed hidden state `[B, L, H]` (right-padded): heads that read
    the context (`heads.start`) need them all."""
    device = backbone.device
    lengths = [len(p) for p in prompts]
    ids = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p)
    hidden = backbone.forward(ids.to(device), cache)
    cache.lengths.copy_(torch.tensor(lengths, device=device))
    return hidden


def last_states(hidden: torch.Tensor, prompts: list[list[int]]) -> torch.Tensor:
    """Each prompt's last token's state `[B, H]` out of `prefill_states`' `[B, L, H]`."""
    device = hidden.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    return hidden[torch.arange(len(prompts), device=device), lengths - 1]


def propose(heads: MedusaHeads | None, proposer: Proposer, backbone: Transformer, last_hidden: torch.Tensor,
            root: torch.Tensor, context: Callable[[], list[list[int]]],
            active: torch.Tensor | None = None, plain: Proposer | None = None, state=None) -> Proposal:
    """The step's tree over `root` `[B]`: the heads' draft from `last_hidden` `[B, H]` (when the proposer
    reads heads) turned into a proposal; `context()` gives each sequence's tokens so far, root last. With
    `active` (the rows still decoding) the proposer may choose a plain step first (`Proposer.plan_step`), whose
    root-only tree comes from `plain` (a `RootOnlyProposer`, which keeps its buffers). `state`: the heads'
    per-sequence state of these rows (`heads.new_state`; None for heads that keep none)."""
    if active is not None and not proposer.plan_step(active):
        return (plain or RootOnlyProposer()).propose(root)
    draft = heads.draft(backbone, last_hidden, root, proposer.topk, state) if proposer.uses_heads else None
    return propose_step(proposer, root, draft, context)


def forward_tree(backbone: Transformer, proposal: Proposal, cache) -> torch.Tensor:
    """One forward pass over the proposal's tree (nothing committed): normed hidden states `[B, n, H]`."""
    return backbone.forward(proposal.tokens, cache, block_mask=proposal.buffers.tree_mask,
                            depths=proposal.buffers.depths)


# -- the step ---------------------------------------------------------------------------------------------
@dataclass
class StepRows:
    """The rows a step decodes, in the order of their cache rows."""

    hidden: torch.Tensor  # [B, H] the normed state that chose each row's root
    roots: torch.Tensor  # [B] each row's next token, already chosen
    context: Callable[[list[int]], list[list[int]]]  # rows -> their tokens so far, root last
    samplers: list[Sampler]  # per row; rows sharing one are verified together
    active: torch.Tensor  # [B] bool: rows still decoding (the others get no tokens and commit nothing)
    drafter: object | None = None  # the heads' per-sequence state of these rows (`heads.new_state`), if any


@dataclass
class StepResult:
    """What a step gave each row."""

    tokens: list[list[int]]  # its accepted candidates, then the backbone's next token (empty: inactive row)
    roots: torch.Tensor  # [B] the next step's roots (each row's last new token)
    hidden: torch.Tensor  # [B, H] the state that chose each new root
    sizes: list[int]  # nodes of each row's own tree
    width: int  # nodes per row of the pass (the widest tree)
    seconds: float = 0.0  # wall time of the step, proposal to commit (what tree sizing learns from)

    def tokens_per_row(self, active: torch.Tensor) -> float:
        """Mean tokens the step gave a decoding row (accepted candidates + the backbone's next token)."""
        live = [len(t) for t, a in zip(self.tokens, active.tolist()) if a]
        return sum(live) / len(live) if live else 0.0


def _no_lap(phase: str | None) -> None:
    pass


class DecodeStep:
    """Decodes one step of a batch of rows sharing a cache: the one implementation of a decoding step.

    `plain` is the root-only proposer of plain steps (a proposer's `plan_step`, no room for a tree), shared so
    that its buffers are built once per batch size."""

    def __init__(self, backbone: Transformer, heads: MedusaHeads | None = None):
        self.backbone = backbone
        self.heads = heads
        self.plain = RootOnlyProposer()

    @torch.inference_mode()
    def run(self, cache, rows: StepRows, groups: list[tuple[Proposer, list[int]]],
            pruner: EarlyPruner | None = None, prune_stats: Sequence[tuple[PruneStats, list[int]]] = (),
            plain_when_full: bool = False, lap: Callable[[str | None], None] = _no_lap) -> StepResult | None:
        """Propose each group's trees (`groups`: a proposer and its rows, in row order, covering every row),
        run them in one forward pass (with `pruner`: ProPD early pruning, its figures added to `prune_stats`,
        `(stats, rows)` pairs), verify each row, commit the accepted paths to `cache` (a cache of exactly these
        rows). Returns None when the trees do not fit in the cache (with `plain_when_full`: only when not even
        a root-only step fits; a tree that does not fit falls back to one). `lap(phase)` is called as each of
        "proposal", "forward", "verification" and "proposal" (learning from the outcome) ends."""
        backbone = self.backbone
        started = time.perf_counter()
        batch = rows.roots.shape[0]
        proposals = [self._propose(proposer, index, rows) for proposer, index in groups]
        tree, sizes = _combine(groups, proposals, batch, rows.roots.device)
        lap("proposal")
        room = min(cache.max_len, backbone.config.max_position_embeddings) - int(cache.lengths.max())
        if tree.tokens.shape[1] > room:
            if not plain_when_full or room < 1:
                return None
            # Near the end of the context: plain decoding for this step (greedy rows get the same tokens).
            groups = [(self.plain, list(range(batch)))]
            proposals = [self._propose(self.plain, groups[0][1], rows)]
            (tree, sizes), pruner = _combine(groups, proposals, batch, rows.roots.device), None
        if pruner is not None:  # ProPD: later layers and verification on the survivors only
            pruned = pruner.forward(backbone, tree, cache)
            hidden, verified = pruned.hidden, pruned.proposal
            verified_sizes = [verified.tokens.shape[1]] * batch
        else:
            hidden, verified, verified_sizes = forward_tree(backbone, tree, cache), tree, sizes
        lap("forward")
        result = verify_rows(backbone.logits, hidden, verified, verified_sizes, rows.samplers, rows.active)
        next_hidden = hidden[torch.arange(batch, device=hidden.device), result.last_nodes]
        accepted_states = None
        if rows.drafter is not None:  # the accepted nodes' states, for the heads' own state (`heads.advance`)
            accepted_states = [hidden[b, result.accepted_nodes[b]] if live else None
                               for b, live in enumerate(rows.active.tolist())]
        if pruner is not None:  # back to the tree's own node indices (slots, proposer feedback)
            result = pruned.to_original(result)
            pruner.account(backbone, pruned, tree, result, rows.active, all(s.greedy for s in rows.samplers),
                           prune_stats)
        lap("verification")
        for (proposer, index), proposal in zip(groups, proposals):
            if len(index) == batch:
                proposer.observe(proposal, result, rows.active)
            else:
                proposer.observe(proposal, result.rows(index), rows.active[index])
        lap("proposal")  # learning from the outcome is part of building trees
        node_tokens, next_tokens = tree.tokens.tolist(), result.next_tokens.tolist()
        new_tokens: list[list[int]] = [[] for _ in range(batch)]
        for b, live in enumerate(rows.active.tolist()):
            if live:
                nodes = result.accepted_nodes[b]
                cache.commit(b, cache.lengths[b] + nodes)
                new_tokens[b] = [node_tokens[b][i] for i in nodes.tolist()[1:]] + [next_tokens[b]]
        if accepted_states is not None:
            self.heads.advance(rows.drafter, backbone, accepted_states, new_tokens)
        return StepResult(new_tokens, result.next_tokens, next_hidden, sizes, tree.tokens.shape[1],
                          time.perf_counter() - started)

    def _propose(self, proposer: Proposer, index: list[int], rows: StepRows) -> Proposal:
        """The tree of rows `index` (every row, or a group of them) by `proposer`."""
        if len(index) == rows.roots.shape[0]:
            hidden, roots, active, state = rows.hidden, rows.roots, rows.active, rows.drafter
        else:
            hidden, roots, active = rows.hidden[index], rows.roots[index], rows.active[index]
            state = None if rows.drafter is None else rows.drafter.select(index)
        return propose(self.heads, proposer, self.backbone, hidden, roots, lambda: rows.context(index), active,
                       self.plain, state)


def _combine(groups: list[tuple[Proposer, list[int]]], proposals: list[Proposal], batch: int,
             device) -> tuple[Proposal, list[int]]:
    """One `[batch, n]` proposal from the groups' trees, each padded to the largest with nodes whose parent is
    -1: they attend to committed tokens and themselves only, and no verification walks to them. Also each
    row's own node count."""
    if len(proposals) == 1:  # one tree policy for every row (the usual case): rows 0..batch-1 in order
        return proposals[0], [proposals[0].tokens.shape[1]] * batch
    n = max(p.tokens.shape[1] for p in proposals)
    depth = max(int(p.buffers.depths.max()) for p in proposals)
    tokens = torch.zeros(batch, n, dtype=torch.long, device=device)
    parents = torch.full((batch, n), -1, dtype=torch.long, device=device)
    sizes = [0] * batch
    for (_, index), proposal in zip(groups, proposals):
        width = proposal.tokens.shape[1]
        rows = torch.tensor(index, dtype=torch.long, device=device)
        tokens[rows, :width] = proposal.tokens
        parents[rows, :width] = proposal.buffers.parents
        for b in index:
            sizes[b] = width
    return Proposal(tokens=tokens, buffers=buffers_from_parents(parents, depth)), sizes


def take_tokens(have: int, candidates: list[int], limit: int, eos) -> tuple[list[int], str]:
    """The candidates a sequence holding `have` new tokens takes: up to `limit` new tokens in all, through the
    first end-of-sequence token (`eos`: a set; empty to decode past it). Also why it stops: "eos", "length"
    or "" (it goes on)."""
    taken = []
    for token in candidates:
        if have + len(taken) >= limit:
            break
        taken.append(token)
        if token in eos:
            return taken, "eos"
    return taken, "length" if have + len(taken) >= limit else ""
