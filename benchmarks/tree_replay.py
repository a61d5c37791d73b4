"""Replay tree policies on recorded greedy continuations: accepted tokens per pass, in seconds.

  python benchmarks/record_continuations.py --set mtbench --out /work/replay/mtbench.pt
  python benchmarks/record_continuations.py --set calib --gsm8k-file ../shared/data/gsm8k_train_questions.jsonl \
      --out /work/replay/calib.pt
  python benchmarks/tree_replay.py --records /work/replay/mtbench.pt --calib /work/replay/calib.pt \
      --methods static:8,dynamic:8,dynamic:8:binned,dynamic:8:prob:lookup6

Methods: `static:N` (the first N-1 paths of Medusa's mc_sim_7b_63, top-10), `cstatic:N` (the best fixed
tree for the calibration set's rates), `dynamic:N[:SCORE][:lookupL][:kK][:ngA-B][:TX][:binsB][:smerge]`
(SCORE prob|rank|binned, calibrated scores start from the calibration set and keep learning online; lookupL:
a lookup chain of up to L tokens, default none here; kK: top-K per head, default 8; ngA-B: lookup n-gram
range; TX: tree temperature, default the proposer's; binsB: calibration bins; smerge: the score merge;
recycleR: up to R recycled candidates from the proposer's successor table, default none).
Acceptance only: no timing.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dyntree.eval.replay import replay_many
from dyntree.proposers import DynamicTreeProposer, StaticTreeProposer
from dyntree.trees import StaticTree, load_tree_spec
from dyntree.trees.acceptance import AcceptanceStats
from dyntree.trees.selection import static_paths_from_stats

NUM_HEADS = 4


def parse(name: str, calib: AcceptanceStats | None):
    parts = name.split(":")
    kind, size = parts[0], int(parts[1])
    if kind == "static":
        _, paths = load_tree_spec("mc_sim_7b_63")
        return lambda: StaticTreeProposer(StaticTree.build(paths[: size - 1], 10, NUM_HEADS, f"mc{size}"))
    if kind == "cstatic":
        paths = static_paths_from_stats(calib[10].resized(NUM_HEADS, 10), size)
        return lambda: StaticTreeProposer(StaticTree.build(paths, 10, NUM_HEADS, f"cal{size}"))
    score, lookup, topk, ngram, merge, temperature, bins, recycle = "prob", 0, 8, (3, 2), "first", None, 10, 0
    for p in parts[2:]:
        if p in ("prob", "rank", "binned"):
            score = p
        elif p.startswith("recycle"):
            recycle = int(p[7:])
        elif p.startswith("lookup"):
            lookup = int(p[6:])
        elif p.startswith("k"):
            topk = int(p[1:])
        elif p.startswith("T"):
            temperature = float(p[1:])
        elif p.startswith("bins"):
            bins = int(p[4:])
        elif p == "smerge":
            merge = "score"
        elif p.startswith("ng"):
            a, b = p[2:].split("-")
            ngram = (int(a), int(b))
    def make():
        cal = None if score == "prob" else calib[bins].resized(NUM_HEADS, topk)
        return DynamicTreeProposer(NUM_HEADS, topk=topk, size=size, score=score, calibration=cal, lookup=lookup,
                                   lookup_ngram=ngram, lookup_merge=merge, tree_temperature=temperature,
                                   recycle=recycle)
    return make


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", required=True)
    ap.add_argument("--calib", default=None)
    ap.add_argument("--methods", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    data = torch.load(args.records)
    records = data["records"]
    calib = None
    if args.calib:
        from dyntree.eval.replay import replay

        cal = torch.load(args.calib)
        calib = {}
        for bins in (10, 20):  # heads only, temperature 1: the bins calibrated scores read
            proposer = DynamicTreeProposer(NUM_HEADS, topk=10, size=32, score="prob", learn=True, lookup=0,
                                           tree_temperature=1.0,
                                           calibration=AcceptanceStats(NUM_HEADS, 10, bins=bins))
            for r in cal["records"]:
                replay(proposer, r)
            calib[bins] = proposer.stats
    results = {}
    print("| method | acc/pass | passes | mean nodes | s |")
    print("|---|---|---|---|---|")
    for name in args.methods.split(","):
        start = time.time()
        res = replay_many(parse(name, calib), records, args.max_new_tokens)
        results[name] = {"mean_accepted": res.mean_accepted, "passes": len(res.accepted_lengths),
                         "mean_nodes": sum(res.tree_sizes) / len(res.tree_sizes)}
        print(f"| {name} | {res.mean_accepted:.3f} | {len(res.accepted_lengths)} | "
              f"{results[name]['mean_nodes']:.1f} | {time.time() - start:.1f} |", flush=True)
    if args.out:
        json.dump(results, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
