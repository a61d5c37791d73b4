"""Static vs dynamic trees on MT-Bench first turns: accepted tokens per pass, tokens/s, tree-building share.

Not a test: a measurement that writes its numbers (JSON + a markdown table). Methods are interleaved per
prompt so that slow phases of a shared CPU hit every method alike. Every method's output is compared with
plain greedy decoding (`ar`), which must be identical.

Method names:
  ar                       plain greedy decoding (no heads)
  static                   Medusa's 63-node tree (mc_sim_7b_63), top-10
  static:N                 the first N-1 paths of mc_sim_7b_63 (Medusa's own order; every prefix is a tree)
  cstatic:N                a static tree of N nodes built from acceptance rates measured on calibration prompts
  dynamic:N[:K[:SCORE[:raw]]]  dynamic tree of N nodes from the top-K of each head; SCORE prob|rank|binned
                           (rank/binned start from the calibration statistics and keep learning online);
                           raw: head probabilities without renormalising over the top-K
  dynamic:autoN[:K[:SCORE]]  tree size chosen every step (at most N nodes) from the expected accepted
                           tokens and this machine's step latency, measured once at start-up

Prompts are the MT-Bench questions shipped with dyntree. Methods that need acceptance statistics (cstatic,
dynamic with a SCORE) collect them on self-instruct seed tasks named by --calib-source, or read --calib-file.

Example:
  PYTHONPATH=$PWD python benchmarks/dynamic_trees.py --heads /work/interim-heads --prompts 10 \
      --max-new-tokens 96 --methods ar,static,static:16,dynamic:16 --out docs/dynamic-trees.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from dyntree.api import DynTree
from dyntree.config import DEFAULT_STATIC_TREE, TreeConfig
from dyntree.prompts import load_prompts, mt_bench_first_turns
from dyntree.errors import DynTreeError
from dyntree.eval.calibration import collect_acceptance_stats
from dyntree.proposers import DynamicTreeProposer, RootOnlyProposer, StaticTreeProposer, build_proposer
from dyntree.trees import StaticTree, load_tree_spec
from dyntree.trees.acceptance import AcceptanceStats
from dyntree.trees.latency import measure_latency
from dyntree.trees.selection import static_paths_from_stats


class TimedProposer:
    """Wraps a proposer and accumulates the seconds spent building trees (propose + observe)."""

    def __init__(self, inner):
        self.inner = inner
        self.seconds = 0.0
        self.calls = 0
        for attr in ("name", "uses_heads", "topk", "max_nodes", "tree"):
            if hasattr(inner, attr):
                setattr(self, attr, getattr(inner, attr))
        if hasattr(inner, "observe"):
            self.observe = self._observe

    def propose(self, root, head_ids, head_probs):
        start = time.perf_counter()
        out = self.inner.propose(root, head_ids, head_probs)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out

    def _observe(self, proposal, verification, active=None):
        start = time.perf_counter()
        self.inner.observe(proposal, verification, active)
        self.seconds += time.perf_counter() - start


def mt_bench_prompts(count: int, every: int = 1) -> list[str]:
    """First turns of every `every`-th MT-Bench question (the file is sorted by category, 10 per category)."""
    return mt_bench_first_turns()[::every][:count]


def calibration_prompts(source: str, count: int) -> list[str]:
    """Non-benchmark prompts (self-instruct seed tasks, JSONL) for collecting acceptance statistics."""
    return [p.turns[0] for p in load_prompts(source, limit=count)]  # instruction + its first input


def make_proposer(name: str, dt: DynTree, stats: AcceptanceStats | None, default_topk: int, latency=None):
    parts = name.split(":")
    kind = parts[0]
    if kind == "ar":
        return RootOnlyProposer()
    if kind == "static" and len(parts) == 1:
        return build_proposer(TreeConfig.parse("static"), dt.heads.num_heads)
    if kind == "static":
        size = int(parts[1])
        _, paths = load_tree_spec(DEFAULT_STATIC_TREE)
        return StaticTreeProposer(StaticTree.build(paths[: size - 1], 10, dt.heads.num_heads, f"mc{size}"))
    if kind == "cstatic":
        size = int(parts[1])
        topk = int(parts[2]) if len(parts) > 2 else default_topk
        paths = static_paths_from_stats(stats.resized(dt.heads.num_heads, topk), size)
        return StaticTreeProposer(StaticTree.build(paths, topk, dt.heads.num_heads, f"cal{size}"))
    if kind == "dynamic":
        auto = parts[1].startswith("auto")
        size = int(parts[1][4:] or 32) if auto else int(parts[1])
        topk = int(parts[2]) if len(parts) > 2 else default_topk
        score = parts[3] if len(parts) > 3 else "prob"
        renormalize = not (len(parts) > 4 and parts[4] == "raw")  # "raw": no renormalisation over the top-k
        # Each calibrated proposer learns online from its own copy of the calibration statistics.
        calibration = None if score == "prob" else stats.resized(dt.heads.num_heads, topk)
        return DynamicTreeProposer(dt.heads.num_heads, topk=topk, size=size, score=score, calibration=calibration,
                                   renormalize=renormalize, latency=latency if auto else None, lookup=0)
    raise DynTreeError(f"unknown method {name!r}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--heads", required=True)
    ap.add_argument("--prompts", type=int, default=10, help="MT-Bench first turns (from the start of the file)")
    ap.add_argument("--skip", type=int, default=0, help="skip this many MT-Bench questions first")
    ap.add_argument("--every", type=int, default=1, help="take every N-th MT-Bench question (5: 2 per category)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--methods", default="ar,static,static:16,dynamic:16")
    ap.add_argument("--topk", type=int, default=8, help="default top-k for dynamic/cstatic methods")
    ap.add_argument("--calib-prompts", type=int, default=8, help="self-instruct prompts for acceptance statistics")
    ap.add_argument("--calib-file", default=None, help="reuse/save acceptance statistics here")
    ap.add_argument("--calib-source", default=None, metavar="FILE",
                    help="self-instruct seed tasks (JSONL) to collect them on when --calib-file does not exist yet, "
                         "e.g. ../shared/data/self_instruct_seed_tasks.jsonl")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", required=True, help="JSON results file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    dt = DynTree.from_pretrained(args.model, heads=args.heads, tree="ar")
    methods = args.methods.split(",")
    stats = None
    if any(m.startswith("cstatic") or (m.startswith("dynamic") and len(m.split(":")) > 3) for m in methods):
        calib = Path(args.calib_file) if args.calib_file else Path(args.out).with_suffix(".calibration.json")
        if calib.is_file():
            stats = AcceptanceStats.load(calib)
        elif args.calib_source is None:
            ap.error(f"{calib} does not exist: give --calib-source to collect acceptance statistics")
        else:
            t0 = time.perf_counter()
            stats = collect_acceptance_stats(dt, calibration_prompts(args.calib_source, args.calib_prompts),
                                             args.max_new_tokens)
            stats.save(calib)
            print(f"collected acceptance statistics in {time.perf_counter() - t0:.0f}s -> {calib}", file=sys.stderr)
    latency = None
    if any(m.startswith("dynamic:auto") for m in methods):
        latency = measure_latency(dt.model.backbone, dt.heads, topk=args.topk)
        print("step ms by tree size: " + ", ".join(f"{r}: {1000 * x:.1f}" for r, x in
                                                   zip(latency.rows, latency.seconds)), file=sys.stderr)
    proposers = {m: TimedProposer(make_proposer(m, dt, stats, args.topk, latency)) for m in methods}
    prompts = mt_bench_prompts(args.skip + args.prompts, args.every)[args.skip:]
    totals = {m: {"new_tokens": 0, "wall": 0.0, "decode": 0.0, "passes": 0, "accepted": [], "tree_seconds": 0.0,
                  "phase": {}, "mismatches": 0, "nodes": 0, "sizes": []} for m in methods}
    for i, prompt in enumerate(prompts):
        ids = dt.encode(prompt)
        reference = None
        for m in methods:
            timed = proposers[m]
            before = timed.seconds
            run = dt.decoder(timed).run([ids], args.max_new_tokens).consume()
            s = run.stats
            t = totals[m]
            t["new_tokens"] += s.new_tokens
            t["wall"] += s.wall_seconds
            t["decode"] += s.decode_seconds
            t["passes"] += s.decode_passes
            t["accepted"] += s.accepted_lengths
            t["tree_seconds"] += timed.seconds - before
            t["nodes"] = max(t["nodes"], s.tree_nodes)
            t["sizes"] += s.tree_sizes
            for k, v in s.phase_seconds.items():
                t["phase"][k] = t["phase"].get(k, 0.0) + v
            if reference is None:
                reference = run.tokens[0]
            elif run.tokens[0] != reference:
                t["mismatches"] += 1
        print(f"prompt {i + 1}/{len(prompts)} done", file=sys.stderr)
    rows = []
    for m in methods:
        t = totals[m]
        passes = max(t["passes"], 1)
        rows.append({
            "method": m, "proposer": proposers[m].name, "nodes": t["nodes"],
            "accepted_per_pass": sum(t["accepted"]) / max(len(t["accepted"]), 1),
            "tokens_per_second": t["new_tokens"] / t["wall"], "decode_tokens_per_second": t["new_tokens"] / t["decode"],
            "ms_per_pass": 1000 * t["decode"] / passes,
            "tree_ms_per_pass": 1000 * t["tree_seconds"] / passes,
            "tree_share_of_step": t["tree_seconds"] / t["decode"] if t["decode"] else 0.0,
            "phase_ms_per_pass": {k: 1000 * v / passes for k, v in t["phase"].items()},
            "new_tokens": t["new_tokens"], "passes": t["passes"], "mismatches_vs_first": t["mismatches"],
            "mean_tree_size": sum(t["sizes"]) / max(len(t["sizes"]), 1),
        })
    result = {"command": " ".join(sys.argv), "heads": args.heads, "prompts": len(prompts), "skip": args.skip,
              "every": args.every,
              "max_new_tokens": args.max_new_tokens, "threads": torch.get_num_threads(), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| method | nodes (mean) | acc/pass | tok/s | ms/pass | tree ms/pass | tree share | mismatches |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['nodes']} ({r['mean_tree_size']:.1f}) | {r['accepted_per_pass']:.3f} | "
              f"{r['tokens_per_second']:.2f} | "
              f"{r['ms_per_pass']:.1f} | {r['tree_ms_per_pass']:.2f} | {100 * r['tree_share_of_step']:.1f}% | "
              f"{r['mismatches_vs_first']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
