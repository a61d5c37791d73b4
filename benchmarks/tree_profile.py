"""Write the heads' tree profile: accepted tokens per pass of the default dynamic tree at each size.

Replays the default tree policy (`TreeConfig.parse("dynamic", size)`) on recorded greedy continuations of
prompts that are NOT the benchmark's (`record_continuations.py --set calib`), and writes the profile that
`DynTree.from_pretrained` combines with this machine's step latency to size the default tree
(`dyntree.trees.sizing`). Ship it beside the heads as `tree_profile.json`.

  python benchmarks/record_continuations.py --set calib --gsm8k-file ../shared/data/gsm8k_train_questions.jsonl \
      --out /work/replay/calib.pt
  python benchmarks/tree_profile.py --records /work/replay/calib.pt \
      --out dyntree/assets/heads/smollm2-135m-instruct/tree_profile.json
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch

from dyntree.config import TreeConfig
from dyntree.eval.replay import replay_many, with_states
from dyntree.proposers import DynamicTreeProposer
from dyntree.trees.sizing import TreeProfile

SIZES = (2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", required=True, help="recorded continuations (never MT-Bench)")
    ap.add_argument("--heads", default=None,
                    help="heads directory to profile (default: the guesses stored in the records, i.e. the heads "
                         "they were recorded with); the states are then recomputed in --dtype")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--num-heads", type=int, default=4)
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    data = torch.load(args.records, weights_only=False)
    if any(str(tag).startswith("mt") for tag in data["tags"]):
        ap.error("these records hold MT-Bench prompts: profile on other prompts")
    heads = backbone = None
    if args.heads:
        from dyntree.api import resolve_heads
        from dyntree.loading import load_model

        loaded = load_model("default", dtype=args.dtype)
        backbone = loaded.backbone
        heads, _ = resolve_heads(args.heads, loaded)
        args.num_heads = heads.num_heads
        with_states(data["records"], backbone)
    conditional = heads is not None and heads.conditional
    profile = {}
    for size in (int(s) for s in args.sizes.split(",")):
        config = TreeConfig.parse("dynamic", size)
        result = replay_many(lambda c=config: DynamicTreeProposer(args.num_heads, c, conditional=conditional),
                             data["records"], heads=heads, backbone=backbone)
        profile[size] = sum(result.accepted_lengths) / len(result.accepted_lengths)
        print(f"size {size}: {profile[size]:.3f} tokens per pass", flush=True)
    policy = {k: v for k, v in TreeConfig.parse("dynamic").settings().items() if k != "size"}
    note = {"records": len(data["records"]), "tokens": sum(len(r["tokens"]) - r["prompt_len"] for r in data["records"]),
            "prompts": "calib: self-written prompts + GSM8K train questions the heads never saw (not MT-Bench)",
            "command": "python " + shlex.join(sys.argv)}
    TreeProfile(profile, policy, note).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
