"""Continuous batching: many requests decode together on one batched KV cache, joining and leaving at steps.

`BatchEngine` owns the model, a cache of `max_batch` rows and one background thread (torch work never runs on
the caller's thread). `submit(EngineRequest)` queues a request and returns a `RequestHandle`; the thread's
`step()`:

1. drops cancelled and timed-out requests (queued or decoding) and frees their rows;
2. admits waiting requests into free rows: prefill (alone, batch 1, exactly as a solo run does) and the
   first token;
3. decodes one step of every active row through the library's own step (`step.DecodeStep`: rows grouped by
   their tree policy within the node budget `tree_size_for(batch size)`, ONE forward pass over all rows, with
   the tree's early pruning when every row shares it), and hands each request its new text through its `sink`
   callback;
4. frees the rows of finished requests (the last active row moves into the hole, so active rows are always
   cache rows 0..k-1 and a step reads a view of them, never a copy).

Exactness: the backbone's kernels give every row the same bits whatever the other rows hold or how many there
are (`kernels.py`), padding nodes see only committed tokens and themselves and are never accepted (parent -1),
and greedy verification walks each row independently, so a greedy answer is token-identical alone or beside
others. A sampling row has its own sampler (`sampling.Sampler`), so it is verified alone on its own (unpadded)
tree with its own `torch.Generator`.

Independent of HTTP: `server.py` wraps it; tests drive `step()` directly.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from .api import DynTree
from .errors import DynTreeError
from .model import KVCache
from .proposers import Proposer
from .sampling import Sampler, SamplingConfig
from .step import DecodeStep, StepRows, last_states, prefill_states, take_tokens
from .textstream import TextStream

log = logging.getLogger("dyntree.engine")

TREE_CACHE_SIZE = 8  # distinct per-request tree settings kept built
# From this many rows on, the default node budget is one node per row (plain decoding): a batch already fills
# the matrix products that a tree fills for one sequence, so extra tree nodes cost more than they return.
# The rule for trees without a measured budget: `dyntree serve` measures one (batch size, nodes) budget where
# the heads ship a tree profile (`TreeSizer.prepare` in `commands/serve.measured_tree_size_for`) and passes it
# as `tree_size_for`.
PLAIN_DECODING_BATCH = 8


def on_own_thread(work: Callable[[], object]):
    """Run `work()` on a thread that ends before this returns; its result, or its exception re-raised.

    Why: each thread that runs an OpenMP parallel region keeps its own pool of worker threads until it exits,
    and libgomp stops spin-waiting (its workers sleep between regions, to be woken by a system call at every
    one of the pass's hundreds of small regions) once it manages more threads than there are CPUs. A model
    loaded and measured on the main thread, then decoded on the engine thread, leaves two pools alive:
    measured on 2 cores, one request ran at half the speed. Work done here leaves no pool behind, so the
    engine thread is the only one that owns one.
    """
    box: dict = {}

    def run():
        try:
            box["result"] = work()
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name="dyntree-load")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def default_tree_size_for(batch_size: int) -> int | None:
    """Nodes per row for a step of `batch_size` rows: None = each row's configured tree, 1 = plain decoding."""
    return 1 if batch_size >= PLAIN_DECODING_BATCH else None


class EngineRefusal(DynTreeError):
    """The engine cannot take (or finish) a request now: `status` is the HTTP status that says why."""

    def __init__(self, message: str, status: int, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


@dataclass
class EngineRequest:
    """One request, already tokenised and checked against the context.

    sink(event) is called on the engine thread with ("text", text, token_ids) for each pass that adds
    visible text, then exactly one of ("done", Outcome) or ("error", exception). It must not block.
    """

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingConfig
    sink: Callable[[tuple], None]
    stop: list[str] = field(default_factory=list)
    tree_fields: dict = field(default_factory=dict)  # the request's own tree settings (server.tree_request)
    timeout: float | None = None  # seconds from submission to the end of its answer


@dataclass
class Outcome:
    """A finished request: its text and the numbers for `usage` and the `dyntree` stats object."""

    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    finish_reason: str  # "stop" (end of sequence or a stop string), "length", "cancelled"
    stats: dict = field(default_factory=dict)


class RequestHandle:
    """What `submit` returns: `cancel()` it (client gone) and its row is freed at the next step."""

    def __init__(self, request: EngineRequest):
        self.request = request
        self.submitted = time.perf_counter()
        self.deadline = None if request.timeout is None else self.submitted + request.timeout
        self._cancelled = threading.Event()
        self.finished = threading.Event()  # set once its sink got "done" or "error"

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class EngineObserver:
    """Hooks for metrics (the server's Prometheus registry implements them); the default records nothing."""

    def step(self, batch_size: int, seconds: float, tokens_per_row: list[int]) -> None:
        """One decoding step over `batch_size` rows took `seconds`, adding `tokens_per_row` tokens."""

    def generated(self, tokens: int) -> None:
        """Tokens emitted outside decoding steps (the first token of each request, after its prefill)."""

    def finished(self, reason: str) -> None:
        """A request left: stop, length, cancelled, timeout, shutdown, error."""


class _Row:
    """A request holding a cache row: its tokens so far, the next root and the hidden state before it."""

    __slots__ = ("handle", "request", "dyntree", "sampler", "tokens", "text", "last_hidden", "root", "passes",
                 "accepted", "tree_sizes", "batch_sizes", "admitted", "reason", "prune")

    def __init__(self, handle: RequestHandle, dyntree: DynTree, admitted: float, device):
        self.handle = handle
        self.request = handle.request
        self.dyntree = dyntree
        # One generator per request, as a solo run has: a seed reproduces the request's draws.
        self.sampler = Sampler(self.request.sampling, device)
        self.tokens: list[int] = []
        self.text: TextStream | None = None
        self.last_hidden: torch.Tensor | None = None
        self.root = 0
        self.passes = 0
        self.accepted: list[int] = []
        self.tree_sizes: list[int] = []
        self.batch_sizes: list[int] = []
        self.admitted = admitted
        self.prune = None  # early pruning figures (`early.PruneStats`) once a step may prune this row
        self.reason = ""  # why it finished: "eos", "length", "stop"


class BatchEngine:
    """Decodes up to `max_batch` requests at once on `dt`'s model; up to `max_queue` more wait their turn.

    tree_size_for(batch_size) -> nodes per row this step (None: each row's own tree; 1: plain decoding): the
    hook a batch latency model plugs into. `threads`: torch intra-op threads of the engine thread. The tree
    sizing of `dt` is frozen (`TreeSizer.freeze`): the engine never measures step latency.
    `max_seq_len`: prompt + completion tokens a request may hold (default: the model's context); with
    `max_batch` it bounds the KV cache, which grows to what admitted requests need and is kept.
    """

    def __init__(self, dt: DynTree, max_batch: int = 8, max_queue: int = 64,
                 tree_size_for: Callable[[int], int | None] | None = None, threads: int | None = None,
                 observer: EngineObserver | None = None, max_seq_len: int | None = None):
        if max_batch < 1:
            raise DynTreeError(f"max batch must be at least 1, got {max_batch}")
        if max_queue < 0:
            raise DynTreeError(f"max queue must be at least 0, got {max_queue}")
        context = dt.model.config.max_position_embeddings
        if max_seq_len is not None and not 2 <= max_seq_len <= context:
            raise DynTreeError(f"max sequence length must be in 2..{context} (the model's context), "
                               f"got {max_seq_len}")
        self.base = dt
        self.backbone = dt.model.backbone
        self.heads = dt.heads
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_seq_len = max_seq_len or context
        self.tree_size_for = tree_size_for or default_tree_size_for
        self.threads = threads
        self.observer = observer or EngineObserver()
        self.eos = set(self.backbone.config.eos_token_ids)
        self.trees: OrderedDict[tuple, DynTree] = OrderedDict()  # per-request tree settings -> DynTree
        # Whatever the trees need measured was measured before (`dyntree serve`: `TreeSizer.prepare`); from
        # here on the engine thread times nothing, so no request waits behind a measurement.
        dt.sizer.freeze()
        self._step = DecodeStep(self.backbone, self.heads)
        self._rows: list[_Row] = []  # row i holds cache row i (engine thread only)
        self._cache: KVCache | None = None
        self._drafter = None  # the heads' per-sequence state over the cache's rows (heads that read the context)
        self._waiting: deque[RequestHandle] = deque()
        self._cond = threading.Condition()
        self._accepting = True
        self._drain_deadline: float | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._request_seconds = 0.0  # moving average of a request's time in a row (for Retry-After)

    # -- the caller's side (any thread) -------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def batch_size(self) -> int:
        return len(self._rows)

    @property
    def accepting(self) -> bool:
        return self._accepting

    def check(self, prompt_tokens: int, max_tokens: int) -> None:
        """Raise DynTreeError unless a request of this size fits a row."""
        limit = self.max_seq_len
        if prompt_tokens < 1:
            raise DynTreeError("empty prompt")
        if prompt_tokens >= limit:
            raise DynTreeError(f"the prompt is {prompt_tokens} tokens; the context is {limit} tokens")
        if max_tokens < 1:
            raise DynTreeError(f"max_tokens must be at least 1, got {max_tokens}")
        if prompt_tokens + max_tokens > limit:
            raise DynTreeError(f"the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the "
                               f"context of {limit} tokens")

    def submit(self, request: EngineRequest) -> RequestHandle:
        """Queue a request. Raises DynTreeError for a request that cannot fit, EngineRefusal (429) when the
        queue is full and EngineRefusal (503) once the engine stopped accepting work."""
        self.check(len(request.prompt_ids), request.max_tokens)
        handle = RequestHandle(request)
        with self._cond:
            if not self._accepting:
                raise EngineRefusal("the server is shutting down", 503)
            # Requests that a free row will take at the next step do not count as queued.
            if len(self._rows) + len(self._waiting) >= self.max_batch + self.max_queue:
                raise EngineRefusal(f"the server is busy ({len(self._rows)} requests decoding, "
                                    f"{len(self._waiting)} waiting); retry later", 429, self.retry_after())
            self._waiting.append(handle)
            self._cond.notify_all()
        return handle

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: the queue's share of rows times a request's mean time."""
        per_request = self._request_seconds or 1.0
        return max(1, min(60, math.ceil(per_request * (len(self._waiting) + 1) / self.max_batch)))

    def start(self) -> "BatchEngine":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="dyntree-engine", daemon=True)
            self._thread.start()
        return self

    def stop_accepting(self, grace: float | None = None) -> None:
        """Refuse new requests (503); those already accepted go on, and after `grace` seconds (None: no limit)
        any still unfinished are failed with a 503 (a clean error, never silence)."""
        with self._cond:
            self._accepting = False
            if grace is not None:
                deadline = time.perf_counter() + max(grace, 0.0)
                self._drain_deadline = deadline if self._drain_deadline is None else min(self._drain_deadline,
                                                                                          deadline)
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no request is queued or decoding; False if `timeout` passed first."""
        end = None if timeout is None else time.perf_counter() + timeout
        with self._cond:
            while self._waiting or self._rows:
                left = None if end is None else end - time.perf_counter()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(0.05 if left is None else min(left, 0.05))
        return True

    def close(self, grace: float = 0.0) -> None:
        """Stop accepting, let requests finish for up to `grace` seconds, fail the rest (503), stop the thread."""
        self.stop_accepting(grace)
        if self._thread is not None:
            self.wait_idle(grace + 1.0)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._fail_everything(EngineRefusal("the server is shutting down", 503), "shutdown")

    # -- the engine thread ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)  # intra-op threads are per thread under OpenMP
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._rows:
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as exc:  # a bug: every request in flight gets an error, the engine goes on
                log.exception("engine step failed")
                self._fail_everything(exc, "error", waiting=False)
            with self._cond:
                self._cond.notify_all()  # wait_idle

    @torch.inference_mode()
    def step(self) -> bool:
        """Admit, decode one step for every active row, retire finished rows. False when there was nothing."""
        now = time.perf_counter()
        if self._drain_deadline is not None and now >= self._drain_deadline:
            self._fail_everything(EngineRefusal("the server is shutting down", 503), "shutdown")
            return False
        self._expire(now)
        self._admit()
        if not self._rows:
            return False
        started = time.perf_counter()
        rows = self._rows
        k = len(rows)
        groups = self._groups(self.tree_size_for(k))
        pruner = self._pruner_for(groups)
        prune_stats = []
        if pruner is not None:
            for b, row in enumerate(rows):
                row.prune = row.prune or pruner.new_stats()
                prune_stats.append((row.prune, [b]))
        device = self.backbone.device
        state = StepRows(torch.stack([row.last_hidden for row in rows]),
                         torch.tensor([row.root for row in rows], dtype=torch.long, device=device),
                         lambda index: [rows[i].request.prompt_ids + rows[i].tokens for i in index],
                         [row.sampler for row in rows], torch.ones(k, dtype=torch.bool, device=device),
                         None if self._drafter is None else self._drafter.rows(0, k))
        # Near the end of the context the largest tree no longer fits one row: plain decoding for that step
        # (greedy answers are the same; the request still gets all its max_tokens).
        out = self._step.run(self._cache.rows(0, k), state, groups, pruner, prune_stats, plain_when_full=True)
        if out is None:  # (cannot happen: admission checks prompt + max_tokens against the context)
            raise RuntimeError("a row has no room left in the cache")
        if len(groups) == 1 and all(row.dyntree is self.base for row in rows):  # the sized tree's own step
            self.base.observe_step(k, groups[0][0].max_nodes, out.seconds, out.tokens_per_row(state.active))
        roots = out.roots.tolist()
        added, done = [], []
        for b, row in enumerate(rows):
            row.passes += 1
            row.tree_sizes.append(out.sizes[b])
            row.batch_sizes.append(k)
            emitted = self._emit(row, out.tokens[b])
            row.accepted.append(emitted)
            added.append(emitted)
            row.last_hidden = out.hidden[b]
            row.root = roots[b]
            if row.reason:
                done.append(b)
        self.observer.step(k, time.perf_counter() - started, added)
        self._retire(done)
        return True

    def _pruner_for(self, groups: list[tuple[Proposer, list[int]]]):
        """The early pruner (`DynTree.pruner`) of this step: only when every row decodes with one DynTree's
        own tree (pruning keeps the same number of nodes in every row, so it cannot mix trees); else None."""
        if len(groups) != 1:
            return None
        proposer, idx = groups[0]
        dt = self._rows[idx[0]].dyntree
        pruner = getattr(dt, "pruner", None)
        if pruner is None or proposer is not dt.proposer or proposer.max_nodes <= 1:
            return None
        if any(self._rows[i].dyntree is not dt for i in idx):
            return None
        return pruner

    def _groups(self, budget: int | None) -> list[tuple[Proposer, list[int]]]:
        """Rows sharing a proposer, in row order: one `propose` call each."""
        groups: dict[int, tuple[Proposer, list[int]]] = {}
        for b, row in enumerate(self._rows):
            proposer = self._proposer_for(row.dyntree, budget)
            groups.setdefault(id(proposer), (proposer, []))[1].append(b)
        return list(groups.values())

    def _proposer_for(self, dt: DynTree, budget: int | None) -> Proposer:
        """The row's tree within a node budget (`DynTree.proposer_within`); plain steps share the step's one
        root-only proposer, so that all rows decode them in one group."""
        if budget is not None and budget <= 1:
            return self._step.plain
        return dt.proposer_within(budget)

    def _emit(self, row: _Row, candidates: list[int]) -> int:
        """Append tokens (up to EOS or max_tokens), send the text they add; returns how many were appended."""
        out, row.reason = take_tokens(len(row.tokens), candidates, row.request.max_tokens, self.eos)
        row.tokens += out
        delta = row.text.push(out, finished=bool(row.reason))
        if delta is not None and delta.text:
            _send(row.request, ("text", delta.text, delta.token_ids))
        if row.text.stopped:
            row.reason = "stop"
        return len(out)

    # -- rows joining and leaving ---------------------------------------------------------------------------
    def _admit(self) -> None:
        while len(self._rows) < self.max_batch:
            with self._cond:  # only this thread removes from the queue: the request stays visible (wait_idle)
                if not self._waiting:
                    return
                handle = self._waiting[0]
            row = None
            if handle.cancelled:
                self._end(handle, None, "cancelled")
            else:
                try:
                    row = self._prefill(handle)
                except DynTreeError as exc:
                    self._end(handle, exc, "error")
                except Exception as exc:  # a bug: this request gets an error, the others go on
                    log.exception("prefill failed")
                    self._end(handle, exc, "error")
            if row is not None and not row.reason:
                self._rows.append(row)
            with self._cond:
                self._waiting.popleft()
            if row is not None and row.reason:
                self._finish(row)

    def _prefill(self, handle: RequestHandle) -> _Row:
        """Build (or reuse) the request's tree (a `DynTree`), prefill its prompt into the next free row, choose the first
        token: a batch-1 forward, exactly what a solo run computes."""
        request = handle.request
        dt = self.tree_for(request.tree_fields)
        admitted = time.perf_counter()
        row = _Row(handle, dt, admitted, self.backbone.device)
        row.text = TextStream(self.base.tokenizer, request.stop)
        prompt = request.prompt_ids
        b = len(self._rows)
        longest = max([len(prompt) + request.max_tokens] +
                      [len(r.request.prompt_ids) + r.request.max_tokens for r in self._rows])
        self._reserve(longest + self._largest_tree(dt) + 1)
        prompt_states = prefill_states(self.backbone, self._cache.rows(b, 1, fresh=True), [prompt])
        last_hidden = last_states(prompt_states, [prompt])
        self._cache.lengths[b] = len(prompt)
        row.last_hidden = last_hidden[0]
        root = row.sampler.choose(self.backbone.logits(last_hidden))
        row.root = int(root[0])
        if self._drafter is not None:  # heads that read the context start the row's own state
            self.heads.start(self._drafter.rows(b, 1), self.backbone, prompt_states, [prompt], root)
        self._emit(row, [row.root])
        self.observer.generated(1)
        return row

    def _largest_tree(self, dt: DynTree) -> int:
        return max([dt.proposer.max_nodes] + [r.dyntree.proposer.max_nodes for r in self._rows])

    def _reserve(self, need: int) -> None:
        """Grow the cache (rarely: it keeps its largest size) so that every row can hold `need` slots."""
        need = min(need, self.backbone.config.max_position_embeddings)
        cache = self._cache
        if cache is not None and cache.max_len >= need:
            return
        grown = self.backbone.new_cache(self.max_batch, max(need, 256))
        if cache is not None:
            k = len(self._rows)
            grown.keys[:, :k, :, : cache.max_len] = cache.keys[:, :k]
            grown.values[:, :k, :, : cache.max_len] = cache.values[:, :k]
            grown.lengths[:k] = cache.lengths[:k]
        self._cache = grown
        if self.heads is not None:  # the heads' state grows with the cache (None: heads that keep none)
            self._drafter = (self.heads.new_state(self.max_batch, grown.max_len, self.backbone.device)
                             if self._drafter is None else self._drafter.grown(grown.max_len))

    def _expire(self, now: float) -> None:
        """Free the rows of cancelled and timed-out requests; drop such requests from the queue."""
        gone = []
        for b, row in enumerate(self._rows):
            handle = row.handle
            if handle.cancelled:
                row.reason = "cancelled"
                gone.append(b)
            elif handle.deadline is not None and now >= handle.deadline:
                row.reason = "timeout"
                gone.append(b)
        self._retire(gone)
        with self._cond:
            expired = [h for h in self._waiting if h.cancelled or (h.deadline is not None and now >= h.deadline)]
            for h in expired:
                self._waiting.remove(h)
        for h in expired:
            if h.cancelled:
                self._end(h, None, "cancelled")
            else:
                self._end(h, _timeout_error(h), "timeout")

    def _retire(self, indices: list[int]) -> None:
        """Finish the rows at `indices` and compact: the last active row moves into each hole."""
        for b in sorted(set(indices), reverse=True):
            row = self._rows[b]
            last = len(self._rows) - 1
            if b != last:
                cache = self._cache
                length = int(cache.lengths[last])
                cache.keys[:, b, :, :length] = cache.keys[:, last, :, :length]
                cache.values[:, b, :, :length] = cache.values[:, last, :, :length]
                cache.lengths[b] = length
                if self._drafter is not None:
                    self._drafter.move_row(last, b)
                self._rows[b] = self._rows[last]
            self._cache.lengths[last] = 0
            self._rows.pop()
            self._finish(row)

    def _finish(self, row: _Row) -> None:
        if row.reason == "cancelled":
            self._end(row.handle, None, "cancelled")
            return
        if row.reason == "timeout":
            self._end(row.handle, _timeout_error(row.handle), "timeout")
            return
        if not row.text.stopped:  # a run cut short may still hold text back
            delta = row.text.push([], finished=True)
            if delta is not None and delta.text:
                _send(row.request, ("text", delta.text, delta.token_ids))
        ended = time.perf_counter()
        finish = "stop" if row.reason in ("eos", "stop") else "length"
        seconds = ended - row.admitted
        self._request_seconds = seconds if not self._request_seconds else 0.8 * self._request_seconds + 0.2 * seconds
        passes = row.accepted
        outcome = Outcome(row.text.text, row.text.tokens, row.request.prompt_ids, finish, {
            "tree": row.dyntree.proposer.name + (f":{row.dyntree.pruner.label}"
                                                if getattr(row.dyntree, "pruner", None) else ""),
            "forward_passes": row.passes + 1,  # the prefill pass yields the first token
            "mean_accepted_per_pass": round(sum(passes) / len(passes), 4) if passes else 0.0,
            "mean_tree_size": round(sum(row.tree_sizes) / len(row.tree_sizes), 2) if row.tree_sizes else 0.0,
            "mean_batch_size": round(sum(row.batch_sizes) / len(row.batch_sizes), 2) if row.batch_sizes else 1.0,
            "tokens_per_second": round(len(row.text.tokens) / seconds, 2) if seconds > 0 else 0.0,
            "generation_seconds": round(seconds, 4),
            "queue_seconds": round(row.admitted - row.handle.submitted, 4),
            "acceptance": row.request.sampling.label,
            "heads": row.dyntree.heads_note,
            **({"early_prune": _prune_figures(row.prune)} if row.prune is not None and row.prune.passes else {}),
        })
        self._end(row.handle, outcome, finish)

    def _end(self, handle: RequestHandle, result, reason: str) -> None:
        """Tell the request how it ended (once) and count it."""
        if handle.finished.is_set():
            return
        handle.finished.set()
        self.observer.finished(reason)  # before the request hears of it: its client may read metrics next
        if result is not None:
            _send(handle.request, ("done", result) if isinstance(result, Outcome) else ("error", result))
        elif reason == "cancelled":
            _send(handle.request, ("cancelled",))

    @torch.inference_mode()  # the cache's tensors were made in inference mode
    def _fail_everything(self, exc: Exception, reason: str, waiting: bool = True) -> None:
        rows, self._rows = self._rows, []
        if self._cache is not None:
            self._cache.lengths.zero_()
        for row in rows:
            self._end(row.handle, exc, reason)
        if waiting:
            with self._cond:
                queued, self._waiting = list(self._waiting), deque()
            for handle in queued:
                self._end(handle, exc, reason)

    # -- trees ---------------------------------------------------------------------------------------------
    def tree_for(self, fields: dict) -> DynTree:
        """The server's tree, or one with a request's tree settings (built once, then the 8 latest are kept).
        Runs on the engine thread, so it measures nothing: the tree is sized from what the server measured
        at start-up (a frozen `TreeSizer`)."""
        base = self.base
        if not fields:
            return base
        if base.heads is None and fields.get("tree", "ar") != "ar":
            raise DynTreeError("this server has no heads: only tree 'ar' is available")
        key = tuple(sorted(fields.items()))
        if key in self.trees:
            self.trees.move_to_end(key)
            return self.trees[key]
        config = base.config.replace(**fields)  # its own tree keeps the server's settings (score, latency...)
        log.info("building a tree for %s", config.settings())
        dt = base.with_tree(config)
        self.trees[key] = dt
        if len(self.trees) > TREE_CACHE_SIZE:
            self.trees.popitem(last=False)
        return dt


def _prune_figures(prune) -> dict:
    """What an answer says of early pruning: where it pruned and what it dropped per pass."""
    figures = prune.as_dict()
    return {"layer": prune.layer, "k": prune.k, "pruned_nodes_per_pass": round(figures["pruned_nodes_per_pass"], 2),
            "pruned_share": round(figures["pruned_share"], 4), "miss_share": round(figures["miss_share"], 4)}


def _send(request: EngineRequest, event: tuple) -> None:
    try:
        request.sink(event)
    except Exception:  # a sink must not take the engine down
        log.exception("a request's sink failed")


def _timeout_error(handle: RequestHandle) -> EngineRefusal:
    return EngineRefusal(f"the request did not finish within its timeout of {handle.request.timeout:g} s", 504)


__all__ = ["BatchEngine", "EngineRequest", "EngineRefusal", "EngineObserver", "Outcome", "RequestHandle",
           "default_tree_size_for"]
