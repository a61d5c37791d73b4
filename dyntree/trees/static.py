"""Static trees: a fixed list of paths of per-head ranks (Medusa's `medusa_choices`).

Path `(0, 2)` is the node "head 0's top-1 guess, then head 1's top-3 guess". Every prefix of a path must be a
path too, its length may not exceed the number of heads, and its ranks must be below the top-k taken from
the heads.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from ..errors import DynTreeError
from .buffers import TreeBuffers, buffers_from_parents

BUILTIN_TREES = ("mc_sim_7b_63",)


def validate_paths(paths, num_heads: int | None = None, topk: int | None = None) -> list[tuple[int, ...]]:
    """Check a path list and return it as sorted tuples (parents before children, then by rank)."""
    if not isinstance(paths, (list, tuple)) or not paths:
        raise DynTreeError("tree spec must be a non-empty list of paths (lists of ranks)")
    clean: list[tuple[int, ...]] = []
    for p in paths:
        if not isinstance(p, (list, tuple)) or not p:
            raise DynTreeError(f"tree path {p!r} is not a non-empty list of ranks")
        if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in p):
            raise DynTreeError(f"tree path {list(p)} must hold non-negative integer ranks")
        clean.append(tuple(p))
    seen = set(clean)
    if len(seen) != len(clean):
        raise DynTreeError("tree spec lists a path twice")
    for p in clean:
        if len(p) > 1 and p[:-1] not in seen:
            raise DynTreeError(f"tree is not prefix-closed: {list(p)} has no parent {list(p[:-1])}")
        if num_heads is not None and len(p) > num_heads:
            raise DynTreeError(f"tree path {list(p)} is deeper ({len(p)}) than the number of heads ({num_heads})")
        if topk is not None and max(p) >= topk:
            raise DynTreeError(f"tree path {list(p)} uses rank {max(p)} but only the top-{topk} guesses are taken")
    return sorted(clean, key=lambda p: (len(p), p))


def load_tree_spec(spec: str | os.PathLike | list) -> tuple[str, list]:
    """A built-in tree name (optionally `NAME:N`, its first N nodes), a JSON file (a list of paths, or
    {"paths": [...]}) or a list -> (name, paths)."""
    if isinstance(spec, (list, tuple)):
        return "custom", list(spec)
    name = str(spec)
    base, _, size = name.partition(":")
    if base in BUILTIN_TREES and size:  # "mc_sim_7b_63:8": the tree's first 7 paths (8 nodes with the root)
        if not size.isdigit() or int(size) < 2:
            raise DynTreeError(f"tree {name!r}: the size after ':' must be an integer of at least 2")
        _, paths = load_tree_spec(base)
        if int(size) - 1 > len(paths):
            raise DynTreeError(f"tree {name!r}: {base} has only {len(paths) + 1} nodes")
        return name, paths[: int(size) - 1]  # built-in paths are listed so that every prefix is a tree
    if name in BUILTIN_TREES:
        text = resources.files("dyntree.trees").joinpath("data", f"{name}.json").read_text()
        return name, json.loads(text)["paths"]
    path = Path(name).expanduser()
    if not path.is_file():
        raise DynTreeError(f"unknown tree {name!r}: not {', '.join(BUILTIN_TREES)} and no such file")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise DynTreeError(f"tree file {path} is not valid JSON: {exc}") from exc
    paths = data.get("paths") if isinstance(data, dict) else data
    return path.stem, paths


@dataclass
class StaticTree:
    """A validated static tree and its (batch-1) buffers; `gather_index` maps node -> head*topk + rank."""

    name: str
    paths: list[tuple[int, ...]]
    topk: int
    buffers: TreeBuffers
    gather_index: torch.Tensor  # [n-1], into the heads' top-k flattened as [K * topk]

    @classmethod
    def build(cls, paths, topk: int, num_heads: int | None = None, name: str = "custom") -> "StaticTree":
        paths = validate_paths(paths, num_heads, topk)
        index = {p: i + 1 for i, p in enumerate(paths)}
        parents = [-1] + [index.get(p[:-1], 0) for p in paths]
        depth = max(len(p) for p in paths)
        buffers = buffers_from_parents(torch.tensor([parents]), depth)
        gather = torch.tensor([(len(p) - 1) * topk + p[-1] for p in paths], dtype=torch.long)
        return cls(name, paths, topk, buffers, gather)

    @property
    def num_nodes(self) -> int:
        return len(self.paths) + 1

    @property
    def depth(self) -> int:
        return max(len(p) for p in self.paths)


def chain_tree(depth: int) -> list[list[int]]:
    """The top-1 chain of the given depth: [[0], [0, 0], ...]."""
    return [[0] * d for d in range(1, depth + 1)]
