"""Compare head sets on recorded greedy continuations: per-head accuracy and replayed tokens per pass.

For every heads directory: head k's top-1 / top-5 against the model's own continuation (teacher-forced: a
hydra head reads the true path), and the accepted tokens per pass of tree policies replayed exactly as live
greedy decoding would accept them (`dyntree.eval.replay`). The states are recomputed once per record with
the backbone in the dtype users decode in (`--dtype auto`), so Medusa and hydra heads are scored on the same
states. No timing: the draft's cost is measured live by `dyntree bench` (phase "proposal").

  python benchmarks/record_continuations.py --set mtbench --out /work/replay/mtbench.pt
  python benchmarks/heads_eval.py --records /work/replay/mtbench.pt --heads auto,runs/hydra \\
      --policies default,heads-only,recycle --out docs/heads-eval.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dyntree.api import resolve_heads
from dyntree.config import TreeConfig
from dyntree.eval.replay import replay_many, with_states
from dyntree.loading import load_model
from dyntree.proposers import DynamicTreeProposer
from dyntree.training.train import head_paths, head_targets, IGNORE


def policy(name: str, heads, seed_table=None) -> callable:
    """default: the default dynamic tree (lookup chain and recycling as configured by default); heads-only: no
    lookup; recycle[R]: the default with up to R recycled candidates; seeded-recycle[R]: the same, its table
    seeded from --seed-data; options after colons: N (node budget), TX (tree temperature), raw, kK, recycleR."""
    import copy

    base, *opts = name.split(":")
    fields, size = {}, None
    for opt in opts:  # :16 (size), :T1.5 (tree temperature), :raw (no renormalisation over the top-k), :k4
        if opt.isdigit():
            size = int(opt)
        elif opt.startswith("T"):
            fields["tree_temperature"] = float(opt[1:])
        elif opt == "raw":
            fields["renormalize"] = False
        elif opt.startswith("k"):
            fields["topk"] = int(opt[1:])
        elif opt.startswith("recycle"):
            fields["recycle"] = int(opt[7:])
        else:
            raise SystemExit(f"unknown policy option {opt!r} in {name!r}")
    recycle, seeded = None, base.startswith("seeded-")  # None: the tree config's default
    base = base.removeprefix("seeded-")
    if base == "heads-only":
        fields["lookup"] = 0
    elif base.startswith("recycle"):
        recycle = int(base[7:] or 2)
    elif base != "default":
        raise SystemExit(f"unknown policy {name!r}")
    config = TreeConfig.parse("dynamic", tree_size=size, **fields)

    def make():
        proposer = DynamicTreeProposer(heads.num_heads, config, recycle=recycle, conditional=heads.conditional)
        if seeded:
            proposer.successors = copy.deepcopy(seed_table)
        return proposer
    return make


@torch.inference_mode()
def accuracy(heads, backbone, records) -> dict:
    k = heads.num_heads
    hits1, hits5, count = torch.zeros(k), torch.zeros(k), torch.zeros(k)
    for rec in records:
        response = torch.tensor(rec["tokens"][rec["prompt_len"]:])
        states = rec["hidden"].float()
        targets = head_targets(response, k)
        if heads.config.head_type == "eagle":  # reads the context: every position's state
            logits = heads.logits_along(backbone, rec["states"], torch.tensor(rec["tokens"]), rec["prompt_len"])
        elif heads.conditional:
            logits = heads.path_logits(states, head_paths(response, k), backbone.embed_tokens,
                                       backbone.lm_head.weight_t)
        else:
            logits = heads.logits(states, backbone.lm_head.weight_t)
        top = logits.topk(5, dim=-1).indices
        if heads.vocab_ids is not None:
            top = heads.vocab_ids[top]
        valid = targets != IGNORE
        hit = top == targets[..., None]
        hits1 += (hit[..., 0] & valid).sum(0)
        hits5 += (hit.any(-1) & valid).sum(0)
        count += valid.sum(0)
    return {"top1": (hits1 / count).tolist(), "top5": (hits5 / count).tolist(), "rows": int(count[0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", required=True)
    ap.add_argument("--heads", required=True, help="comma-separated heads directories ('auto' = bundled)")
    ap.add_argument("--policies", default="default,heads-only")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--seed-data", default=None, help="distilled dataset whose responses seed the recycling table")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    seed_table = None
    if args.seed_data:
        from dyntree.trees.recycle import SuccessorTable
        from dyntree.training.dataset import DistillDataset

        ds = DistillDataset.open(args.seed_data)
        responses = []
        for path in ds.shard_paths():
            shard = ds.read_shard(path, with_hidden=False)
            for i in range(len(shard.keys)):
                start, end = int(shard.offsets[i]), int(shard.offsets[i + 1])
                responses.append(shard.tokens[start + int(shard.prompt_lens[i]) : end].tolist())
        seed_table = SuccessorTable.from_sequences(responses)
    loaded = load_model("default", dtype=args.dtype)
    backbone = loaded.backbone
    data = torch.load(args.records, weights_only=False)
    records = data["records"][: args.limit] if args.limit else data["records"]
    with_states(records, backbone)  # the states of every position, in the weights users decode with
    results = {"records": args.records, "sequences": len(records), "weights": loaded.weights, "heads": {}}
    for name in args.heads.split(","):
        heads, note = resolve_heads(name, loaded)
        out = {"note": note, "head_type": heads.config.head_type, "accuracy": accuracy(heads, backbone, records)}
        print(f"{name} ({heads.config.head_type}): top-1 " + " ".join(f"{a:.3f}" for a in out["accuracy"]["top1"]),
              flush=True)
        for pol in args.policies.split(","):
            start = time.time()
            res = replay_many(policy(pol, heads, seed_table), records, heads=heads, backbone=backbone)
            out[pol] = {"tokens_per_pass": res.mean_accepted, "passes": len(res.accepted_lengths),
                        "mean_nodes": sum(res.tree_sizes) / len(res.tree_sizes)}
            print(f"  {pol}: {res.mean_accepted:.3f} tokens/pass ({time.time() - start:.0f} s)", flush=True)
        results["heads"][name] = out
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
