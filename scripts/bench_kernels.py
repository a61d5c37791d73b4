"""Measure the dense-layer kernels behind `dyntree.kernels.Dense` and the backbone forward by tree size.

Usage: python scripts/bench_kernels.py [--out docs/perf-notes.data.json]
Prints a markdown table: for each weight shape of SmolLM2-135M and row count, milliseconds for
F.linear ([out,in] weight), x @ W_t ([in,out] weight), oneDNN prepacked, and what Dense picks.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from dyntree.kernels import Dense

SHAPES = {"qkv 960x576": (960, 576), "o 576x576": (576, 576), "gate_up 3072x576": (3072, 576),
          "down 576x1536": (576, 1536), "lm_head 49152x576": (49152, 576)}


def timed(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="1,2,4,8,16,32,64")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    results = []
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    print("| weight | rows | F.linear ms | x @ W_t ms | oneDNN packed ms | Dense ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (out_f, in_f) in SHAPES.items():
        weight = torch.randn(out_f, in_f)
        dense = Dense(weight)
        weight_t = dense.weight_t
        repeats = 10 if out_f > 10000 else 100
        for m in rows:
            x = torch.randn(m, in_f)
            row = {"weight": name, "rows": m,
                   "linear": timed(lambda: F.linear(x, weight), repeats),
                   "matmul_t": timed(lambda: x @ weight_t, repeats),
                   "onednn": timed(lambda: torch.ops.mkldnn._linear_pointwise(x, dense.packed, None, "none", [], ""),
                                   repeats) if dense.packed is not None else None,
                   "dense": timed(lambda: dense(x), repeats)}
            results.append(row)
            onednn = f"{row['onednn']:.3f}" if row["onednn"] is not None else "n/a"
            print(f"| {name} | {m} | {row['linear']:.3f} | {row['matmul_t']:.3f} | {onednn} | {row['dense']:.3f} |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
