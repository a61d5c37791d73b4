"""The decoding loop: prefill, then one decoding step (`step.DecodeStep`) after another, until done.

One loop serves every method. Without heads the proposer returns the root alone and the loop is plain
greedy autoregressive decoding on the same kernels: the honest baseline for every speedup we report. Each step
(propose -> tree forward -> verify -> commit) is the server's too (`engine.BatchEngine`); this loop keeps what
is its own: a fixed batch of prompts, each sequence's stop conditions, the events it yields and the run's stats.

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
from .proposers import Proposer, RootOnlyProposer
from .sampling import Sampler, SamplingConfig
from .step import DecodeStep, StepRows, last_states, prefill_states, take_tokens

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


class DecodeRun:
    """An in-progress generation: iterate it for `StepEvent`s; afterwards read `tokens` and `stats`."""

    def __init__(self, decoder: "Decoder", prompts: list[list[int]], max_new_tokens: int, stop_at_eos: bool,
                 sampling: SamplingConfig | None = None):
        self.decoder = decoder
        self.sampling = sampling
        # One generator per run (None when greedy): a seed reproduces the run; global RNG is never used.
        self.sampler = Sampler(sampling, decoder.backbone.device)
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
        eos = self.decoder.eos_token_ids if self.stop_at_eos else ()
        out, reason = take_tokens(len(self.tokens[b]), candidates, self.max_new_tokens, eos)
        self.tokens[b] += out
        if reason:
            finished[b] = True
            self.stats.stop_reasons[b] = reason
        return out

    @torch.inference_mode()
    def _run(self) -> Iterator[StepEvent]:
        dec = self.decoder
        backbone, proposer = dec.backbone, dec.proposer
        device = backbone.device
        batch = len(self.prompts)
        stats = self.stats
        stats.stop_reasons = ["" for _ in range(batch)]
        stats.sequence_accepted = [[] for _ in range(batch)]
        lengths = [len(p) for p in self.prompts]
        cache = backbone.new_cache(batch, max(lengths) + self.max_new_tokens + proposer.max_nodes + 1)

        start = time.perf_counter()
        prompt_states = prefill_states(backbone, cache, self.prompts)
        last_hidden = last_states(prompt_states, self.prompts)
        root = self.sampler.choose(backbone.logits(last_hidden))
        drafter = None  # the heads' per-sequence state (heads that read the context keep one)
        if dec.heads is not None:
            drafter = dec.heads.new_state(batch, cache.max_len, device)
            dec.heads.start(drafter, backbone, prompt_states, self.prompts, root)
        del prompt_states
        finished = [False] * batch
        first = [self._emit(b, [int(root[b])], finished) for b in range(batch)]
        stats.new_tokens += sum(len(t) for t in first)
        if device.type == "cuda":
            torch.cuda.synchronize()
        stats.prefill_seconds = time.perf_counter() - start
        yield StepEvent(0, first, list(finished))

        clock = _Clock(device, stats)
        everyone = list(range(batch))
        step = DecodeStep(backbone, dec.heads)
        prune_stats = [(stats.early_prune, everyone)] if dec.pruner is not None else []
        samplers = [self.sampler] * batch  # one generator for the run: its rows are verified together

        def context(rows: list[int]) -> list[list[int]]:
            return [self.prompts[b] + self.tokens[b] for b in rows]

        decode_start = time.perf_counter()
        passes = 0
        while not all(finished):
            passes += 1
            active = torch.tensor([not f for f in finished], device=device)
            clock.lap(None)
            # One tree policy for the whole batch: the decoder's, or this step's cut of it.
            chosen = dec.sizing.choose(batch) if dec.sizing is not None else proposer
            pruner = dec.pruner if chosen.max_nodes > 1 else None
            out = step.run(cache, StepRows(last_hidden, root, context, samplers, active, drafter), [(chosen, everyone)],
                           pruner, prune_stats if pruner is not None else (), lap=clock.lap)
            if out is None:  # the tree no longer fits in the context
                for b in range(batch):
                    if not finished[b]:
                        finished[b] = True
                        stats.stop_reasons[b] = "context"
                break
            if dec.sizing is not None:
                dec.sizing.observe(batch, chosen.max_nodes, out.seconds, out.tokens_per_row(active))
            stats.tree_nodes = max(stats.tree_nodes, out.width)
            stats.tree_sizes.append(out.width)
            new_tokens: list[list[int]] = [[] for _ in range(batch)]
            for b in range(batch):
                if finished[b]:
                    continue
                new_tokens[b] = self._emit(b, out.tokens[b], finished)
                stats.accepted_lengths.append(len(new_tokens[b]))
                stats.sequence_accepted[b].append(len(new_tokens[b]))
            stats.new_tokens += sum(len(t) for t in new_tokens)
            stats.decode_passes += 1
            last_hidden, root = out.hidden, out.roots
            clock.lap("cache")
            yield StepEvent(passes, new_tokens, list(finished))
        stats.decode_seconds = time.perf_counter() - decode_start


@dataclass
class StepSizing:
    """Nodes per sequence decided step by step (`DynTree`'s machine sizing): `choose(batch size)` gives the
    step's proposer, a cut of the decoder's own (down to plain decoding), and `observe(batch size, nodes,
    seconds, tokens per row)` reports what the step did, which corrects later choices."""

    choose: Callable[[int], Proposer]
    observe: Callable[[int, int, float, float], None]


class Decoder:
    """Binds a backbone, optional heads and a proposer; `run` starts a generation."""

    def __init__(self, backbone: Transformer, heads: MedusaHeads | None = None, proposer: Proposer | None = None,
                 eos_token_ids: tuple[int, ...] | None = None, sampling: SamplingConfig | None = None,
                 pruner: EarlyPruner | None = None, sizing: "StepSizing | None" = None):
        """`pruner`: early pruning inside each tree pass (`early.EarlyPruner`); unused by a 1-node tree.
        `sizing`: the tree of each step chosen by batch size, within `proposer` (`StepSizing`)."""
        self.sizing = sizing
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
