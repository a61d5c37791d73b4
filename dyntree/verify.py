"""Verification: which tree nodes to keep and which token follows them.

`verify_greedy` (temperature 0): the longest tree path that the backbone itself would have generated.
`verify_speculative` (sampling, lossless) and `verify_typical` (sampling, Medusa's typical acceptance) are
below; `verify_tree` picks one from a `SamplingConfig`. All return the same `Verification`.

Greedy: the walk starts at the root (always accepted, it was chosen by the previous step), takes the backbone's
argmax at the current node and moves to the child holding that token, if any. Siblings hold distinct tokens,
so at most one child matches. Only the nodes on the accepted path need the vocabulary projection: on a CPU a
row of lm_head costs about as much as several transformer layers, so it is never computed for the whole tree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .proposers import Proposal
from .sampling import Sampler, SamplingConfig, entropy, processed_probs, sample_from


@dataclass
class Verification:
    accepted_nodes: list[torch.Tensor]  # per sequence, node indices root-first; len = accepted_len
    next_tokens: torch.Tensor  # [B] the backbone's token after the last accepted node (next step's root)
    last_nodes: torch.Tensor  # [B] index of the last accepted node (its hidden state feeds the heads)

    @property
    def accepted_len(self) -> list[int]:
        return [int(a.numel()) for a in self.accepted_nodes]

    def rows(self, index: list[int]) -> "Verification":
        """The verification of rows `index` alone (what the proposer of those rows observes)."""
        rows = torch.tensor(index, dtype=torch.long, device=self.next_tokens.device)
        return Verification([self.accepted_nodes[b] for b in index], self.next_tokens[rows],
                            self.last_nodes[rows.to(self.last_nodes.device)])


def first_child_chain(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """`[B, D+1]` nodes of each tree's first-child chain from the root (-1 padded).

    Proposers list a node's most likely child first, so this is the path most likely to be accepted.
    """
    batch, n = parents.shape
    sentinel = n
    first_child = torch.full((batch, n + 1), sentinel, dtype=torch.long, device=parents.device)
    nodes = torch.arange(n, device=parents.device).expand(batch, n)
    first_child.scatter_reduce_(1, (parents + 1).clamp(min=0), nodes, reduce="amin")
    first_child = first_child[:, 1:]  # column c = first child of node c
    chain = [torch.zeros(batch, dtype=torch.long, device=parents.device)]
    for _ in range(max_depth):
        prev = chain[-1]
        nxt = torch.where(prev >= 0, first_child.gather(1, prev.clamp(min=0)[:, None])[:, 0], -1)
        chain.append(torch.where(nxt >= n, -1, nxt))
    return torch.stack(chain, 1)


def verify_greedy(logits_fn, hidden: torch.Tensor, proposal: Proposal, active: torch.Tensor | None = None) -> Verification:
    """Walk every tree of the batch from its root; `logits_fn` maps `[m, H]` states to `[m, V]` logits.

    The first-child chain is projected in one batched call up front (a few rows cost about one row with the
    prepacked kernels); nodes off that chain are projected lazily when the walk reaches them.
    """
    batch, n = proposal.tokens.shape
    device = hidden.device
    parents, tokens = proposal.buffers.parents, proposal.tokens
    max_depth = int(proposal.buffers.depths.max())
    choice = torch.full((batch, n), -1, dtype=torch.long, device=device)  # backbone's argmax at a node
    walking = torch.ones(batch, dtype=torch.bool, device=device) if active is None else active.clone()
    chain = first_child_chain(parents, max_depth)
    rows_b, rows_node = (chain >= 0).logical_and(walking[:, None]).nonzero(as_tuple=True)
    chain_nodes = chain[rows_b, rows_node]
    if chain_nodes.numel():
        choice[rows_b, chain_nodes] = logits_fn(hidden[rows_b, chain_nodes]).argmax(-1)
    current = torch.zeros(batch, dtype=torch.long, device=device)
    next_tokens = torch.zeros(batch, dtype=torch.long, device=device)
    paths: list[list[int]] = [[0] for _ in range(batch)]
    rows = torch.arange(batch, device=device)
    while bool(walking.any()):
        idx = rows[walking]
        best = choice[idx, current[idx]]
        missing = best < 0
        if bool(missing.any()):
            need = idx[missing]
            best[missing] = logits_fn(hidden[need, current[need]]).argmax(-1)
        next_tokens[idx] = best
        # The child of the current node whose token is the backbone's choice (at most one).
        match = (parents[idx] == current[idx, None]) & (tokens[idx] == best[:, None])
        found, child = match.max(dim=1)
        for b, ok, c in zip(idx.tolist(), found.tolist(), child.tolist()):
            if ok:
                paths[b].append(c)
                current[b] = c
            else:
                walking[b] = False
    accepted = [torch.tensor(p, dtype=torch.long, device=device) for p in paths]
    return Verification(accepted_nodes=accepted, next_tokens=next_tokens, last_nodes=current)


def verify_tree(logits_fn, hidden: torch.Tensor, proposal: Proposal, active: torch.Tensor | None = None,
                sampling: SamplingConfig | None = None, generator: torch.Generator | None = None) -> Verification:
    """Dispatch on the sampling settings: greedy (None or temperature 0), lossless or typical acceptance."""
    if sampling is None or sampling.is_greedy:
        return verify_greedy(logits_fn, hidden, proposal, active)
    if generator is None:
        raise ValueError("sampling needs a torch.Generator")
    if sampling.mode == "typical":
        return verify_typical(logits_fn, hidden, proposal, active, sampling, generator)
    return verify_speculative(logits_fn, hidden, proposal, active, sampling, generator)


def verify_rows(logits_fn, hidden: torch.Tensor, proposal: Proposal, sizes: list[int], samplers: list[Sampler],
                active: torch.Tensor) -> Verification:
    """Verify every active row under its own sampler (`sampling.Sampler`); `sizes` are the rows' own node counts
    (a batch's trees may be padded to its widest). Greedy rows are walked together on the whole batch (padding
    is never accepted and draws nothing). Rows that sample are verified per sampler: rows sharing one (a
    library run's batch) together, on their trees cut to their widest, so that a request's random draws do not
    depend on the trees of the rows beside it. Inactive rows get the root alone and token 0."""
    batch, n = proposal.tokens.shape
    device = hidden.device
    greedy = [s.greedy for s in samplers]
    groups: dict[int, tuple[Sampler, list[int]]] = {}
    for b, sampler in enumerate(samplers):
        if not greedy[b]:
            groups.setdefault(id(sampler), (sampler, []))[1].append(b)
    if not groups:  # the usual case: every row greedy
        return verify_greedy(logits_fn, hidden, proposal, active)
    if len(groups) == 1 and len(next(iter(groups.values()))[1]) == batch and max(sizes) == n:
        sampler = samplers[0]  # one run's rows, one generator
        return verify_tree(logits_fn, hidden, proposal, active, sampler.config, sampler.generator)
    accepted = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(batch)]
    next_tokens = torch.zeros(batch, dtype=torch.long, device=device)
    last_nodes = torch.zeros(batch, dtype=torch.long, device=device)
    parts = []  # (batch rows, their rows in the result, result)
    if any(greedy):
        walk = active & torch.tensor(greedy, device=active.device)
        index = [b for b in range(batch) if greedy[b]]
        parts.append((index, index, verify_greedy(logits_fn, hidden, proposal, walk)))
    for sampler, index in groups.values():
        width = max(sizes[b] for b in index)
        rows = torch.tensor(index, dtype=torch.long, device=device)
        result = verify_tree(logits_fn, hidden[rows, :width], proposal.rows(index, width),
                             active[rows.to(active.device)], sampler.config, sampler.generator)
        parts.append((index, range(len(index)), result))
    for index, at, result in parts:
        for b, r in zip(index, at):
            accepted[b] = result.accepted_nodes[r]
            next_tokens[b] = result.next_tokens[r]
            last_nodes[b] = result.last_nodes[r]
    return Verification(accepted, next_tokens, last_nodes)


def verify_speculative(logits_fn, hidden: torch.Tensor, proposal: Proposal, active: torch.Tensor | None,
                       sampling: SamplingConfig, generator: torch.Generator) -> Verification:
    """Lossless tree speculative sampling: the emitted tokens are distributed exactly as the model's samples.

    At the current node with the model's sampling distribution p, the children c1..cm are tried in node
    order. Candidates are deterministic (the heads' top-k, not draws), so each is a point-mass draft q = 1
    at its token, and recursive rejection sampling reads: accept c_j with probability min(1, r(c_j) / 1)
    where r is the residual p with c_1..c_{j-1} removed and renormalised; if all are rejected, the token is
    drawn from the final residual. Marginally, c_j is taken with probability p(c_j) and any other token x
    with probability (1 - sum_j p(c_j)) * p(x) / (1 - sum_j p(c_j)) = p(x): exactly p. After accepting a
    child, the walk repeats at that child, whose distribution is the model's given the accepted prefix, so
    the whole emitted sequence is distributed as plain sampling. Logits are computed only for visited nodes.
    """
    batch, n = proposal.tokens.shape
    device = hidden.device
    current = torch.zeros(batch, dtype=torch.long, device=device)
    walking = torch.ones(batch, dtype=torch.bool, device=device) if active is None else active.clone()
    next_tokens = torch.zeros(batch, dtype=torch.long, device=device)
    paths: list[list[int]] = [[0] for _ in range(batch)]
    parents, tokens = proposal.buffers.parents, proposal.tokens
    rows = torch.arange(batch, device=device)
    while bool(walking.any()):
        idx = rows[walking]
        probs = processed_probs(logits_fn(hidden[idx, current[idx]]), sampling)  # [w, V]
        accepted, residual = _rejection_over_siblings(probs, parents[idx] == current[idx, None], tokens[idx],
                                                      generator)
        found, child = accepted.max(dim=1)
        done = ~found
        if bool(done.any()):
            next_tokens[idx[done]] = sample_from(residual[done], generator)
            walking[idx[done]] = False
        current[idx[found]] = child[found]
        for b, c in zip(idx[found].tolist(), child[found].tolist()):
            paths[b].append(c)
    accepted = [torch.tensor(p, dtype=torch.long, device=device) for p in paths]
    return Verification(accepted_nodes=accepted, next_tokens=next_tokens, last_nodes=current)


def _rejection_over_siblings(probs: torch.Tensor, children: torch.Tensor, tokens: torch.Tensor,
                             generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Recursive rejection with point-mass drafts over the children of one node per row, all rows at once.

    probs `[w, V]` (the model at the node), children `[w, n]` (which tree nodes are its children, tried in
    node order), tokens `[w, n]`. Returns `accepted` `[w, n]` (True only at the accepted child, if any) and
    the final residual `[w, V]` (unnormalised; what the next token is drawn from where no child was accepted).
    """
    w, n = tokens.shape
    if not bool(children.any()):  # leaves only (or plain decoding): draw from p itself, no uniforms spent
        return children, probs
    node_p = torch.gather(probs, 1, tokens).double() * children
    # A token repeated among siblings has no residual mass left once its first copy is rejected.
    same = (tokens[:, :, None] == tokens[:, None, :]) & children[:, :, None] & children[:, None, :]
    repeated = same.tril(-1).any(2)
    node_p = node_p.masked_fill(repeated, 0.0)
    # Residual mass before trying sibling j: everything not yet removed by earlier rejections.
    mass_before = probs.double().sum(1, keepdim=True) - (node_p.cumsum(1) - node_p)
    u = torch.rand(w, n, generator=generator, device=probs.device, dtype=torch.float64)
    accept = children & (u * mass_before < node_p)  # u < r(c_j), r the renormalised residual
    first = accept & (accept.cumsum(1) == 1)
    removed = torch.zeros_like(probs).scatter_add_(1, tokens, children.to(probs.dtype))
    residual = probs.masked_fill(removed > 0, 0.0)
    empty = residual.sum(1) <= 0  # all mass sat on rejected candidates: only float rounding gets here
    residual[empty] = probs[empty]
    return first, residual


def verify_typical(logits_fn, hidden: torch.Tensor, proposal: Proposal, active: torch.Tensor | None,
                   sampling: SamplingConfig, generator: torch.Generator) -> Verification:
    """Medusa's typical acceptance: fast and plausible, but NOT the model's distribution.

    A node's token x is accepted when its parent is accepted and p(x) > min(eps, alpha * exp(-H(p))), with p
    the model's sampling distribution at the parent and H its entropy. The accepted nodes form a subtree;
    the deepest one wins (ties: the higher sum of log p along its path) and the next token is sampled from
    the model at it. Logits are computed level by level, batched, only for accepted nodes that have
    children (plus the chosen last node if it is a leaf).
    """
    batch, n = proposal.tokens.shape
    device = hidden.device
    parents, tokens, depths = proposal.buffers.parents, proposal.tokens, proposal.buffers.depths
    active = torch.ones(batch, dtype=torch.bool, device=device) if active is None else active
    accepted = torch.zeros(batch, n, dtype=torch.bool, device=device)
    accepted[:, 0] = active
    path_logp = torch.zeros(batch, n, dtype=torch.float64, device=device)
    node_ids = torch.arange(n, device=device)
    has_children = (parents[:, :, None] == node_ids[None, None, :]).any(1)  # [B, n]
    probs_at: dict[tuple[int, int], torch.Tensor] = {}
    frontier = accepted.clone()
    while True:
        b_idx, node_idx = (frontier & has_children).nonzero(as_tuple=True)
        if b_idx.numel() == 0:
            break
        probs = processed_probs(logits_fn(hidden[b_idx, node_idx]), sampling)  # [r, V]
        for r, (b, j) in enumerate(zip(b_idx.tolist(), node_idx.tolist())):
            probs_at[(b, j)] = probs[r]
        threshold = torch.minimum(torch.full_like(probs[:, 0], sampling.eps),
                                  sampling.alpha * torch.exp(-entropy(probs)))
        is_child = parents[b_idx] == node_idx[:, None]  # [r, n]
        child_p = torch.gather(probs, 1, tokens[b_idx])  # [r, n] p of every node's token under this parent
        ok = is_child & (child_p > threshold[:, None])
        r_idx, c_idx = ok.nonzero(as_tuple=True)
        frontier = torch.zeros_like(accepted)
        frontier[b_idx[r_idx], c_idx] = True
        accepted[b_idx[r_idx], c_idx] = True
        path_logp[b_idx[r_idx], c_idx] = path_logp[b_idx[r_idx], node_idx[r_idx]] + child_p[r_idx, c_idx].double().log()
    # Deepest accepted node, ties broken by path log-probability.
    deepest = torch.where(accepted, depths, torch.full_like(depths, -1)).amax(1, keepdim=True)
    candidates = accepted & (depths == deepest)
    last_nodes = torch.where(candidates, path_logp, torch.full_like(path_logp, float("-inf"))).argmax(1)
    last_nodes[~active] = 0
    need = [b for b in range(batch) if bool(active[b]) and (b, int(last_nodes[b])) not in probs_at]
    if need:
        nb = torch.tensor(need, device=device)
        fresh = processed_probs(logits_fn(hidden[nb, last_nodes[nb]]), sampling)
        for r, b in enumerate(need):
            probs_at[(b, int(last_nodes[b]))] = fresh[r]
    next_tokens = torch.zeros(batch, dtype=torch.long, device=device)
    live = [b for b in range(batch) if bool(active[b])]
    if live:
        stacked = torch.stack([probs_at[(b, int(last_nodes[b]))] for b in live])
        next_tokens[torch.tensor(live, device=device)] = sample_from(stacked, generator)
    paths = []
    for b in range(batch):
        on_path = proposal.buffers.tree_mask[b, last_nodes[b]].nonzero().squeeze(1)  # ancestors-or-self, in order
        paths.append(on_path if bool(active[b]) else torch.zeros(1, dtype=torch.long, device=device))
    return Verification(accepted_nodes=paths, next_tokens=next_tokens, last_nodes=last_nodes)
