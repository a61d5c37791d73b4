"""Acceptance statistics: how often the model accepted a dynamic tree's node, per head depth and rank or
probability bin. Dynamic trees score nodes with these measured rates instead of the heads' over-confident
probabilities (`TreeConfig.score` "rank" / "binned"); `dyntree calibrate` saves a table to start from.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import SCORE_MODES
from ..errors import DynTreeError


@dataclass
class AcceptanceStats:
    """How often a node was accepted given that its parent was, per head depth and per rank / probability bin.

    Raw head probabilities are over-confident; these counts turn them into measured acceptance rates. They
    are collected online from each step's verification (`observe`) or loaded from a file collected on
    other prompts. A factor is shrunk towards the raw marginal while counts are few:
    `(accepted + c * p) / (proposed + c)`, so an empty table means raw probabilities.
    """

    num_heads: int
    topk: int
    bins: int = 10
    prior_strength: float = 8.0
    proposed_rank: torch.Tensor = field(default=None)  # [K, m]
    accepted_rank: torch.Tensor = field(default=None)
    proposed_bin: torch.Tensor = field(default=None)  # [K, bins]
    accepted_bin: torch.Tensor = field(default=None)

    def __post_init__(self):
        for name, width in (("proposed_rank", self.topk), ("accepted_rank", self.topk),
                            ("proposed_bin", self.bins), ("accepted_bin", self.bins)):
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros(self.num_heads, width, dtype=torch.float64))

    def bin_of(self, probs: torch.Tensor) -> torch.Tensor:
        return (probs * self.bins).long().clamp(0, self.bins - 1)

    def factors(self, probs: torch.Tensor, mode: str) -> torch.Tensor:
        """Per-node factors `[B, K, m]` for marginals `probs` `[B, K, m]` under a score mode."""
        if mode == "prob":
            return probs
        k, m = probs.shape[1], probs.shape[2]
        c = self.prior_strength
        if mode == "rank":
            acc = self.accepted_rank[:k, :m].to(probs.device)
            prop = self.proposed_rank[:k, :m].to(probs.device)
            return ((acc + c * probs) / (prop + c)).clamp(0.0, 1.0)
        if mode == "binned":
            bins = self.bin_of(probs)  # [B, K, m]
            heads = torch.arange(k, device=probs.device)[None, :, None].expand_as(bins)
            acc = self.accepted_bin.to(probs.device)[heads, bins]
            prop = self.proposed_bin.to(probs.device)[heads, bins]
            return ((acc + c * probs) / (prop + c)).clamp(0.0, 1.0)
        raise DynTreeError(f"unknown tree score {mode!r}: choose from {', '.join(SCORE_MODES)}")

    def record(self, heads: list[int], ranks: list[int], probs: list[float], accepted: list[bool]) -> None:
        """Count nodes whose parent was accepted: their head (depth - 1), rank, probability and outcome."""
        keep = [i for i, h in enumerate(heads) if h < self.num_heads]
        if not keep:
            return
        head_t = torch.tensor([heads[i] for i in keep])
        rank_t = torch.tensor([ranks[i] for i in keep])
        bin_t = torch.tensor([min(max(int(probs[i] * self.bins), 0), self.bins - 1) for i in keep])
        ones = torch.ones(len(keep), dtype=torch.float64)
        hits = torch.tensor([float(accepted[i]) for i in keep], dtype=torch.float64)
        in_range = rank_t < self.topk
        self.proposed_rank.index_put_((head_t[in_range], rank_t[in_range]), ones[in_range], accumulate=True)
        self.accepted_rank.index_put_((head_t[in_range], rank_t[in_range]), hits[in_range], accumulate=True)
        self.proposed_bin.index_put_((head_t, bin_t), ones, accumulate=True)
        self.accepted_bin.index_put_((head_t, bin_t), hits, accumulate=True)

    def record_tree(self, parents: list[int], ranks: list[int], node_probs: list[float], accepted: set[int]) -> None:
        """Count one verified tree (node 0 = root): every head node whose parent was accepted is one trial.
        Nodes with rank -1 (copied from the context, not guessed by a head) are not the heads' to count."""
        depth = [0] * len(parents)
        heads, seen_ranks, seen_probs, hits = [], [], [], []
        for i in range(1, len(parents)):
            depth[i] = depth[parents[i]] + 1
            if parents[i] in accepted and ranks[i] >= 0:
                heads.append(depth[i] - 1)
                seen_ranks.append(ranks[i])
                seen_probs.append(node_probs[i])
                hits.append(i in accepted)
        self.record(heads, seen_ranks, seen_probs, hits)

    def rates(self, which: str = "rank") -> torch.Tensor:
        acc = self.accepted_rank if which == "rank" else self.accepted_bin
        prop = self.proposed_rank if which == "rank" else self.proposed_bin
        return torch.where(prop > 0, acc / prop.clamp_min(1), torch.full_like(acc, float("nan")))

    # -- persistence ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": "dyntree-acceptance", "num_heads": self.num_heads, "topk": self.topk,
                "bins": self.bins, "prior_strength": self.prior_strength,
                **{k: getattr(self, k).tolist() for k in ("proposed_rank", "accepted_rank", "proposed_bin",
                                                           "accepted_bin")}}

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict()) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "AcceptanceStats":
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text())
            if data.get("format") != "dyntree-acceptance":
                raise ValueError("not a dyntree acceptance-statistics file")
            stats = cls(int(data["num_heads"]), int(data["topk"]), int(data["bins"]), float(data["prior_strength"]),
                        *(torch.tensor(data[k], dtype=torch.float64) for k in
                          ("proposed_rank", "accepted_rank", "proposed_bin", "accepted_bin")))
            if stats.proposed_rank.shape != (stats.num_heads, stats.topk) or \
                    stats.proposed_bin.shape != (stats.num_heads, stats.bins):
                raise ValueError("table shapes do not match num_heads/topk/bins")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DynTreeError(f"cannot read acceptance statistics {path}: {exc}".splitlines()[0]) from exc
        return stats

    def resized(self, num_heads: int, topk: int) -> "AcceptanceStats":
        """A copy covering `num_heads` x `topk` (new cells start empty, extra ones are dropped)."""
        out = AcceptanceStats(num_heads, topk, self.bins, self.prior_strength)
        k, m = min(num_heads, self.num_heads), min(topk, self.topk)
        out.proposed_rank[:k, :m] = self.proposed_rank[:k, :m]
        out.accepted_rank[:k, :m] = self.accepted_rank[:k, :m]
        out.proposed_bin[:k] = self.proposed_bin[:k]
        out.accepted_bin[:k] = self.accepted_bin[:k]
        return out
