"""Offline replay: accepted tokens per pass of any proposer on recorded greedy continuations.

Greedy verification only compares the tree with the model's own continuation, so once a continuation and
the heads' top-k guesses at every position are recorded (`benchmarks/record_continuations.py`), a proposer's
accepted lengths can be computed exactly without running the backbone: at a step whose root is token j of
the sequence, the heads read the state that predicted token j; a node at depth d is accepted when it and all
its ancestors equal tokens j+1..j+d; the pass emits `1 + deepest accepted depth` tokens and the next root
is the token after them. This is the same walk `verify_greedy` does, on recorded data: sweeps over tree
sizes, scores and calibrations take seconds instead of hours of CPU decoding.

A record is a dict with `tokens` (prompt + response ids), `prompt_len`, `head_ids` and `head_probs`
(`[response_len, K, m]`: row k holds the guesses made from the state that predicted response token k).
Path-conditional heads guess from the path as well, so their records hold the states instead (`hidden`,
`[response_len, H]`) and `replay` evaluates the heads on the recorded state at every step (`heads`, and the
backbone for its embeddings and lm_head). Heads that read the context (eagle) need the state of every
position, prompt included (`states`, added by `with_states`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..heads import TopkDraft
from ..proposers import propose_step
from ..verify import Verification


@dataclass
class ReplayResult:
    accepted_lengths: list[int]  # tokens emitted by each decoding pass (the prefill's token not counted)
    tree_sizes: list[int]  # nodes verified by each pass

    @property
    def mean_accepted(self) -> float:
        return sum(self.accepted_lengths) / max(len(self.accepted_lengths), 1)


def accepted_nodes(tokens: list[int], parents: list[int], depths: list[int], truth: list[int]) -> list[int]:
    """Root-first node indices of the longest accepted path (parents precede children; truth[d-1] is the
    continuation token at depth d, -1 where unknown)."""
    ok = [True] + [False] * (len(tokens) - 1)
    best = 0
    for i in range(1, len(tokens)):
        d = depths[i]
        if ok[parents[i]] and d <= len(truth) and tokens[i] == truth[d - 1]:
            ok[i] = True
            if d > depths[best]:
                best = i
    path = [best]
    while path[-1] != 0:
        path.append(parents[path[-1]])
    return path[::-1]


def replay(proposer, record: dict, max_new_tokens: int | None = None, heads=None, backbone=None) -> ReplayResult:
    """Decode one recorded sequence with `proposer` (greedy) and return what each pass accepted.

    Proposers that learn (`observe`) learn exactly as they would while decoding; proposers that read the
    context (`uses_context`) see the prompt and everything emitted so far.
    """
    tokens = list(record["tokens"])
    start = int(record["prompt_len"])
    end = len(tokens) if max_new_tokens is None else min(len(tokens), start + max_new_tokens)
    if heads is not None and record.get("states") is not None:  # the drafts of every step, from every state
        drafts = heads.draft_along(backbone, record["states"].float(), torch.tensor(tokens), start, proposer.topk)
    elif heads is not None:  # the states before the response's tokens (Medusa heads: all guesses at once)
        if heads.config.head_type == "eagle":
            raise ValueError("eagle heads read the context: replay them on records with `states` (with_states)")
        roots = torch.tensor(tokens[start : start + len(record["hidden"])])
        drafts = heads.draft(backbone, record["hidden"].float(), roots, proposer.topk)
    else:
        drafts = TopkDraft(record["head_ids"].long(), record["head_probs"])
    lengths, sizes = [], []
    j = start  # index of the current root (the prefill emitted it)
    while j < end - 1:
        root = torch.tensor([tokens[j]])
        k = j - start
        proposal = propose_step(proposer, root, drafts.rows(k, k + 1), lambda: [tokens[: j + 1]])
        node_tokens = proposal.tokens[0].tolist()
        parents = proposal.buffers.parents[0].tolist()
        depths = proposal.buffers.depths[0].tolist()
        truth = tokens[j + 1 : end]
        path = accepted_nodes(node_tokens, parents, depths, truth)
        accepted = min(len(path), end - 1 - j)
        verification = Verification([torch.tensor(path)], torch.tensor([tokens[min(j + len(path), end - 1)]]),
                                    torch.tensor([path[-1]]))
        proposer.observe(proposal, verification, torch.tensor([True]))
        lengths.append(accepted)
        sizes.append(len(node_tokens))
        j += accepted
    return ReplayResult(lengths, sizes)


@torch.inference_mode()
def with_states(records: list[dict], backbone) -> list[dict]:
    """Add each record's `states` `[L-1, H]` (the backbone's state after every token but the last, one
    teacher-forced forward) and `hidden` (its rows from the prompt's last token on), in the backbone's own
    weights: what replaying or scoring heads needs; heads that read the context need `states`."""
    for rec in records:
        seq = torch.tensor([rec["tokens"]])
        cache = backbone.new_cache(1, seq.shape[1] + 1)
        rec["states"] = backbone.forward(seq, cache)[0, :-1].float()
        rec["hidden"] = rec["states"][rec["prompt_len"] - 1 :]
    return records


def replay_many(make_proposer, records: list[dict], max_new_tokens: int | None = None, heads=None,
                backbone=None) -> ReplayResult:
    """Replay every record with one proposer (so online learning carries over between prompts, as in a
    server) and pool the passes."""
    proposer = make_proposer()
    lengths, sizes = [], []
    for record in records:
        result = replay(proposer, record, max_new_tokens, heads, backbone)
        lengths += result.accepted_lengths
        sizes += result.tree_sizes
    return ReplayResult(lengths, sizes)
