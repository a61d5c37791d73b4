"""Run every method on every prompt, interleaved, and keep every raw number.

Noise control on a shared machine: a warm-up pass per method first; then, for each prompt, all methods run
back to back in an order rotated from prompt to prompt (round robin), so a slow spell of the machine hits
every method alike instead of whichever happened to run then. Timings are taken here, around each call,
identically for every method, so speedups never depend on how a method times itself.

Batches (`batch_size` B > 1): the prompt turns are decoded B at a time by every method (`run_batch`), first
turns of all prompts first, then second turns; each sequence still gets its own record (tokens checked against
plain decoding's for the same prompt), and is charged the group's wall time in proportion to the tokens it
got, so tokens/s over the records is all sequences' tokens over the time the groups took.
"""

from __future__ import annotations

import os
import platform
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from ..errors import DynTreeError
from ..eval.bench_kl import measure_first_token_kl
from ..precision import cpu_identity
from .methods import BenchContext, BenchMethod
from ..prompts import BenchPrompt, conversation, raw_text

REFERENCE_METHOD = "ar"


# -- memory -------------------------------------------------------------------------------------------------
class MemoryProbe:
    """Peak memory of one run.

    CUDA: `max_memory_allocated` after resetting it. CPU: the process's peak RSS; Linux lets us reset the
    peak (`/proc/self/clear_refs` <- 5) so each run gets its own peak; elsewhere we fall back to
    `ru_maxrss`, which only ever grows (the JSON says which one was used).
    """

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.kind = "cuda_max_allocated"
        elif self._can_reset_rss():
            self.kind = "process_peak_rss"
        else:
            self.kind = "process_peak_rss_since_start"
        self.baseline = 0

    @staticmethod
    def _status_kib(key: str) -> int | None:
        try:
            match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
        except OSError:
            return None
        return int(match.group(1)) if match else None

    @classmethod
    def _can_reset_rss(cls) -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return False
        return cls._status_kib("VmHWM") is not None

    def start(self) -> None:
        if self.kind == "cuda_max_allocated":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
        elif self.kind == "process_peak_rss":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.baseline = (self._status_kib("VmRSS") or 0) * 1024
        else:
            self.baseline = 0

    def stop(self) -> tuple[int, int | None]:
        """(peak bytes, bytes above the level at start) for the run just finished."""
        if self.kind == "cuda_max_allocated":
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.kind == "process_peak_rss":
            peak = (self._status_kib("VmHWM") or 0) * 1024
        else:
            scale = 1 if sys.platform == "darwin" else 1024
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale, None
        return peak, max(peak - self.baseline, 0)


# -- environment ----------------------------------------------------------------------------------------------
def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment(device: torch.device) -> dict:
    """What a reader needs to judge a number: hardware, threads, versions, load on the machine."""
    import transformers

    try:
        from importlib.metadata import version

        dyntree_version = version("dyntree")
    except Exception:  # noqa: BLE001 - not installed: running from a checkout
        dyntree_version = None
    env = {
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_identity()[0],
        "cpu_flags": cpu_identity()[1],  # the ISA features that decide bf16 speed (avx512_bf16, amx_bf16, ...)
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dyntree": dyntree_version,
        "git_commit": _git_commit(),
        "device": str(device),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


# -- the run -------------------------------------------------------------------------------------------------
@dataclass
class BenchSettings:
    max_new_tokens: int = 256
    turns: int = 1
    seed: int = 0
    warmup: int = 1
    repeats: int = 1
    chat: bool = True
    kl_samples: int = 400  # draws per context for the first-token KL of sampling methods (0 = off)
    kl_contexts: int = 4  # fixed contexts for it: the first prompts' first turns
    weights: str = "float32"  # the run's weights (`--weights`, auto resolved); a method's `weights=` may differ
    batch_size: int = 1  # prompt turns decoded together (`--batch-size`)

    def validate(self) -> None:
        """One clear error for a setting a user can get wrong (named as its command-line flag)."""
        checks = ((self.max_new_tokens >= 1, "--max-new-tokens must be at least 1"),
                  (self.turns in (1, 2), "--turns must be 1 or 2"),
                  (self.warmup >= 0, "--warmup must be 0 or more"),
                  (self.repeats >= 1, "--repeats must be at least 1"),
                  (self.kl_samples >= 0, "--kl-samples must be 0 (off) or more"),
                  (self.kl_contexts >= 1, "--kl-contexts must be at least 1"),
                  (self.seed >= 0, "--seed must be 0 or more"),
                  (self.batch_size >= 1, "--batch-size must be at least 1"))
        for ok, message in checks:
            if not ok:
                raise DynTreeError(message)


@dataclass
class RunRecord:
    """One timed generation of one method on one prompt turn."""

    method: str
    prompt_id: str
    category: str | None
    turn: int  # 1-based
    repeat: int
    order: int  # position of this method in the prompt's round
    prompt_tokens: int
    token_ids: list[int]
    new_tokens: int
    wall_seconds: float  # timed by the harness around `run`
    decode_passes: int | None
    accepted_lengths: list[int] | None
    phase_seconds: dict | None
    prefill_seconds: float | None
    tree_nodes: int | None
    stop_reason: str | None
    peak_memory_bytes: int | None
    run_memory_bytes: int | None
    reference_exact: bool = True  # False: other numerics than ar (llama.cpp), so not checked token for token
    group: int | None = None  # batch runs: which group of `batch_size` prompt turns this sequence ran in
    group_wall_seconds: float | None = None  # batch runs: the whole group's time (wall_seconds is this run's share)
    early_prune: dict | None = None  # early pruning's totals for this run (`early.PruneStats`), if it pruned

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class BenchRun:
    methods: list[BenchMethod]
    prompts: list[BenchPrompt]
    settings: BenchSettings
    records: list[RunRecord] = field(default_factory=list)
    inputs: dict = field(default_factory=dict)  # (prompt_id, turn) -> {"token_ids", "text"}
    memory_kind: str = ""
    environment: dict = field(default_factory=dict)
    kl: dict = field(default_factory=dict)  # method name -> its kl* fields (bench/quality.py)


def _stats_record(method: BenchMethod, prompt: BenchPrompt, turn: int, repeat: int, order: int,
                  prompt_ids: list[int], tokens: list[int], stats, seconds: float,
                  memory: tuple[int, int | None]) -> RunRecord:
    has_passes = method.family == "dyntree" or bool(getattr(stats, "accepted_lengths", None))
    phases = getattr(stats, "phase_seconds", None) or None
    return RunRecord(
        method=method.name, prompt_id=prompt.prompt_id, category=prompt.category, turn=turn + 1, repeat=repeat,
        order=order, prompt_tokens=len(prompt_ids), token_ids=list(tokens), new_tokens=len(tokens),
        wall_seconds=seconds, decode_passes=getattr(stats, "decode_passes", None),
        accepted_lengths=list(stats.accepted_lengths) if has_passes else None,
        phase_seconds=dict(phases) if phases else None,
        prefill_seconds=stats.prefill_seconds if method.family == "dyntree" else None,
        tree_nodes=getattr(stats, "tree_nodes", None) or None,
        stop_reason=(getattr(stats, "stop_reasons", None) or [None])[0],
        peak_memory_bytes=memory[0], run_memory_bytes=memory[1],
        reference_exact=getattr(method, "reference_exact", True),
        early_prune=stats.early_prune.as_dict() if getattr(stats, "early_prune", None) is not None else None)


def _encode(context: BenchContext, prompt: BenchPrompt, turn: int, answers: list[str], chat: bool) -> list[int]:
    dt = context.dyntree()
    if chat and getattr(dt.tokenizer, "chat_template", None):
        return dt.encode(conversation(prompt, turn, answers), chat=True)
    return dt.encode(raw_text(prompt, turn, answers), chat=False)


def check_batch_methods(methods: list[BenchMethod], batch_size: int) -> None:
    """Batches are decoded by methods that can (`run_batch`); one line naming the others."""
    if batch_size > 1:
        single = [m.name for m in methods if not hasattr(m, "run_batch")]
        if single:
            raise DynTreeError(f"--batch-size {batch_size}: {', '.join(single)} cannot decode batches (our methods "
                               "ar, static, dynamic can)")


def batch_groups(count: int, batch_size: int) -> list[range]:
    """Consecutive groups of `batch_size` items (the last may be smaller)."""
    return [range(i, min(i + batch_size, count)) for i in range(0, count, batch_size)]


def split_seconds(seconds: float, tokens: list[int]) -> list[float]:
    """A group's wall time shared by its sequences in proportion to their new tokens (equal shares if none)."""
    total = sum(tokens)
    if total == 0:
        return [seconds / len(tokens)] * len(tokens)
    return [seconds * t / total for t in tokens]


def run_benchmark(methods: list[BenchMethod], prompts: list[BenchPrompt], context: BenchContext,
                  settings: BenchSettings, progress: Callable[[str], None] | None = None) -> BenchRun:
    """Warm up, then run every (prompt, turn) with every method in rotated order; return the raw records."""
    settings.validate()
    check_batch_methods(methods, settings.batch_size)
    if settings.batch_size > 1:
        return _run_batched(methods, prompts, context, settings, progress)
    session = _Session(methods, prompts, context, settings)
    bench, tokenizer, reference = session.bench, context.tokenizer, session.reference

    def timed(method, prompt_ids, max_new):
        (tokens, stats), seconds, memory = session.timed(method.run, prompt_ids, max_new)
        return tokens, stats, seconds, memory

    first_ids = _encode(context, prompts[0], 0, [], settings.chat)
    for _ in range(settings.warmup):
        for method in methods:
            if progress:
                progress(f"warm-up {method.name}")
            torch.manual_seed(settings.seed)
            timed(method, first_ids, min(settings.max_new_tokens, 32))

    round_index = 0
    for prompt in prompts:
        answers: list[str] = []
        for turn in range(min(settings.turns, len(prompt.turns))):
            prompt_ids = _encode(context, prompt, turn, answers, settings.chat)
            bench.inputs[(prompt.prompt_id, turn + 1)] = {"token_ids": prompt_ids}
            outputs: dict[str, list[int]] = {}
            for repeat in range(settings.repeats):
                order = _rotated(methods, round_index)
                round_index += 1
                for position, method in enumerate(order):
                    if progress:
                        progress(f"prompt {prompt.prompt_id} turn {turn + 1}: {method.name}")
                    torch.manual_seed(settings.seed + round_index)
                    tokens, stats, seconds, memory = timed(method, prompt_ids, settings.max_new_tokens)
                    outputs.setdefault(method.name, tokens)
                    bench.records.append(_stats_record(method, prompt, turn, repeat, position, prompt_ids, tokens,
                                                       stats, seconds, memory))
            # The next turn continues the reference method's answer, so every method sees the same input.
            answers.append(tokenizer.decode(outputs[reference], skip_special_tokens=True))
    return session.finish(progress)


def _run_batched(methods: list[BenchMethod], prompts: list[BenchPrompt], context: BenchContext,
                 settings: BenchSettings, progress: Callable[[str], None] | None) -> BenchRun:
    """`run_benchmark` with prompt turns grouped `settings.batch_size` at a time (see the module docstring)."""
    session = _Session(methods, prompts, context, settings)
    bench, tokenizer, reference = session.bench, context.tokenizer, session.reference
    size = settings.batch_size

    def timed(method, batch_ids, max_new):
        (outputs, stats), seconds, memory = session.timed(method.run_batch, batch_ids, max_new)
        return outputs, stats, seconds, memory

    for method in methods:  # e.g. a tree sized by a latency model measures this batch size now, untimed
        if hasattr(method, "prepare_batch"):
            method.prepare_batch(size)
    # Warm-up on a full batch (the first prompt repeated): kernels and allocators see the batch's shapes.
    first_ids = _encode(context, prompts[0], 0, [], settings.chat)
    for _ in range(settings.warmup):
        for method in methods:
            if progress:
                progress(f"warm-up {method.name} (batch {size})")
            torch.manual_seed(settings.seed)
            timed(method, [first_ids] * size, min(settings.max_new_tokens, 32))

    answers: dict[str, list[str]] = {p.prompt_id: [] for p in prompts}
    round_index = 0
    group_index = 0
    for turn in range(settings.turns):
        todo = [p for p in prompts if turn < len(p.turns)]
        for group in batch_groups(len(todo), size):
            members = [todo[i] for i in group]
            batch_ids = []
            for prompt in members:
                ids = _encode(context, prompt, turn, answers[prompt.prompt_id], settings.chat)
                bench.inputs[(prompt.prompt_id, turn + 1)] = {"token_ids": ids}
                batch_ids.append(ids)
            outputs: dict[str, list[list[int]]] = {}
            for repeat in range(settings.repeats):
                order = _rotated(methods, round_index)
                round_index += 1
                for position, method in enumerate(order):
                    if progress:
                        progress(f"turn {turn + 1} prompts {members[0].prompt_id}..{members[-1].prompt_id}: "
                                 f"{method.name}")
                    torch.manual_seed(settings.seed + round_index)
                    tokens, stats, seconds, memory = timed(method, batch_ids, settings.max_new_tokens)
                    outputs.setdefault(method.name, tokens)
                    shares = split_seconds(seconds, [len(t) for t in tokens])
                    for b, prompt in enumerate(members):
                        record = _stats_record(method, prompt, turn, repeat, position, batch_ids[b], tokens[b],
                                               stats, shares[b], memory)
                        record.stop_reason = stats.stop_reasons[b] if stats.stop_reasons else None
                        record.accepted_lengths = _sequence_lengths(stats, b)
                        record.decode_passes = len(record.accepted_lengths) if record.accepted_lengths else 0
                        record.group, record.group_wall_seconds = group_index, seconds
                        bench.records.append(record)
            group_index += 1
            for b, prompt in enumerate(members):  # the next turn continues the reference method's answer
                answers[prompt.prompt_id].append(tokenizer.decode(outputs[reference][b],
                                                                  skip_special_tokens=True))
    return session.finish(progress)


def _sequence_lengths(stats, b: int) -> list[int] | None:
    """Sequence b's tokens per decoding pass, from a batch's stats (`sequence_accepted` kept by the loop)."""
    per_sequence = getattr(stats, "sequence_accepted", None)
    return list(per_sequence[b]) if per_sequence else None


class _Session:
    """What the single and batched runners share: the run's records, the timer and the reference method."""

    def __init__(self, methods, prompts, context: BenchContext, settings: BenchSettings):
        device = context.torch_device
        self.methods, self.settings = methods, settings
        self.probe = MemoryProbe(device)
        self.bench = BenchRun(methods, prompts, settings, memory_kind=self.probe.kind,
                              environment=environment(device))
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        names = [m.name for m in methods]
        self.reference = REFERENCE_METHOD if REFERENCE_METHOD in names else names[0]  # later turns continue it

    def timed(self, call, *args):
        """`call(*args)`, its wall seconds (device synchronised on both sides) and the memory probe's reading."""
        self.probe.start()
        self.sync()
        start = time.perf_counter()
        out = call(*args)
        self.sync()
        return out, time.perf_counter() - start, self.probe.stop()

    def finish(self, progress) -> BenchRun:
        bench, settings = self.bench, self.settings
        bench.environment["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        # Quality of the sampling methods' distribution: after the timed runs, so it never disturbs a timing.
        bench.kl = measure_first_token_kl(self.methods, bench.inputs, settings.kl_samples, settings.kl_contexts,
                                          progress)
        return bench


def _rotated(methods: list, round_index: int) -> list:
    """The methods in this round's order: each round starts one method later, so no method always runs first."""
    shift = round_index % len(methods)
    return methods[shift:] + methods[:shift]
