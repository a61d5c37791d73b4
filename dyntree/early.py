"""Early pruning inside the tree pass (ProPD): layers [0, l) on every node, an early head, layers [l, L) on the
survivors only, verification on the survivors.

The early head is the logit lens: the backbone's own final norm and lm_head applied to the residual stream
after layer l (normed, as the final layer's state is before lm_head: without the norm the scale of the
residual stream, which grows with depth, would decide the ranking). It needs no training: it is what the
model itself would say if it stopped at layer l. A trained adapter for that layer (`training.early_head`,
saved beside the heads and read by `load_early_head`) may go before the norm. With heads that project onto a
vocabulary subset (the bundled heads: 4096 of 49152 tokens, `vocab_subset` in their heads.json) the lens
ranks over that subset too, a twelfth of lm_head's cost; a child's own token is always scored, in the subset
or not. A subset can only rank a child higher than the whole vocabulary would (`trees.pruning.within_topk`),
so it prunes less, never more.

Losslessness does not depend on the head: a pruned node just cannot be accepted, and verification reads the
full model's logits at the survivors. The survivors' cache slots are their original ones; a dropped node is
never an ancestor of a survivor, so the tree mask already hides its slot, and the survivors-only mask of the
later layers does not list it at all. Their hidden states are bit-identical to those of the unpruned pass on
this project's kernels (row-count independent; tests/test_early_prune.py checks it).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .errors import DynTreeError
from .kernels import Dense
from .model import Transformer, attention_mask
from .proposers import Proposal
from .trees.pruning import (ancestor_closed, equal_counts, pruned_children_hit, subset_buffers, survivor_index,
                            topk_floor)
from .verify import Verification, verify_greedy

EARLY_HEAD_CONFIG = "early_head.json"
EARLY_HEAD_WEIGHTS = "early_head.safetensors"
EARLY_HEAD_FORMAT = "dyntree-early-head"


class LensHead:
    """The early head: final norm + lm_head (or its rows for `vocab_ids`) on the layer-l residual stream."""

    def __init__(self, backbone: Transformer, vocab_ids: torch.Tensor | None = None,
                 adapter: tuple[torch.Tensor, torch.Tensor] | None = None):
        """`adapter`: a trained block's (weight `[H, H]`, bias `[H]`) applied as `x + SiLU(W x + b)` before the
        norm (`training.early_head`); None: the plain lens."""
        self.backbone = backbone
        self.weight = backbone.lm_head.weight
        self.adapter = None if adapter is None else Dense(*(t.to(device=backbone.device, dtype=backbone.dtype)
                                                             for t in adapter))
        self.kind = "lens" if adapter is None else "trained"
        if vocab_ids is None:
            self.dense, self.position = backbone.lm_head, None
        else:
            vocab_ids = vocab_ids.to(device=backbone.device, dtype=torch.long)
            self.dense = Dense(self.weight[vocab_ids])
            self.position = torch.full((backbone.config.vocab_size,), -1, dtype=torch.long, device=backbone.device)
            self.position[vocab_ids] = torch.arange(vocab_ids.numel(), device=backbone.device)

    @property
    def vocab(self) -> int:
        return self.dense.out_features

    def children_ok(self, hidden: torch.Tensor, proposal: Proposal, k: int) -> torch.Tensor:
        """`[B, n]` True where a node's token is within its parent's early top-k (the root: True). Only nodes
        that have children are projected."""
        parents, tokens = proposal.buffers.parents, proposal.tokens
        batch, n = parents.shape
        device = parents.device
        is_parent = torch.zeros(batch, n + 1, dtype=torch.bool, device=device)
        is_parent.scatter_(1, parents + 1, True)  # the root's -1 lands in column 0, dropped below
        b_idx, p_idx = is_parent[:, 1:].nonzero(as_tuple=True)
        ok = torch.ones(batch, n, dtype=torch.bool, device=device)
        if b_idx.numel() == 0:
            return ok
        states = hidden[b_idx, p_idx]
        if self.adapter is not None:
            states = states + torch.nn.functional.silu(self.adapter(states))
        normed = self.backbone.final_norm(states)  # [m, H]
        row_logits = self.dense(normed).float()  # [m, S]
        floor = topk_floor(row_logits, k)
        row_of = torch.zeros(batch, n, dtype=torch.long, device=device)
        row_of[b_idx, p_idx] = torch.arange(b_idx.numel(), device=device)
        cb, ci = (parents >= 0).nonzero(as_tuple=True)
        rows = row_of[cb, parents[cb, ci]]
        child_tokens = tokens[cb, ci]
        if self.position is None:
            child_logits = row_logits[rows, child_tokens]
        else:  # scored from the subset's own product where the token is in it, else by one dot product
            own = self.position[child_tokens]
            direct = (normed[rows].float() * self.weight[child_tokens].float()).sum(-1)
            child_logits = torch.where(own >= 0, row_logits[rows, own.clamp(min=0)], direct)
        ok[cb, ci] = child_logits >= floor[rows]
        return ok


@dataclass
class PruneStats:
    """Per-run totals of early pruning (summable across runs: the bench adds them up per method)."""

    layer: int
    k: int
    vocab: int
    head: str = "lens"  # the early head: "lens" (final norm + lm_head) or "trained" (an adapter before them)
    passes: int = 0
    nodes: int = 0  # tree nodes proposed, active rows
    pruned: int = 0  # of those, not run through layers [l, L)
    pruned_per_pass: list[int] = field(default_factory=list)
    misses: int = 0  # (pass, sequence) pairs whose accepted path stopped where a pruned child held the next token
    overhead_seconds: float = 0.0  # early head + pruning decision + re-indexing
    late_seconds: float = 0.0  # layers [l, L) on the survivors
    measured_passes: int = 0  # measure mode: passes that also ran (and greedy-verified) the unpruned tree
    full_late_seconds: float = 0.0  # measure mode: layers [l, L) on every node
    lost_tokens: int = 0  # measure mode, greedy: accepted tokens the unpruned tree had and the pruned one lost
    lost_counted: int = 0  # (pass, sequence) pairs `lost_tokens` covers

    def add_pass(self, pass_: "PrunedPass", rows: list[int]) -> None:
        """Count one pruned pass over `rows` (those of its rows that decode): nodes, nodes pruned, time."""
        dropped = sum(pass_.dropped[b] for b in rows)
        self.passes += 1
        self.nodes += pass_.keep.shape[1] * len(rows)
        self.pruned += dropped
        self.pruned_per_pass.append(dropped)
        self.overhead_seconds += pass_.overhead_seconds
        self.late_seconds += pass_.late_seconds
        if pass_.full_late_seconds is not None:
            self.measured_passes += 1
            self.full_late_seconds += pass_.full_late_seconds

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "pruned_per_pass"}
        out["pruned_per_pass"] = list(self.pruned_per_pass)
        out.update(summarize_prune(out))
        return out


def summarize_prune(totals: dict) -> dict:
    """Per-pass figures from `PruneStats` totals (also from several runs' totals added up)."""
    passes = max(totals["passes"], 1)
    measured = totals["measured_passes"]
    saved = None
    if measured:
        saved = 1000 * (totals["full_late_seconds"] - totals["late_seconds"] - totals["overhead_seconds"]) / measured
    return {"pruned_nodes_per_pass": totals["pruned"] / passes,
            "pruned_share": totals["pruned"] / totals["nodes"] if totals["nodes"] else 0.0,
            "miss_share": totals["misses"] / passes,
            "overhead_ms_per_pass": 1000 * totals["overhead_seconds"] / passes,
            "late_layers_ms_per_pass": 1000 * totals["late_seconds"] / passes,
            "saved_ms_per_pass": saved,
            "lost_tokens_per_pass": (totals["lost_tokens"] / totals["lost_counted"]
                                     if totals["lost_counted"] else None)}


@dataclass
class PrunedPass:
    """One tree pass with early pruning."""

    hidden: torch.Tensor  # [B, n', H] the survivors' normed final states
    proposal: Proposal  # the survivors' tree: what verification reads
    keep: torch.Tensor  # [B, n] which original nodes survived
    index: torch.Tensor  # [B, n'] original index of each survivor
    full_hidden: torch.Tensor | None = None  # measure mode: [B, n, H] the unpruned tree's normed final states
    overhead_seconds: float = 0.0  # early head + pruning decision + re-indexing
    late_seconds: float = 0.0  # layers [l, L) on the survivors
    full_late_seconds: float | None = None  # measure mode: layers [l, L) on every node

    @property
    def dropped(self) -> list[int]:
        """Nodes pruned in each row."""
        return (~self.keep).sum(1).tolist()

    def to_original(self, verification: Verification) -> Verification:
        """The verification of the survivors' tree in the original tree's node indices."""
        rows = torch.arange(self.index.shape[0], device=self.index.device)
        return Verification(accepted_nodes=[self.index[b, nodes] for b, nodes in
                                            enumerate(verification.accepted_nodes)],
                            next_tokens=verification.next_tokens,
                            last_nodes=self.index[rows, verification.last_nodes])


class EarlyPruner:
    """Runs a tree pass with early pruning at `layer` with top-`k` (ProPD); `measure` also runs the unpruned
    later layers on every pass (timed, and greedy-verified) to report the time saved and the tokens lost: an
    analysis mode, twice the later layers' work, so its tokens per second mean nothing."""

    def __init__(self, backbone: Transformer, layer: int, k: int, vocab_ids: torch.Tensor | None = None,
                 measure: bool = False, adapter: tuple[torch.Tensor, torch.Tensor] | None = None):
        num_layers = backbone.config.num_layers
        if not 0 < layer < num_layers:
            raise DynTreeError(f"early prune layer must be between 1 and {num_layers - 1} for this model "
                               f"({num_layers} layers), got {layer}")
        self.layer, self.k, self.measure = int(layer), int(k), bool(measure)
        self.head = LensHead(backbone, vocab_ids, adapter)
        self._sync = torch.cuda.synchronize if backbone.device.type == "cuda" else (lambda: None)

    @property
    def label(self) -> str:
        return f"prune{self.layer}:{self.k}"

    def new_stats(self) -> PruneStats:
        return PruneStats(self.layer, self.k, self.head.vocab, self.head.kind)

    def _now(self) -> float:
        self._sync()
        return time.perf_counter()

    def forward(self, backbone: Transformer, proposal: Proposal, cache, stats: PruneStats | None = None,
                active: torch.Tensor | None = None) -> PrunedPass:
        """The pass over `proposal`'s tree written after each sequence's cache (nothing committed)."""
        tokens, buffers = proposal.tokens, proposal.buffers
        batch, n = tokens.shape
        device = tokens.device
        slots = cache.lengths[:, None] + torch.arange(n, device=device)[None, :]
        if int(slots.max()) >= min(cache.max_len, backbone.config.max_position_embeddings):
            raise DynTreeError(f"context limit reached ({cache.max_len} tokens)")
        positions = cache.lengths[:, None] + buffers.depths
        mask = attention_mask(cache.lengths, slots, buffers.tree_mask)
        hidden = backbone.run_layers(backbone.embed(tokens), positions, cache, slots, mask, 0, self.layer)
        start = self._now()
        keep = equal_counts(ancestor_closed(buffers.tree_mask, self.head.children_ok(hidden, proposal, self.k)))
        index = survivor_index(keep)
        pruned = not bool(keep.all())
        full_hidden = None
        if self.measure:  # the unpruned later layers first: the survivors' own pass below writes their cache last
            full_start = self._now()
            full_hidden = backbone.final_norm(backbone.run_layers(hidden, positions, cache, slots, mask, self.layer))
            full_seconds = self._now() - full_start
        if pruned:
            rows = torch.arange(batch, device=device)[:, None]
            sub_buffers = subset_buffers(buffers, index)
            sub_slots = slots.gather(1, index)
            survivors = Proposal(tokens=tokens.gather(1, index), buffers=sub_buffers,
                                 scores=_subset(proposal.scores, index), ranks=_subset(proposal.ranks, index),
                                 node_probs=_subset(proposal.node_probs, index))
            sub_mask = attention_mask(cache.lengths, sub_slots, sub_buffers.tree_mask)
            late_in, late_positions = hidden[rows, index], positions.gather(1, index)
        else:
            survivors, sub_slots, sub_mask, late_in, late_positions = proposal, slots, mask, hidden, positions
        late_start = self._now()
        out = backbone.run_layers(late_in, late_positions, cache, sub_slots, sub_mask, self.layer)
        late_end = self._now()
        pass_ = PrunedPass(backbone.final_norm(out), survivors, keep, index, full_hidden, late_start - start,
                           late_end - late_start, full_seconds if self.measure else None)
        if stats is not None:
            stats.add_pass(pass_, _live_rows(active, batch))
        return pass_

    def account(self, backbone: Transformer, pass_: PrunedPass, original: Proposal, result: Verification,
                active: torch.Tensor, greedy: bool, sinks: Sequence[tuple[PruneStats, list[int]]]) -> None:
        """After verification (`result` in original indices): add the pass to each `(stats, rows)` of `sinks`
        (a run's one total over all its rows, or a request's own figures over its row), counting its decoding
        rows only: nodes, nodes pruned, time, the rows whose accepted path ran into a pruned child (misses) and,
        in measure mode with greedy decoding, the exact tokens lost against the unpruned tree."""
        hits = pruned_children_hit(original.buffers.parents, original.tokens, pass_.keep, result.last_nodes,
                                   result.next_tokens).tolist()
        lost = None
        if pass_.full_hidden is not None and greedy:
            full = verify_greedy(backbone.logits, pass_.full_hidden, original, active)
            lost = [theirs - mine for mine, theirs in zip(result.accepted_len, full.accepted_len)]
        live = active.tolist()
        for stats, rows in sinks:
            rows = [b for b in rows if live[b]]
            stats.add_pass(pass_, rows)
            stats.misses += sum(int(hits[b]) for b in rows)
            if lost is not None:
                stats.lost_tokens += sum(lost[b] for b in rows)
                stats.lost_counted += len(rows)


def _live_rows(active: torch.Tensor | None, batch: int) -> list[int]:
    return list(range(batch)) if active is None else [b for b, a in enumerate(active.tolist()) if a]


def _subset(values: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    return None if values is None else values.gather(1, index.to(values.device))


def build_pruner(early_prune: tuple[int, int] | None, backbone: Transformer, heads=None,
                 measure: bool = False, early_head: tuple | None = None) -> EarlyPruner | None:
    """The pruner a `TreeConfig.early_prune` asks for on this backbone (None: off). It ranks over the heads'
    vocabulary subset when they have one, through `early_head` (layer, weight, bias; `training.early_head`)
    when one was trained for this layer, else the plain lens. The layer is checked against the model here."""
    if early_prune is None:
        return None
    layer, k = early_prune
    vocab_ids = getattr(heads, "vocab_ids", None) if heads is not None else None
    adapter = early_head[1:] if early_head is not None and early_head[0] == layer else None
    return EarlyPruner(backbone, layer, k, vocab_ids, measure, adapter)


def load_early_head(directory, backbone_config) -> tuple[int, torch.Tensor, torch.Tensor] | None:
    """(layer, weight, bias) of the early head saved in `directory` (`training.early_head` trains it), or None
    when there is none."""
    path = Path(directory)
    if not (path / EARLY_HEAD_CONFIG).is_file():
        return None
    from safetensors.torch import load_file

    try:
        meta = json.loads((path / EARLY_HEAD_CONFIG).read_text())
        tensors = load_file(str(path / EARLY_HEAD_WEIGHTS))
    except Exception as exc:  # noqa: BLE001 - a damaged file is one line, not a traceback
        raise DynTreeError(f"corrupt early head in {path}: {exc}".splitlines()[0]) from exc
    if meta.get("format") != EARLY_HEAD_FORMAT or meta.get("hidden_size") != backbone_config.hidden_size:
        raise DynTreeError(f"the early head in {path} does not fit this model")
    return int(meta["layer"]), tensors["weight"], tensors["bias"]
