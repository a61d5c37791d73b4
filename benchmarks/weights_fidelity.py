"""How close plain greedy decoding on the GGUF file's own blocks stays to the fp32 de-quantized model.

For each MT-Bench first turn: greedy `ar` on `--weights gguf` and on `--weights float32` (the same weights,
de-quantized; only summation order differs), then
- BLEU of the gguf answers against the fp32 ones,
- tokens until the first difference (the whole answer when they never differ),
- at a difference: the fp32 model's logit gap between its top-1 and the token gguf chose there (a near-tie
  that summation order can flip has a gap near 0).
Writes a JSON and a markdown summary. BLEU against llama.cpp comes from `dyntree bench` (its BLEU column).

usage: python benchmarks/weights_fidelity.py [--prompts N] [--max-new-tokens T] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import torch

from dyntree import DynTree
from dyntree.prompts import conversation, load_prompts
from dyntree.eval.quality import corpus_bleu
from dyntree.precision import cpu_identity


def logit_gap(dt: DynTree, ids: list[int], chosen: int) -> float:
    """fp32 model: logit of its own top-1 minus that of `chosen`, after `ids`."""
    backbone = dt.model.backbone
    cache = backbone.new_cache(1, len(ids) + 1)
    hidden = backbone.forward(torch.tensor([ids]), cache)[:, -1]
    logits = backbone.logits(hidden)[0]
    return float(logits.max() - logits[chosen])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16, help="MT-Bench first turns (2 per category at 16)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--out", default="bench-out/weights-fidelity")
    args = parser.parse_args(argv)
    quantized = DynTree.from_pretrained("default", heads=None, tree="ar", weights="gguf")
    reference = DynTree.from_pretrained("default", heads=None, tree="ar", weights="float32")
    categories = len({p.category for p in load_prompts("mtbench")})
    chosen = load_prompts("mtbench", per_category=max(1, -(-args.prompts // categories)))
    rows, hyps, refs = [], [], []
    for prompt in chosen[: args.prompts]:
        ids = quantized.encode(conversation(prompt, 0, []), chat=True)
        q = quantized.generate(ids, max_new_tokens=args.max_new_tokens)
        r = reference.generate(ids, max_new_tokens=args.max_new_tokens)
        qt, rt = list(q.token_ids), list(r.token_ids)
        first = next((i for i, (a, b) in enumerate(zip(qt, rt)) if a != b), None)
        gap = None if first is None else logit_gap(reference, ids + rt[:first], qt[first])
        same = min(len(qt), len(rt)) if first is None else first
        rows.append({"id": prompt.prompt_id, "category": prompt.category, "tokens": len(rt), "identical": qt == rt,
                     "tokens_to_first_difference": same, "fp32_logit_gap_at_difference": gap})
        hyps.append(q.text)
        refs.append(r.text)
        print(rows[-1], flush=True)
    differing = [r for r in rows if not r["identical"]]
    summary = {
        "cpu": cpu_identity()[0], "torch_threads": torch.get_num_threads(),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "prompts": len(rows), "max_new_tokens": args.max_new_tokens,
        "bleu_gguf_vs_float32": round(corpus_bleu(hyps, refs), 2),
        "identical_answers": sum(r["identical"] for r in rows),
        "mean_tokens_to_first_difference": round(sum(r["tokens_to_first_difference"] for r in rows) / len(rows), 1),
        "logit_gaps_at_differences": [round(r["fp32_logit_gap_at_difference"], 4) for r in differing],
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fidelity.json").write_text(json.dumps(summary, indent=1) + "\n")
    md = [f"# gguf vs float32 plain decoding ({summary['cpu']}, commit {summary['commit']})", "",
          "| prompts | identical | BLEU | mean tokens to first difference | fp32 logit gaps at differences |",
          "|---:|---:|---:|---:|---|",
          f"| {len(rows)} x {args.max_new_tokens} | {summary['identical_answers']} | {summary['bleu_gguf_vs_float32']} | "
          f"{summary['mean_tokens_to_first_difference']} | {', '.join(map(str, summary['logit_gaps_at_differences'])) or '-'} |"]
    (out / "fidelity.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
