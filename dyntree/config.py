"""`TreeConfig`: every setting of the candidate tree, validated once where it enters (CLI, API, server, bench).

The front doors only translate their own syntax into `TreeConfig.parse(...)` (or build one directly); a
config that exists is valid, so the stages behind it (`proposers.build_proposer`, the decoding loop) never
re-check options. Fields left at None mean "the measured default for this kind of tree" and are read through
the `resolved_*` properties, so a config can be re-targeted (`replace`) without carrying one kind's defaults
into another.

Two different temperatures exist in this project and are kept apart by name: `SamplingConfig.temperature`
shapes the model's distribution when sampling; `TreeConfig.tree_temperature` only sharpens or flattens the
heads' probabilities when a dynamic tree ranks its candidate nodes.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from .errors import DynTreeError

TREE_KINDS = ("ar", "static", "dynamic")
DEFAULT_KIND = "dynamic"  # the fastest on CPU (docs/dynamic-trees.md)
DEFAULT_STATIC_TREE = "mc_sim_7b_63"  # what "static" means: Medusa's 63-node tree
STATIC_TOPK = 10  # guesses per head a static tree may index (Medusa's trees use ranks 0..9)
DYNAMIC_TOPK = 8  # top-4 and top-10 were no better at 8 nodes (docs/dynamic-trees.md)
DYNAMIC_SIZE = 8  # measured best fixed size on a 2-core CPU (docs/dynamic-trees.md)
AUTO_MAX_SIZE = 32  # the largest tree `size="auto"` may choose
# Raw head probabilities are over-confident; flattening them (T=2) orders nodes across depths about as well
# as calibrated scores do, with no calibration data (docs/dynamic-trees.md). Calibrated scores use T=1.
PROB_TREE_TEMPERATURE = 2.0
DEFAULT_LOOKUP = 6  # lookup-chain tokens per tree (docs/dynamic-trees.md); 0 = heads only
DEFAULT_RECYCLE = 2  # recycled candidates per tree (docs/dynamic-trees.md: +1.6% tokens per pass, +1% tokens/s)
SCORE_MODES = ("prob", "rank", "binned")
LOOKUP_MERGES = ("first", "score")

# Settings that only a dynamic tree reads (a static or no tree refuses them rather than ignore them).
DYNAMIC_ONLY = ("auto", "score", "tree_temperature", "lookup", "calibration", "latency", "learn", "recycle")


@dataclass(frozen=True)
class TreeConfig:
    """What tree to verify each step, and how to build it.

    kind:             "ar" (no tree: plain decoding), "static" (a fixed tree) or "dynamic" (built every step).
    static_tree:      static only: a built-in tree name, a JSON file of rank paths, or a list of paths
                      (None: Medusa's `mc_sim_7b_63`).
    size:             dynamic: nodes per tree, root included (None: 8); with `auto`, the largest tree (None: 32).
                      static: keep the tree's first `size` nodes (None: all).
    auto:             dynamic: choose the size every step from expected accepted tokens and the machine's
                      measured step latency (ProPD's dynamic tree generation).
    topk:             guesses read from each head (None: 10 static, 8 dynamic).
    score:            dynamic node scores: "prob" (head marginals), "rank" or "binned" (measured acceptance
                      rates); None: "prob", or "binned" with `auto` (expected tokens are read from scores).
    tree_temperature: dynamic: applied to head probabilities before ranking (None: 2 for "prob", else 1).
    lookup:           dynamic: tokens copied from the context as one branch of the same budget (None: 6).
    calibration:      dynamic: acceptance statistics (`AcceptanceStats` or its JSON file) to start from.
    latency:          auto only: a `LatencyModel` or its JSON file (None: measured once per machine, cached).
    learn:            dynamic: update acceptance statistics online (None: when the score is calibrated).
    recycle:          dynamic: up to this many recycled candidates per tree (token recycling: each token's
                      verified successors, learnt online), inside the same budget (None: DEFAULT_RECYCLE).
    early_prune:      static or dynamic: (LAYER, K) ProPD early pruning inside the tree pass, from "LAYER:K";
                      None or "off": no pruning (the default: it pays only where a pass is compute-bound,
                      docs/dynamic-trees.md). LAYER < the model's layer count is checked where the model is
                      known (`early.build_pruner`).
    renormalize, lookup_ngram, lookup_merge: dynamic-tree details for experiments (docs/dynamic-trees.md).
    """

    kind: str = DEFAULT_KIND
    static_tree: str | os.PathLike | tuple | list | None = None
    size: int | None = None
    auto: bool = False
    topk: int | None = None
    score: str | None = None
    tree_temperature: float | None = None
    lookup: int | None = None
    calibration: object = None
    latency: object = None
    learn: bool | None = None
    recycle: int | None = None
    renormalize: bool = True
    lookup_ngram: tuple[int, int] = (3, 2)
    lookup_merge: str = "first"
    early_prune: tuple[int, int] | str | None = None

    def __post_init__(self):
        if self.kind not in TREE_KINDS:
            raise DynTreeError(f"unknown tree kind {self.kind!r}: choose from {', '.join(TREE_KINDS)}")
        object.__setattr__(self, "early_prune", parse_early_prune(self.early_prune))
        if self.kind == "ar" and self.early_prune is not None:
            raise DynTreeError("early pruning does not apply to plain decoding (tree 'ar'): it prunes a tree")
        if self.kind != "dynamic":
            given = [name for name in DYNAMIC_ONLY if getattr(self, name) not in (None, False)]
            if given:
                verb = "applies" if len(given) == 1 else "apply"
                raise DynTreeError(f"{', '.join(given)} only {verb} to the dynamic tree (tree 'dynamic'), "
                                   f"not to {self.kind!r}")
        if self.kind != "static" and self.static_tree is not None:
            raise DynTreeError(f"a static tree spec only applies to tree 'static', not {self.kind!r}")
        if self.kind == "ar" and (self.size is not None or self.topk is not None):
            raise DynTreeError("tree size and topk do not apply to plain decoding (tree 'ar')")
        _check_int("topk", self.topk, 1)
        if self.kind == "dynamic":
            _check_int("tree size", self.size, 2, "(root + 1 candidate)")
        else:
            _check_int("tree size", self.size, 1)
        if self.score is not None and self.score not in SCORE_MODES:
            raise DynTreeError(f"unknown tree score {self.score!r}: choose from {', '.join(SCORE_MODES)}")
        if self.tree_temperature is not None and not (isinstance(self.tree_temperature, (int, float))
                                                      and 0 < self.tree_temperature < float("inf")):
            raise DynTreeError(f"tree temperature must be a positive number, got {self.tree_temperature!r}")
        _check_int("lookup", self.lookup, 0, "(tokens copied from the context)")
        _check_int("recycle", self.recycle, 0, "(recycled candidates per tree; 0 = off)")
        if self.latency is not None and not self.auto:
            raise DynTreeError("a latency model only applies to tree size 'auto'")
        ngram = tuple(self.lookup_ngram)
        if len(ngram) != 2 or not all(isinstance(n, int) for n in ngram) or not 1 <= ngram[1] <= ngram[0]:
            raise DynTreeError(f"lookup n-gram range must be (max, min) with max >= min >= 1, got {ngram!r}")
        if self.lookup_merge not in LOOKUP_MERGES:
            raise DynTreeError(f"lookup merge must be one of {', '.join(LOOKUP_MERGES)}, got {self.lookup_merge!r}")

    # -- parsing the front doors' syntax ---------------------------------------------------------------
    @classmethod
    def parse(cls, tree=None, tree_size=None, **fields) -> "TreeConfig":
        """A config from user-facing values: `tree` "ar" | "dynamic" | "static" | "static:N" | a built-in tree
        name (optionally ":N") | a JSON file | a list of paths; `tree_size` an int, "auto" or "auto:N".
        Other keyword arguments are the dataclass fields (None = default)."""
        unknown = sorted(set(fields) - _FIELD_NAMES)
        if unknown:
            raise DynTreeError(f"unknown tree setting {unknown[0]!r}: choose from {', '.join(sorted(_FIELD_NAMES))}")
        kind, static_tree, static_size = _parse_tree(DEFAULT_KIND if tree is None else tree)
        size, auto = _parse_size(tree_size)
        if static_size is not None:
            if size is not None:
                raise DynTreeError(f"tree {tree!r} already names its size; drop the tree size")
            size = static_size
        if kind == "ar":
            fields = {k: v for k, v in fields.items() if v is not None}  # plain decoding: nothing to set
        return cls(kind=kind, static_tree=static_tree, size=size, auto=auto, **fields)

    def replace(self, **changes) -> "TreeConfig":
        """A validated copy with some fields changed (`tree_size` / `tree` take the parse syntax)."""
        if "tree" in changes or "tree_size" in changes:
            current = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
            if "tree" in changes:
                kind, static_tree, static_size = _parse_tree(changes.pop("tree"))
                if kind != self.kind:  # another kind of tree: none of this one's settings carry over
                    current = {}
                current.update(kind=kind, static_tree=static_tree)
                if static_size is not None:
                    current["size"] = static_size
            if "tree_size" in changes:
                current["size"], current["auto"] = _parse_size(changes.pop("tree_size"))
                if not current["auto"]:
                    current["latency"] = None
            current.update(changes)
            return TreeConfig(**current)
        return dataclasses.replace(self, **changes)

    # -- defaults resolved -------------------------------------------------------------------------------
    @property
    def resolved_topk(self) -> int:
        if self.kind == "ar":
            return 0
        return self.topk or (DYNAMIC_TOPK if self.kind == "dynamic" else STATIC_TOPK)

    @property
    def resolved_size(self) -> int | None:
        """Dynamic: nodes per tree (the largest one with `auto`); static: nodes kept (None = all); ar: 1."""
        if self.kind == "ar":
            return 1
        if self.kind == "dynamic" and self.size is None:
            return AUTO_MAX_SIZE if self.auto else DYNAMIC_SIZE
        return self.size

    @property
    def resolved_score(self) -> str:
        return self.score or ("binned" if self.auto else "prob")

    @property
    def resolved_tree_temperature(self) -> float:
        if self.tree_temperature is not None:
            return float(self.tree_temperature)
        return PROB_TREE_TEMPERATURE if self.resolved_score == "prob" else 1.0

    @property
    def resolved_lookup(self) -> int:
        return DEFAULT_LOOKUP if self.lookup is None else self.lookup

    @property
    def resolved_recycle(self) -> int:
        return DEFAULT_RECYCLE if self.recycle is None else self.recycle

    @property
    def resolved_learn(self) -> bool:
        return (self.resolved_score != "prob") if self.learn is None else bool(self.learn)

    @property
    def static_spec(self):
        """What `trees.load_tree_spec` reads for a static tree: its name or file, with ":N" when cut."""
        base = self.static_tree if self.static_tree is not None else DEFAULT_STATIC_TREE
        if self.size is not None and isinstance(base, str):
            return f"{base}:{self.size}"
        return base

    def settings(self) -> dict:
        """The values a report records (defaults resolved; objects named by their type)."""
        out = {"tree": self.kind}
        if self.kind == "ar":
            return out
        out.update(topk=self.resolved_topk)
        if self.early_prune is not None:
            out["early_prune"] = "{}:{}".format(*self.early_prune)
        if self.kind == "static":
            out.update(static_tree=str(self.static_tree or DEFAULT_STATIC_TREE), size=self.size)
            return out
        out.update(size="auto" if self.auto else self.resolved_size, score=self.resolved_score,
                   tree_temperature=self.resolved_tree_temperature, lookup=self.resolved_lookup)
        if self.resolved_recycle:
            out["recycle"] = self.resolved_recycle
        if self.auto:
            out["max_size"] = self.resolved_size
        for name in ("calibration", "latency"):
            value = getattr(self, name)
            if value is not None:
                out[name] = str(value) if isinstance(value, (str, os.PathLike)) else type(value).__name__
        return out


_FIELD_NAMES = {f.name for f in dataclasses.fields(TreeConfig)} - {"kind", "static_tree", "size", "auto"}


def parse_early_prune(value) -> tuple[int, int] | None:
    """"LAYER:K" (or a (LAYER, K) pair) -> (LAYER, K) with LAYER >= 1 and K >= 1; None or "off" -> None."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "off"):
        return None
    parts = value.strip().split(":") if isinstance(value, str) else value
    try:
        layer, k = parts
        layer, k = (int(p) if isinstance(p, str) and p.strip().isdigit() else p for p in (layer, k))
    except (TypeError, ValueError):
        layer = k = None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (layer, k)):
        raise DynTreeError(f"early prune must be LAYER:K (the layer after which to prune, >= 1, and the early "
                           f"top-k kept, >= 1) or 'off', got {value!r}")
    return layer, k


def _check_int(what: str, value, minimum: int, why: str = "") -> None:
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise DynTreeError(f"{what} must be an integer of at least {minimum}{' ' + why if why else ''}, "
                           f"got {value!r}")


def _parse_tree(tree) -> tuple[str, object, int | None]:
    """(kind, static tree spec or None, static size from a ":N" suffix or None)."""
    if isinstance(tree, (list, tuple)):
        return "static", tree, None
    if isinstance(tree, os.PathLike):
        return "static", tree, None
    if not isinstance(tree, str) or not tree.strip():
        raise DynTreeError(f"tree must be 'ar', 'static', 'dynamic', a tree name or a JSON file, got {tree!r}")
    if tree in ("ar", "dynamic"):
        return tree, None, None
    if tree == "static":
        return "static", None, None
    name, sep, count = tree.rpartition(":")
    if sep and name and count.isdigit() and not os.path.exists(tree):  # "static:8" / "mc_sim_7b_63:8"
        return "static", None if name == "static" else name, int(count)
    return "static", tree, None


def _parse_size(size) -> tuple[int | None, bool]:
    """An int, "auto" or "auto:N" (also as digits in a string) -> (size, auto)."""
    if size is None or (isinstance(size, int) and not isinstance(size, bool)):
        return size, False
    if isinstance(size, str):
        text = size.strip()
        if text == "auto":
            return None, True
        if text.startswith("auto:") and text[5:].isdigit():
            return int(text[5:]), True
        if text.isdigit():
            return int(text), False
    raise DynTreeError(f"tree size must be an integer, 'auto' or 'auto:N', got {size!r}")
