"""Pictures of candidate trees: which tokens a step proposed, their scores, and which path was accepted.

`record_trees` decodes a prompt with a recording wrapper around the proposer (the decoding loop is
unchanged: the wrapper sees each proposal and, through the `observe` hook, its verification);
`render_tree` draws one step with matplotlib: depth runs left to right, siblings top to bottom in rank
order, node text is the token and its score, the accepted path is green and the backbone's own next token
(the next step's root) is the dashed box after it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import DynTreeError
from .proposers import Proposer


@dataclass
class TreeSnapshot:
    """One step's tree of one sequence, as plain Python values."""

    step: int
    tokens: list[int]
    texts: list[str]
    parents: list[int]
    scores: list[float] | None
    accepted: list[int]  # node indices, root first
    next_token_text: str
    method: str


class RecordingProposer(Proposer):
    """Wraps a proposer and keeps the proposals and verifications of chosen steps (1-based)."""

    def __init__(self, inner: Proposer, steps: set[int] | None = None):
        self.inner = inner
        self.steps = steps
        self.step = 0
        self.records: list[tuple[int, object, object]] = []
        self._pending = None
        self.name, self.uses_heads, self.topk = inner.name, inner.uses_heads, inner.topk
        self.uses_context = inner.uses_context

    @property
    def max_nodes(self) -> int:
        return self.inner.max_nodes

    def propose(self, root, head_ids, head_probs, context=None):
        self.step += 1
        proposal = self.inner.propose(root, head_ids, head_probs, context)
        self._pending = proposal if self.steps is None or self.step in self.steps else None
        return proposal

    def observe(self, proposal, verification, active=None):
        self.inner.observe(proposal, verification, active)
        if self._pending is proposal:
            self.records.append((self.step, proposal, verification))
            self._pending = None


def token_label(text: str, limit: int = 14, drawable=None) -> str:
    """Readable token text: visible spaces and newlines, characters the font lacks as code points, trimmed."""
    shown = text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "\u2423")
    if drawable is not None:
        shown = "".join(c if drawable(c) else f"U+{ord(c):04X}" for c in shown)
    return shown if len(shown) <= limit else shown[: limit - 1] + "\u2026"


def _font_check():
    """A predicate: can matplotlib's default font draw this character? (emoji in tokens are common)"""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    font = FT2Font(font_manager.findfont(font_manager.FontProperties()))
    return lambda c: font.get_char_index(ord(c)) != 0


def record_trees(dt, prompt, steps: list[int] | None, max_new_tokens: int = 64,
                 chat: bool | None = None) -> tuple[list[TreeSnapshot], str]:
    """Decode `prompt` with `dt` (a `DynTree`) and return the snapshots of `steps` and the generated text."""
    ids = dt.encode(prompt, chat)
    recorder = RecordingProposer(dt.proposer, set(steps) if steps else None)
    run = dt.decoder(recorder).run([ids], max_new_tokens).consume()
    tok = dt.tokenizer
    snapshots = []
    for step, proposal, verification in recorder.records:
        tokens = proposal.tokens[0].tolist()
        scores = proposal.scores[0].tolist() if proposal.scores is not None else None
        snapshots.append(TreeSnapshot(
            step=step, tokens=tokens, texts=[tok.decode([t]) for t in tokens],
            parents=proposal.buffers.parents[0].tolist(), scores=scores,
            accepted=verification.accepted_nodes[0].tolist(),
            next_token_text=tok.decode([int(verification.next_tokens[0])]), method=recorder.name))
    return snapshots, tok.decode(run.tokens[0], skip_special_tokens=True)


def _layout(parents: list[int]) -> tuple[list[int], list[float]]:
    """Depth and vertical slot of every node: leaves take consecutive slots, parents sit at their children's mean."""
    n = len(parents)
    children: list[list[int]] = [[] for _ in range(n)]
    depth = [0] * n
    for i in range(1, n):
        children[parents[i]].append(i)
        depth[i] = depth[parents[i]] + 1
    slot = [0.0] * n
    next_leaf = 0
    # Iterative post-order walk (children in node order = rank order within a depth).
    stack = [(0, False)]
    while stack:
        node, done = stack.pop()
        if done or not children[node]:
            if children[node]:
                slot[node] = sum(slot[c] for c in children[node]) / len(children[node])
            else:
                slot[node] = float(next_leaf)
                next_leaf += 1
            continue
        stack.append((node, True))
        stack.extend((c, False) for c in reversed(children[node]))
    return depth, slot


def render_tree(snapshot: TreeSnapshot, path: str | os.PathLike, title: str | None = None) -> Path:
    """Draw one tree to a PNG file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth, slot = _layout(snapshot.parents)
    drawable = _font_check()
    accepted = set(snapshot.accepted)
    leaves = max(slot) + 1 if slot else 1
    max_depth = max(depth) + 1  # +1 column for the next token
    fig, ax = plt.subplots(figsize=(2.3 * (max_depth + 1) + 1, 0.42 * leaves + 1.4))
    x = [2.3 * d for d in depth]
    y = [-s for s in slot]
    for i, p in enumerate(snapshot.parents):
        if p < 0:
            continue
        on_path = i in accepted and p in accepted
        ax.plot([x[p], x[i]], [y[p], y[i]], color="#2e7d32" if on_path else "#b0b7c3",
                linewidth=2.6 if on_path else 0.9, zorder=1)
    for i, text in enumerate(snapshot.texts):
        label = token_label(text, drawable=drawable)
        if snapshot.scores is not None and i > 0:
            label += f"  {snapshot.scores[i]:.2f}"
        if i == 0:
            face, edge = "#fff3c4", "#b8860b"
        elif i in accepted:
            face, edge = "#c8e6c9", "#2e7d32"
        else:
            face, edge = "#f4f6fa", "#8a94a6"
        ax.text(x[i], y[i], label, ha="center", va="center", fontsize=8.5, zorder=3,
                bbox=dict(boxstyle="round,pad=0.28", facecolor=face, edgecolor=edge,
                          linewidth=1.6 if i in accepted else 0.8))
    last = snapshot.accepted[-1]
    nx, ny = max(x) + 2.3, y[last]  # a column of its own, clear of deeper candidates
    ax.plot([x[last], nx], [y[last], ny], color="#2e7d32", linewidth=1.5, linestyle="--", zorder=1)
    ax.text(nx, ny, "next: " + token_label(snapshot.next_token_text, drawable=drawable), ha="center",
            va="center", fontsize=8.5, zorder=3,
            bbox=dict(boxstyle="round,pad=0.28", facecolor="white", edgecolor="#2e7d32", linestyle="--"))
    ax.set_xlim(-1.3, max(max(x), nx) + 1.3)
    ax.set_ylim(-(leaves - 1) - 0.8, 0.8)
    ax.axis("off")
    gained = len(snapshot.accepted)
    ax.set_title(title or (f"step {snapshot.step}: {len(snapshot.tokens)}-node tree ({snapshot.method}), "
                           f"{gained} token{'s' if gained != 1 else ''} gained this pass\n"
                           f"green: accepted path; dashed: the backbone's next token; numbers: path scores"),
                 fontsize=9)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return out


def parse_steps(text: str) -> list[int]:
    """'1,4,10' or '3-6' or a mix -> sorted positive step numbers."""
    steps: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                steps.update(range(lo, hi + 1))
            elif part:
                steps.add(int(part))
    except ValueError:
        raise DynTreeError(f"--steps must be step numbers like '1,5,10' or '2-4', got {text!r}") from None
    if not steps or min(steps) < 1:
        raise DynTreeError(f"--steps must list step numbers >= 1, got {text!r}")
    return sorted(steps)


def pick_sequence(snapshots: list[TreeSnapshot]) -> TreeSnapshot | None:
    """The snapshot with the longest accepted path (a good picture)."""
    return max(snapshots, key=lambda s: (len(s.accepted), -s.step), default=None)


__all__ = ["TreeSnapshot", "RecordingProposer", "record_trees", "render_tree", "parse_steps", "pick_sequence",
           "token_label"]
