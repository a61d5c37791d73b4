"""The decoding loop: prefill, then propose -> tree forward -> verify -> commit, until done.

One loop serves every method. Without heads the proposer returns the root alone and the loop is plain
greedy autoregressive decoding on the same kernels: the honest baseline for every speedup we report.

Bookkeeping per step, for a sequence whose cache holds L committed tokens and whose next token (the root)
is already chosen: the tree (root + candidates) is written at slots L..L+n-1 with positions L + depth; the
accepted path's keys/values are moved to L..L+a-1; its a-1 candidate tokens plus the backbone's bonus
token after them are emitted (a tokens per forward pass), and the bonus token is the next root.

Sampling (`SamplingConfig` with temperature > 0) changes only how tokens are chosen: the root after the
prefill is sampled, and verification is lossless tree speculative sampling or typical acceptance. The run's
own seeded generator supplies all randomness.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .early import EarlyPruner, PruneStats
from .errors import DynTreeError
from .heads import MedusaHeads
from .model import Transformer
from .proposers import Proposal, Proposer, RootOnlyProposer, propose_step
from .sampling import SamplingConfig, choose_tokens
from .verify import verify_tree

PHASES = ("proposal", "forward", "verification", "cache")


@dataclass
class GenerationStats:
    """Raw counts and timings of one run (all sequences of the batch together)."""

    method: str
    batch_size: int
    prompt_tokens: list[int]
    tree_nodes: int
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=lambda: {p: 0.0 for p in PHASES})
    # One entry per (decode step, active sequence): tokens that pass added to that sequence.
    accepted_lengths: list[int] = field(default_factory=list)
    sequence_accepted: list[list[int]] = field(default_factory=list)  # the same per sequence (batch order)
    decode_passes: int = 0
    tree_sizes: list[int] = field(default_factory=list)  # nodes verified by each pass (varies with auto size)
    stop_reasons: list[str] = field(default_factory=list)
    heads_note: str = ""
    acceptance: str = "greedy"  # SamplingConfig.label: greedy, lossless(T=..), typical(T=..)
    early_prune: PruneStats | None = None  # with early pruning: nodes pruned, time, tokens lost (early.py)

    @property
    def wall_seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def mean_accepted_per_pass(self) -> float:
        return sum(self.accepted_lengths) / len(self.accepted_lengths) if self.accepted_lengths else 0.0

    @property
    def mean_tree_size(self) -> float:
        return sum(self.tree_sizes) / len(self.tree_sizes) if self.tree_sizes else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def phase_ms_per_pass(self) -> dict[str, float]:
        passes = max(self.decode_passes, 1)
        return {p: 1000 * s / passes for p, s in self.phase_seconds.items()}

    def as_dict(self) -> dict:
        return {
            "method": self.method, "batch_size": self.batch_size, "prompt_tokens": self.prompt_tokens,
            "tree_nodes": self.tree_nodes, "new_tokens": self.new_tokens,
            "prefill_seconds": self.prefill_seconds, "decode_seconds": self.decode_seconds,
            "wall_seconds": self.wall_seconds, "tokens_per_second": self.tokens_per_second,
            "decode_passes": self.decode_passes, "mean_accepted_per_pass": self.mean_accepted_per_pass,
            "accepted_lengths": self.accepted_lengths, "mean_tree_size": self.mean_tree_size,
            "phase_seconds": dict(self.phase_seconds),
            "stop_reasons": self.stop_reasons, "heads_note": self.heads_note, "acceptance": self.acceptance,
            "early_prune": self.early_prune.as_dict() if self.early_prune is not None else None,
        }


@dataclass
class StepEvent:
    """What one forward pass added: `new_tokens[b]` for each sequence (empty once it has finished)."""

    step: int
    new_tokens: list[list[int]]
    finished: list[bool]


class _Clock:
    def __init__(self, device: torch.device, stats: GenerationStats):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.stats = stats
        self.last = time.perf_counter()

    def lap(self, phase: str | None) -> None:
        self.sync()
        now = time.perf_counter()
        if phase is not None:
            self.stats.phase_seconds[phase] += now - self.last
        self.last = now


# -- the stages of one step, shared by the loop and by measurements that replay a step (eval.kl) ------------
def prefill(backbone: Transformer, cache, prompts: list[list[int]]) -> torch.Tensor:
    """Run the prompts (`[B]` lists, right-padded) into an empty cache; the last prompt token's normed hidden
    state of each sequence `[B, H]`."""
    device = backbone.device
    lengths = [len(p) for p in prompts]
    ids = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p)
    hidden = backbone.forward(ids.to(device), cache)
    cache.lengths.copy_(torch.tensor(lengths, device=device))
    return hidden[torch.arange(len(prompts), device=device), torch.tensor(lengths, device=device) - 1]


def propose(heads: MedusaHeads | None, proposer: Proposer, backbone: Transformer, last_hidden: torch.Tensor,
            root: torch.Tensor, context: Callable[[], list[list[int]]],
            active: torch.Tensor | None = None, plain: Proposer | None = None) -> Proposal:
    """The step's tree over `root` `[B]`: the heads' draft from `last_hidden` `[B, H]` (when the proposer
    reads heads) turned into a proposal; `context()` gives each sequence's tokens so far, root last. With
    `active` (the rows still decoding) the proposer may choose a plain step first (`Proposer.plan_step`), whose
    root-only tree comes from `plain` (a `RootOnlyProposer`, which keeps its buffers)."""
    if active is not None and not proposer.plan_step(active):
        return (plain or RootOnlyProposer()).propose(root)
    draft = heads.draft(backbone, last_hidden, root, proposer.topk) if proposer.uses_heads else None
    return propose_step(proposer, root, draft, context)


def forward_tree(backbone: Transformer, proposal: Proposal, cache) -> torch.Tensor:
    """One forward pass over the proposal's tree (nothing committed): normed hidden states `[B, n, H]`."""
    return backbone.forward(proposal.tokens, cache, block_mask=proposal.buffers.tree_mask,
                            depths=proposal.buffers.depths)


class DecodeRun:
    """An in-progress generation: iterate it for `StepEvent`s; afterwards read `tokens` and `stats`."""

    def __init__(self, decoder: "Decoder", prompts: list[list[int]], max_new_tokens: int, stop_at_eos: bool,
                 sampling: SamplingConfig | None = None):
        self.decoder = decoder
        self.sampling = sampling
        # One generator per run (None when greedy): a seed reproduces the run; global RNG is never used.
        greedy = sampling is None or sampling.is_greedy
        self.generator = None if greedy else sampling.generator(decoder.backbone.device)
        self.prompts = prompts
        self.max_new_tokens = max_new_tokens
        self.stop_at_eos = stop_at_eos
        self.tokens: list[list[int]] = [[] for _ in prompts]
        proposer, pruner = decoder.proposer, decoder.pruner
        self.stats = GenerationStats(method=proposer.name + (f":{pruner.label}" if pruner else ""),
                                     batch_size=len(prompts), prompt_tokens=[len(p) for p in prompts],
                                     tree_nodes=0, acceptance=sampling.label if sampling is not None else "greedy",
                                     early_prune=pruner.new_stats() if pruner else None)
        self._iter = self._run()

    def __iter__(self) -> Iterator[StepEvent]:
        return self._iter

    def __next__(self) -> StepEvent:
        return next(self._iter)

    def consume(self) -> "DecodeRun":
        for _ in self._iter:
            pass
        return self

    # -- the loop --------------------------------------------------------------------------------------
    def _emit(self, b: int, candidates: list[int], finished: list[bool]) -> list[int]:
        """Append tokens to sequence b, honouring EOS and max_new_tokens; return what was appended."""
        out = []
        eos = self.decoder.eos_token_ids
        for t in candidates:
            if len(self.tokens[b]) >= self.max_new_tokens:
                break
            self.tokens[b].append(t)
            out.append(t)
            if self.stop_at_eos and t in eos:
                finished[b] = True
                self.stats.stop_reasons[b] = "eos"
                break
        if len(self.tokens[b]) >= self.max_new_tokens and not finished[b]:
            finished[b] = True
            self.stats.stop_reasons[b] = "length"
        return out

    @torch.inference_mode()
    def _run(self) -> Iterator[StepEvent]:
        dec = self.decoder
        backbone, heads, proposer = dec.backbone, dec.heads, dec.proposer
        device = backbone.device
        batch = len(self.prompts)
        stats = self.stats
        stats.stop_reasons = ["" for _ in range(batch)]
        stats.sequence_accepted = [[] for _ in range(batch)]
        lengths = [len(p) for p in self.prompts]
        cache = backbone.new_cache(batch, max(lengths) + self.max_new_tokens + proposer.max_nodes + 1)

        start = time.perf_counter()
        last_hidden = prefill(backbone, cache, self.prompts)
        root = choose_tokens(backbone.logits(last_hidden), self.sampling, self.generator)
        finished = [False] * batch
        first = [self._emit(b, [int(root[b])], finished) for b in range(batch)]
        stats.new_tokens += sum(len(t) for t in first)
        if device.type == "cuda":
            torch.cuda.synchronize()
        stats.prefill_seconds = time.perf_counter() - start
        yield StepEvent(0, first, list(finished))

        clock = _Clock(device, stats)
        plain = RootOnlyProposer()  # the tree of steps the proposer makes plain (`Proposer.plan_step`)
        decode_start = time.perf_counter()
        step = 0
        while not all(finished):
            step += 1
            active = torch.tensor([not f for f in finished], device=device)
            clock.lap(None)
            proposal = propose(heads, proposer, backbone, last_hidden, root,
                               lambda: [self.prompts[b] + self.tokens[b] for b in range(batch)], active, plain)
            stats.tree_nodes = max(stats.tree_nodes, proposal.tokens.shape[1])
            stats.tree_sizes.append(proposal.tokens.shape[1])
            clock.lap("proposal")
            if int(cache.lengths.max()) + proposal.tokens.shape[1] > cache.max_len:
                for b in range(batch):
                    if not finished[b]:
                        finished[b] = True
                        stats.stop_reasons[b] = "context"
                break
            pruned = None
            if dec.pruner is not None:  # ProPD: later layers and verification on the survivors only
                pruned = dec.pruner.forward(backbone, proposal, cache, stats.early_prune, active)
                tree_hidden, verified = pruned.hidden, pruned.proposal
            else:
                tree_hidden, verified = forward_tree(backbone, proposal, cache), proposal
            clock.lap("forward")
            result = verify_tree(backbone.logits, tree_hidden, verified, active, self.sampling, self.generator)
            last_hidden = tree_hidden[torch.arange(batch, device=device), result.last_nodes]
            if pruned is not None:  # back to the proposal's own node indices (slots, proposer feedback)
                result = pruned.to_original(result)
                dec.pruner.account(backbone, pruned, proposal, result, active, self.generator is None,
                                   stats.early_prune)
            clock.lap("verification")
            proposer.observe(proposal, result, active)
            clock.lap("proposal")  # learning from the outcome is part of building trees
            new_tokens: list[list[int]] = [[] for _ in range(batch)]
            for b in range(batch):
                if finished[b]:
                    continue
                nodes = result.accepted_nodes[b]
                cache.commit(b, cache.lengths[b] + nodes)
                candidates = proposal.tokens[b, nodes[1:]].tolist() + [int(result.next_tokens[b])]
                new_tokens[b] = self._emit(b, candidates, finished)
                stats.accepted_lengths.append(len(new_tokens[b]))
                stats.sequence_accepted[b].append(len(new_tokens[b]))
            stats.new_tokens += sum(len(t) for t in new_tokens)
            stats.decode_passes += 1
            root = result.next_tokens
            clock.lap("cache")
            yield StepEvent(step, new_tokens, list(finished))
        stats.decode_seconds = time.perf_counter() - decode_start


class Decoder:
    """Binds a backbone, optional heads and a proposer; `run` starts a generation."""

    def __init__(self, backbone: Transformer, heads: MedusaHeads | None = None, proposer: Proposer | None = None,
                 eos_token_ids: tuple[int, ...] | None = None, sampling: SamplingConfig | None = None,
                 pruner: EarlyPruner | None = None):
        """`pruner`: early pruning inside each tree pass (`early.EarlyPruner`); unused by a 1-node tree."""
        self.backbone = backbone
        self.sampling = sampling  # None = greedy; `run` may override it per call
        self.proposer = proposer or RootOnlyProposer()
        if self.proposer.uses_heads and heads is None:
            raise DynTreeError(f"the {self.proposer.name} tree needs heads")
        self.heads = heads
        self.pruner = pruner if self.proposer.max_nodes > 1 else None
        self.eos_token_ids = set(eos_token_ids if eos_token_ids is not None else backbone.config.eos_token_ids)

    def check_prompts(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        limit = self.backbone.config.max_position_embeddings
        if not prompts:
            raise DynTreeError("no prompt given")
        for p in prompts:
            if len(p) == 0:
                raise DynTreeError("empty prompt")
            if len(p) >= limit:
                raise DynTreeError(f"prompt is {len(p)} tokens, the model's context is {limit}")
        if max_new_tokens < 1:
            raise DynTreeError("max_new_tokens must be at least 1")

    def run(self, prompts: list[list[int]], max_new_tokens: int = 128, stop_at_eos: bool = True,
            sampling: SamplingConfig | None = None) -> DecodeRun:
        self.check_prompts(prompts, max_new_tokens)
        return DecodeRun(self, prompts, max_new_tokens, stop_at_eos, sampling or self.sampling)
