"""What a decoding step costs by tree size, so that the tree size can be chosen step by step (ProPD).

A bigger tree can only pay off if the extra tokens it is expected to accept outweigh what the bigger
forward pass costs. That trade-off depends on the hardware: on a GPU a 64-token pass costs about as much as
a 1-token pass, on a 2-core CPU it costs 2-4x as much. `LatencyModel` holds measured step times by number
of verified tokens (batch x tree size) and `choose_tree_size` picks, for the current step's scored
candidates, the size with the most expected tokens per second.

Batches: a batch of B sequences verifies a `[B, n]` tree block per step, and what that costs is not the cost
of B*n tokens at batch 1 (a GPU runs B rows nearly as fast as one; a CPU's matmuls get more efficient with
more rows). `BatchLatency` holds one `LatencyModel` per batch size (tree width n per row), each measured on
this machine by `machine_latency(..., batch=B)` when first needed and cached like the batch-1 model, plus the
cost of a plain-decoding step (no heads) at the same batch size, which says when trees stop paying.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import precision  # through the module: tests stand in for `precision.machine_busy`
from ..cachedir import cache_root
from ..errors import DynTreeError

DEFAULT_SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


@dataclass
class LatencyModel:
    """Seconds of one decoding step (heads, tree forward, verification) by verified rows, interpolated."""

    rows: list[int]
    seconds: list[float]
    note: dict = field(default_factory=dict)  # where and how it was measured

    def __post_init__(self):
        if not self.rows or len(self.rows) != len(self.seconds):
            raise DynTreeError("a latency model needs matching, non-empty `rows` and `seconds`")
        if any(b <= a for a, b in zip(self.rows, self.rows[1:])) or self.rows[0] < 1:
            raise DynTreeError("latency rows must be positive and strictly increasing")
        if any(not s > 0 for s in self.seconds):
            raise DynTreeError("latency seconds must be positive")

    def cost(self, rows: int) -> float:
        """Step seconds for `rows` verified tokens: linear between measured points, linear past the last."""
        xs, ys = self.rows, self.seconds
        if rows <= xs[0] or len(xs) == 1:
            return ys[0] if rows <= xs[0] else ys[-1] * rows / xs[-1]
        i = bisect.bisect_left(xs, rows)
        if i == len(xs):  # extrapolate with the last segment's slope
            i -= 1
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (rows - x0) / (x1 - x0)

    def to_dict(self) -> dict:
        return {"format": "dyntree-latency", "rows": self.rows, "seconds": self.seconds, "note": self.note}

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyModel":
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text())
            if data.get("format") != "dyntree-latency":
                raise ValueError("not a dyntree latency file")
            return cls([int(r) for r in data["rows"]], [float(s) for s in data["seconds"]], data.get("note", {}))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DynTreeError(f"cannot read latency model {path}: {exc}".splitlines()[0]) from exc


def choose_tree_size(scores: list[list[float]], latency: LatencyModel, max_size: int) -> int:
    """Tree size (root included, same for every row) with the most expected new tokens per second.

    `scores[b]` are row b's candidate nodes in selection order (best first; every prefix is a tree), each an
    estimate of the probability that the node's whole path is accepted. A step then adds
    `1 + sum(scores of its nodes)` tokens in expectation (the root, plus every accepted node), and costs
    `latency.cost(batch * size)`.
    """
    batch = len(scores)
    expected = float(batch)
    best_size, best_rate = 1, expected / latency.cost(batch)
    for size in range(2, max_size + 1):
        expected += sum(row[size - 2] for row in scores if len(row) > size - 2)
        rate = expected / latency.cost(batch * size)
        if rate > best_rate:
            best_size, best_rate = size, rate
    return best_size


def monotone_costs(seconds: list[float]) -> list[float]:
    """Each cost lowered to the cheapest cost of any larger size: non-decreasing, outliers removed."""
    out = list(seconds)
    for i in range(len(out) - 2, -1, -1):
        out[i] = min(out[i], out[i + 1])
    return out


@torch.inference_mode()
def measure_latency(backbone, heads=None, sizes=DEFAULT_SIZES, context: int = 128, repeats: int = 5,
                    topk: int = 8, batch: int = 1) -> LatencyModel:
    """Time one decoding step at each tree size: heads (if given), a tree forward, lm_head on the rows that
    verification projects up front.

    `batch`: sequences decoded together; `rows` of the result are then nodes per sequence (the tree width n
    of a `[batch, n]` step), and the lm_head runs on those rows of each sequence.

    A chain-shaped tree is used: the cost of a pass depends on its token count, not on the tree's shape.
    Takes a few seconds on a CPU. Shared and virtual machines add delays that only ever lengthen a run
    (other jobs, stolen CPU time), so the fastest of `repeats` runs is kept, and a size may not cost less
    than a smaller one: an outlier is pulled down to the cheapest larger size (`monotone_costs`).
    """
    device = backbone.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sizes = sorted({int(s) for s in sizes if int(s) >= 1})
    if not sizes:
        raise DynTreeError("no tree sizes to measure")
    if batch < 1:
        raise DynTreeError("batch size must be at least 1")
    # Verification projects a tree's first-child chain (at most one node per depth the heads draft) through
    # the lm_head in one call: so many rows here, not the whole chain-shaped tree.
    verified_rows = 1 + (heads.num_heads if heads is not None else 0)
    cache = backbone.new_cache(batch, context + max(sizes) + 1)
    vocab = backbone.config.vocab_size
    prefix = torch.randint(0, vocab, (batch, context), generator=torch.Generator().manual_seed(0)).to(device)
    last = backbone.forward(prefix, cache)[:, -1]
    cache.lengths.fill_(context)
    seconds = []
    for n in sizes:
        tokens = prefix[:, :n]
        block = torch.ones(n, n, dtype=torch.bool, device=device).tril().expand(batch, n, n)
        depths = torch.arange(n, device=device).expand(batch, n)
        times = []
        for i in range(repeats + 1):
            sync()
            start = time.perf_counter()
            if heads is not None:  # the heads' work of an n-node tree
                heads.draft(backbone, last, prefix[:, -1], topk).grow(n)
            hidden = backbone.forward(tokens, cache, block_mask=block, depths=depths)
            backbone.logits(hidden[:, : min(n, verified_rows)]).argmax(-1)
            sync()
            if i > 0:  # the first run warms caches and allocators
                times.append(time.perf_counter() - start)
        seconds.append(min(times))
    seconds = monotone_costs(seconds)
    note = {"device": str(device), "threads": torch.get_num_threads(), "context": context, "repeats": repeats,
            "heads": heads is not None, "batch": batch}
    return LatencyModel(sizes, seconds, note)


def machine_latency(backbone, heads, sizes, topk: int, cache_dir: str | os.PathLike | None = None,
                    batch: int = 1) -> LatencyModel:
    """This machine's step latency for `backbone` + `heads`: measured once (a few seconds), then read back.

    `batch` > 1: the cost of a `[batch, n]` step by tree width n (see `measure_latency`), cached separately.

    The cache file is keyed by everything that changes the timings: the processor, the forward's code, torch
    and its thread count, the device, dtype and weights format, the model's and heads' shapes, the draft's
    top-k and the sizes measured.
    """
    config = backbone.config
    key = {"cpu": list(precision.cpu_identity()), "kernels": precision.kernels_version(),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(backbone.device),
           "dtype": str(backbone.dtype), "weights": getattr(backbone, "weights", str(backbone.dtype)),
           "model": [config.model_type, config.num_layers, config.hidden_size, config.intermediate_size,
                     config.vocab_size],
           "heads": None if heads is None else [heads.num_heads, heads.config.num_layers,
                                              heads.config.vocab_subset or 0, heads.config.head_type],
           "topk": topk, "sizes": sorted({int(s) for s in sizes})}
    if batch != 1:
        key["batch"] = int(batch)  # batch 1 keeps the key (and cache files) it always had
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) if cache_dir is not None else cache_root() / "latency"
    path = path / f"{digest}.json"
    if path.is_file():
        try:
            return LatencyModel.load(path)
        except DynTreeError:
            pass  # a damaged cache file is measured again and overwritten
    model = measure_latency(backbone, heads, key["sizes"], topk=topk, batch=batch)
    model.note["key"] = key
    if precision.machine_busy():
        return model  # timings taken beside other work mislead: use them now, measure again next time
    tmp = path.with_name(path.name + ".tmp")
    model.save(tmp)
    os.replace(tmp, path)
    return model


class BatchLatency:
    """Step cost by (batch size, tree width): one `LatencyModel` per batch size, measured when first needed.

    `tree[b]` is the cost of a tree step (heads included) of b sequences by nodes per sequence; `plain[b]`, if
    known, the seconds of a plain-decoding step (no heads, the root alone) of b sequences. `measure(b)`
    returns `(tree, plain)` for a batch size not yet known (e.g. `machine_batch_latency`); without it, an
    unknown batch size is estimated from the batch-1 model as b * n tokens (the batch-1 rule).

    `freeze()` stops all measuring (a server, once started): an unknown batch size then reads the nearest
    measured batch size below it, tree and plain step alike, so their ratio (what decides) is kept.
    """

    def __init__(self, tree: dict[int, LatencyModel], plain: dict[int, float] | None = None, measure=None):
        if not tree and measure is None:
            raise DynTreeError("a batch latency model needs measured batch sizes or a way to measure them")
        self.tree = dict(tree)
        self.plain = dict(plain or {})
        self._measure = measure
        self.frozen = False

    def freeze(self) -> None:
        self.frozen = True

    def bucket(self, batch: int) -> int | None:
        """The batch size whose measurements answer for `batch` (itself, or frozen: the nearest below)."""
        if batch in self.tree or not self.frozen:
            return batch
        below = [b for b in self.tree if b <= batch]
        return max(below) if below else None

    def model(self, batch: int) -> LatencyModel | None:
        """The measured (or now measured) tree-step model of `batch` sequences; None if it cannot be had."""
        if batch not in self.tree and self._measure is not None and not self.frozen:
            tree, plain = self._measure(batch)
            self.tree[batch] = tree
            if plain is not None:
                self.plain[batch] = plain
        return self.tree.get(self.bucket(batch))

    def cost(self, batch: int, nodes: int) -> float:
        """Seconds of a tree step of `batch` sequences with `nodes` nodes each (padding included)."""
        model = self.model(batch)
        if model is not None:
            return model.cost(nodes)
        base = self.tree.get(1) or next(iter(self.tree.values()))
        return base.cost(batch * nodes)

    def known_cost(self, batch: int, nodes: int) -> float | None:
        """What `cost` (nodes > 1) or `plain_cost` (nodes 1, else the tree model at one node) answers, if that
        batch size is known already: never measures (a real step is compared with it as it runs)."""
        known = self.bucket(batch)
        if known not in self.tree:
            return None
        if nodes <= 1 and known in self.plain:
            return self.plain[known]
        return self.tree[known].cost(nodes)

    def plain_cost(self, batch: int) -> float | None:
        """Seconds of a plain-decoding step of `batch` sequences (no heads), if measured."""
        self.model(batch)
        return self.plain.get(self.bucket(batch))

    @classmethod
    def from_model(cls, model: "LatencyModel | BatchLatency") -> "BatchLatency":
        """A batch-1 `LatencyModel` (e.g. a `latency=` file) as a batch model: batch b costs b * n tokens."""
        return model if isinstance(model, BatchLatency) else cls({1: model})


def machine_batch_latency(backbone, heads, sizes, topk: int, cache_dir: str | os.PathLike | None = None,
                          batches=()) -> BatchLatency:
    """This machine's `BatchLatency`: batch sizes in `batches` measured now, any other when a run first needs
    it (each a few seconds on a CPU, then read from the cache: `machine_latency`)."""

    def measure(batch: int):
        tree = machine_latency(backbone, heads, sizes, topk, cache_dir, batch=batch)
        plain = machine_latency(backbone, None, [1], topk, cache_dir, batch=batch)
        return tree, plain.cost(1)

    latency = BatchLatency({}, measure=measure)
    for batch in batches:
        latency.model(int(batch))
    return latency
