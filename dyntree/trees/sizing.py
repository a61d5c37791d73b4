"""The default tree size for this machine: the heads' acceptance by size times this machine's cost by size.

A bigger tree accepts more tokens per pass, but what a node costs depends on the machine (on a GPU almost
nothing, on a 2-core CPU a lot, and less in bf16 where the CPU accelerates it). So heads may ship a
`TreeProfile`: mean accepted tokens per pass of the default dynamic tree at each size, measured by offline
replay on prompts that are not the benchmark's (`benchmarks/tree_profile.py`). With this machine's measured
step latency (`trees.latency.machine_latency`), the default size is the one with the most tokens per second.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DynTreeError
from .latency import LatencyModel

PROFILE_FILE = "tree_profile.json"


@dataclass
class TreeProfile:
    """Mean accepted tokens per pass by tree size (root included) for one tree policy of one set of heads."""

    tokens_per_pass: dict[int, float]
    policy: dict  # the tree settings measured (`TreeConfig.settings()` without the size)
    note: dict = field(default_factory=dict)  # how and on what it was measured

    def __post_init__(self):
        if not self.tokens_per_pass or any(s < 1 or not t >= 1.0 for s, t in self.tokens_per_pass.items()):
            raise DynTreeError("a tree profile needs sizes >= 1 with at least 1 token per pass each")

    def matches(self, settings: dict) -> bool:
        """Whether `settings` (a TreeConfig's) describe the policy this profile measured, size aside."""
        return all(settings.get(key) == value for key, value in self.policy.items())

    def to_dict(self) -> dict:
        return {"format": "dyntree-tree-profile", "policy": self.policy,
                "tokens_per_pass": {str(s): t for s, t in sorted(self.tokens_per_pass.items())}, "note": self.note}

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TreeProfile":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            if data.get("format") != "dyntree-tree-profile":
                raise ValueError("not a dyntree tree profile")
            return cls({int(s): float(t) for s, t in data["tokens_per_pass"].items()}, dict(data["policy"]),
                       data.get("note", {}))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DynTreeError(f"cannot read tree profile {path}: {exc}".splitlines()[0]) from exc


def find_profile(heads_dir: str | os.PathLike | None) -> TreeProfile | None:
    """The profile shipped beside a heads directory, if any."""
    if heads_dir is None or not (Path(heads_dir) / PROFILE_FILE).is_file():
        return None
    return TreeProfile.load(Path(heads_dir) / PROFILE_FILE)


def best_fixed_size(profile: TreeProfile, latency: LatencyModel) -> int:
    """The profiled size with the most accepted tokens per second on this machine (the smaller on ties)."""
    return max(sorted(profile.tokens_per_pass), key=lambda s: profile.tokens_per_pass[s] / latency.cost(s))


def best_size_for_batch(profile: TreeProfile, plain_seconds: float, tree_seconds) -> int:
    """Nodes per sequence for a step of one batch size: 1 (plain decoding: one token per sequence in
    `plain_seconds`) or the profiled size with the most tokens per second, `tree_seconds(n)` being that batch
    size's measured cost of n nodes per sequence (ProPD's dynamic tree generation, across batch sizes)."""
    best, best_rate = 1, 1.0 / plain_seconds
    for size in sorted(profile.tokens_per_pass):
        rate = profile.tokens_per_pass[size] / tree_seconds(size)
        if rate > best_rate:
            best, best_rate = size, rate
    return best


def batch_sizer(choose, batches: list[int]):
    """`tree_size_for(batch size)` for the serving engine: `choose(b)` (nodes per sequence for b sequences,
    e.g. `DynTree.nodes_for_batch`) asked now for each of `batches`; a batch size between two of them uses
    the smaller one's choice (its cost per row is no lower), so the engine never waits for a measurement."""
    measured = sorted(set(int(b) for b in batches))
    choice = {b: choose(b) for b in measured}

    def tree_size_for(batch_size: int) -> int | None:
        below = [b for b in measured if b <= batch_size]
        return choice[below[-1] if below else measured[0]]
    tree_size_for.choices = dict(choice)
    return tree_size_for
