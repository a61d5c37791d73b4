"""Measure the kernels behind `dyntree.kernels.Dense` and the cost of a backbone pass by tree size, per dtype.

Usage: python scripts/bench_kernels.py [--dtypes float32,bfloat16] [--skip-dense] [--out FILE.json]
Prints two markdown tables, with the CPU named:
- per weight shape of SmolLM2-135M and row count: ms for `F.linear`, oneDNN prepacked, and `Dense`;
- the cost curve: ms per backbone pass of the default model (all layers, 200 tokens of context, a binary tree,
  plus a 1-row lm_head, as a step that verifies one node) for 1-64 nodes, per dtype. Minimum over repeats, with the
  dtypes interleaved so that load from other processes hits both alike.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from dyntree.kernels import Dense
from dyntree.precision import DTYPE_NAMES, cpu_identity
from dyntree.trees import buffers_from_parents

SHAPES = {"qkv 960x576": (960, 576), "o 576x576": (576, 576), "gate_up 3072x576": (3072, 576),
          "down 576x1536": (576, 1536), "lm_head 49152x576": (49152, 576)}
CONTEXT = 200


def timed(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1000


def dense_table(dtypes: list[str], rows: list[int]) -> list[dict]:
    results = []
    print("| dtype | weight | rows | F.linear ms | oneDNN packed ms | Dense ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for dtype in dtypes:
        for name, shape in SHAPES.items():
            weight = torch.randn(shape).to(DTYPE_NAMES[dtype])
            dense = Dense(weight)
            repeats = 10 if shape[0] > 10000 else 50
            for m in rows:
                x = torch.randn(m, shape[1]).to(weight.dtype)
                packed = (lambda: torch.ops.mkldnn._linear_pointwise(x, dense.packed, None, "none", [], "")
                          ) if dense.packed is not None and m > 1 else None
                row = {"dtype": dtype, "weight": name, "rows": m, "linear": timed(lambda: F.linear(x, weight), repeats),
                       "onednn": timed(packed, repeats) if packed else None, "dense": timed(lambda: dense(x), repeats)}
                results.append(row)
                onednn = f"{row['onednn']:.3f}" if row["onednn"] is not None else "n/a"
                print(f"| {dtype} | {name} | {m} | {row['linear']:.3f} | {onednn} | {row['dense']:.3f} |")
    return results


def cost_curve(dtypes: list[str], nodes: list[int], repeats: int) -> dict:
    """ms per tree pass of `n` nodes (a binary tree) after CONTEXT tokens, plus the lm_head on the root."""
    from dyntree.loading import load_model

    backbones = {dtype: load_model("default", dtype=dtype).backbone for dtype in dtypes}
    vocab = next(iter(backbones.values())).config.vocab_size
    gen = torch.Generator().manual_seed(0)
    context = torch.randint(0, vocab, (1, CONTEXT), generator=gen)
    caches = {}
    for dtype, backbone in backbones.items():
        caches[dtype] = backbone.new_cache(1, CONTEXT + max(nodes) + 1)
        backbone.forward(context, caches[dtype])
        caches[dtype].lengths.fill_(CONTEXT)
    best = {(dtype, n): float("inf") for dtype in dtypes for n in nodes}
    for n in nodes:
        tokens = torch.randint(0, vocab, (1, n), generator=gen)
        tree = buffers_from_parents(torch.tensor([[(i - 1) // 2 for i in range(n)]]), 8)  # a binary tree
        tree_mask, depths = tree.tree_mask, tree.depths
        for _ in range(repeats + 2):
            for dtype, backbone in backbones.items():
                start = time.perf_counter()
                hidden = backbone.forward(tokens, caches[dtype], block_mask=tree_mask, depths=depths)
                backbone.logits(hidden[:, :1])
                best[(dtype, n)] = min(best[(dtype, n)], time.perf_counter() - start)
    print(f"\n| nodes | {' | '.join(f'{d} ms' for d in dtypes)} | {' | '.join(f'{d} / 1 node' for d in dtypes)} |")
    print("| --- |" + " --- |" * (2 * len(dtypes)))
    for n in nodes:
        ms = [best[(d, n)] * 1000 for d in dtypes]
        ratios = [best[(d, n)] / best[(d, nodes[0])] for d in dtypes]
        print(f"| {n} | " + " | ".join(f"{m:.1f}" for m in ms) + " | " + " | ".join(f"{r:.2f}x" for r in ratios) + " |")
    return {f"{dtype}@{n}": round(t * 1000, 2) for (dtype, n), t in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--rows", default="1,2,4,8,16,32,64")
    parser.add_argument("--nodes", default="1,2,4,8,16,32,64")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-dense", action="store_true", help="only the cost curve")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dtypes = args.dtypes.split(",")
    cpu, flags = cpu_identity()
    print(f"CPU {cpu} ({' '.join(flags)}), torch {torch.__version__}, threads {torch.get_num_threads()}\n")
    dense = [] if args.skip_dense else dense_table(dtypes, [int(r) for r in args.rows.split(",")])
    curve = cost_curve(dtypes, [int(n) for n in args.nodes.split(",")], args.repeats)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"cpu": cpu, "flags": flags, "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "context": CONTEXT, "dense": dense, "pass_ms": curve}, fh, indent=1)


if __name__ == "__main__":
    main()
