"""Choose ProPD's early-prune layer and top-k by measurement: replay MT-Bench prompts with dynamic trees of
several sizes and, on every step's tree, run the unpruned pass and one pruned pass per (LAYER, K).

  python benchmarks/early_prune_sweep.py --prompts mtbench --per-category 3 --max-new-tokens 128 \
      --sizes 8,16,32 --prune 4:4,4:8,8:4,8:8,8:16,15:8,15:16 --out early-prune-sweep.json

Decoding follows the unpruned tree (greedy), so every configuration is measured on the very same trees. The
early head is the logit lens, or the trained one found beside the heads for its layer (`dyntree train
--early-layer L --out HEADS_DIR`; `--lens-only` ignores it). Per step: the pruned passes (each timed: layers [0, l), the early head, layers [l, L) on the survivors, then
verification of the survivors), then the unpruned pass (timed, then verified), whose result is committed.
The unpruned pass runs last so the cache always holds its keys and values; that order can only flatter the
unpruned pass (warmer caches), so the savings reported are, if anything, low. Per configuration it reports
nodes pruned, accepted tokens per pass with and without pruning (the difference: tokens lost), forward ms
of both (the difference: ms saved, early head included), and the speedup they predict:
(tokens per pass pruned / unpruned) x (step ms unpruned / pruned). `exact` is the share of passes whose
survivors' hidden states were bit-identical to the unpruned pass's (1.0 on this project's CPU kernels).

Timings mean something only on an otherwise idle machine; `--limit 2 --max-new-tokens 16` is a smoke test.
Batch 1 only.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from dyntree.api import DynTree
from dyntree.prompts import load_prompts
from dyntree.step import forward_tree, prefill, propose
from dyntree.early import EarlyPruner, build_pruner
from dyntree.errors import DynTreeError
from dyntree.verify import verify_tree


def parse_pairs(text: str) -> list[tuple[int, int]]:
    from dyntree.config import parse_early_prune

    pairs = [parse_early_prune(p) for p in text.split(",") if p.strip()]
    if not pairs or None in pairs:
        raise DynTreeError("--prune needs LAYER:K pairs, e.g. 4:8,8:8")
    return pairs


class Tally:
    """Running sums for one (size, layer, k): per pass, per sequence (batch 1)."""

    def __init__(self):
        self.passes = self.nodes = self.pruned = self.accepted_full = self.accepted = self.exact = 0
        self.forward_full = self.forward = self.step_full = self.step = self.overhead = 0.0

    def row(self) -> dict:
        p = max(self.passes, 1)
        step_full, step = self.step_full / p, self.step / p
        acc_full, acc = self.accepted_full / p, self.accepted / p
        return {"passes": self.passes, "nodes_per_pass": self.nodes / p, "pruned_per_pass": self.pruned / p,
                "accepted_per_pass_unpruned": acc_full, "accepted_per_pass": acc,
                "lost_tokens_per_pass": acc_full - acc,
                "forward_ms_unpruned": 1000 * self.forward_full / p, "forward_ms": 1000 * self.forward / p,
                "saved_ms_per_pass": 1000 * (self.forward_full - self.forward) / p,
                "early_head_ms": 1000 * self.overhead / p,
                "step_ms_unpruned": 1000 * step_full, "step_ms": 1000 * step,
                "predicted_speedup": (acc / acc_full) * (step_full / step) if acc_full and step else None,
                "exact_share": self.exact / p}


def replay(dt: DynTree, prompt_ids: list[int], max_new: int, pruners: list[EarlyPruner],
           tallies: dict | None) -> list[int]:
    """Greedy decoding of one prompt along the unpruned trees, every pruner measured on each step's tree."""
    backbone, heads, proposer = dt.model.backbone, dt.heads, dt.proposer
    device = backbone.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def now() -> float:
        sync()
        return time.perf_counter()

    eos = set(dt.model.config.eos_token_ids)
    active = torch.ones(1, dtype=torch.bool, device=device)
    cache = backbone.new_cache(1, len(prompt_ids) + max_new + proposer.max_nodes + 1)
    last_hidden = prefill(backbone, cache, [prompt_ids])
    root = backbone.logits(last_hidden).argmax(-1)
    out = [int(root[0])]
    while len(out) < max_new and out[-1] not in eos:
        start = now()
        proposal = propose(heads, proposer, backbone, last_hidden, root, lambda: [prompt_ids + out])
        propose_seconds = now() - start
        if int(cache.lengths[0]) + proposal.tokens.shape[1] > cache.max_len:
            break
        measured = []
        for pruner in pruners:
            stats = pruner.new_stats()
            start = now()
            pruned = pruner.forward(backbone, proposal, cache, stats)
            mid = now()
            result = verify_tree(backbone.logits, pruned.hidden, pruned.proposal, active)
            measured.append((pruner, stats, pruned, mid - start, now() - mid, result.accepted_len[0]))
        start = now()
        hidden = forward_tree(backbone, proposal, cache)
        mid = now()
        result = verify_tree(backbone.logits, hidden, proposal, active)
        forward_full, verify_full = mid - start, now() - mid
        accepted_full = result.accepted_len[0]
        if tallies is not None:
            for pruner, stats, pruned, forward, verify, accepted in measured:
                t = tallies[(pruner.layer, pruner.k)]
                t.passes += 1
                t.nodes += proposal.tokens.shape[1]
                t.pruned += stats.pruned
                t.accepted_full += accepted_full
                t.accepted += accepted
                t.exact += int(torch.equal(pruned.hidden[0], hidden[0, pruned.index[0]]))
                t.forward_full += forward_full
                t.forward += forward
                t.overhead += stats.overhead_seconds
                t.step_full += propose_seconds + forward_full + verify_full
                t.step += propose_seconds + forward + verify
        proposer.observe(proposal, result, active)
        nodes = result.accepted_nodes[0]
        cache.commit(0, cache.lengths[0] + nodes)
        new = proposal.tokens[0, nodes[1:]].tolist() + [int(result.next_tokens[0])]
        for token in new:
            if len(out) >= max_new or out[-1] in eos:
                break
            out.append(token)
        last_hidden = hidden[:, result.last_nodes[0]]
        root = result.next_tokens
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--heads", default="auto")
    ap.add_argument("--prompts", default="mtbench", help="'mtbench' (packaged), 'builtin' or a JSONL file")
    ap.add_argument("--per-category", type=int, default=3, help="first N prompts of every category (MT-Bench is "
                                                                    "sorted by category)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--sizes", default="8,16,32", help="dynamic tree sizes (root included)")
    ap.add_argument("--prune", default="4:4,4:8,8:4,8:8,8:16,15:8,15:16", help="LAYER:K pairs")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--lens-only", action="store_true",
                    help="rank with the logit lens even where the heads directory holds a trained early head for "
                         "the layer (`dyntree train --early-layer L --out HEADS_DIR`)")
    ap.add_argument("--out", default=None, help="JSON file for the figures")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        pairs = parse_pairs(args.prune)
        sizes = [int(s) for s in args.sizes.split(",")]
        prompts = load_prompts(args.prompts, args.limit, args.per_category)
        base = DynTree.from_pretrained(args.model, heads=args.heads, tree="dynamic", tree_size=sizes[0],
                                       device=args.device, dtype=args.dtype)
        if base.heads is None:
            raise DynTreeError(f"the sweep needs heads ({base.heads_note})")
        backbone = base.model.backbone
        early_head = None if args.lens_only else base.early_head
        pruners = [build_pruner(pair, backbone, base.heads, early_head=early_head) for pair in pairs]
    except DynTreeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ids = [base.encode(p.turns[0]) for p in prompts]
    with torch.inference_mode():
        replay(base, ids[0], 16, pruners, None)  # warm-up: allocators, kernels, the oneDNN caches
        rows = []
        for size in sizes:
            dt = base.with_tree(tree_size=size)
            tallies = {(p.layer, p.k): Tally() for p in pruners}
            kinds = {(p.layer, p.k): p.head.kind for p in pruners}
            for i, prompt in enumerate(ids):
                replay(dt, prompt, args.max_new_tokens, pruners, tallies)
                print(f"size {size}: prompt {i + 1}/{len(ids)}", file=sys.stderr, flush=True)
            for (layer, k), tally in tallies.items():
                rows.append({"size": size, "layer": layer, "k": k, "head": kinds[(layer, k)], **tally.row()})
    print("| size | prune | head | pruned/pass | acc/pass unpruned | acc/pass | lost/pass | fwd ms unpruned | fwd ms | "
          "saved ms | predicted speedup | exact |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        speedup = f"{r['predicted_speedup']:.3f}" if r["predicted_speedup"] is not None else "n/a"
        print(f"| {r['size']} | {r['layer']}:{r['k']} | {r['head']} | {r['pruned_per_pass']:.2f} | "
              f"{r['accepted_per_pass_unpruned']:.3f} | {r['accepted_per_pass']:.3f} | "
              f"{r['lost_tokens_per_pass']:.3f} | {r['forward_ms_unpruned']:.2f} | {r['forward_ms']:.2f} | "
              f"{r['saved_ms_per_pass']:.2f} | {speedup} | {r['exact_share']:.2f} |")
    if args.out:
        env = {"device": str(backbone.device), "dtype": str(backbone.dtype).removeprefix("torch."),
               "threads": torch.get_num_threads(), "torch": torch.__version__, "platform": platform.platform(),
               "layers": backbone.config.num_layers, "heads": base.heads_note,
               "early_vocab": pruners[0].head.vocab}
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        Path(args.out).write_text(json.dumps({"settings": settings, "environment": env, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
