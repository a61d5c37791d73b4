"""Record greedy continuations and the heads' top-k at every position, for offline tree replay.

Replaying proposers on recorded data (`dyntree.eval.replay`) measures accepted tokens per pass for any tree
policy in seconds, with no backbone forward, because greedy verification only compares a tree with the
model's own continuation. Writes one `.pt` file: per prompt the token ids, the prompt length and the heads'
top-k ids/probabilities from the hidden state before every response token.

  python benchmarks/record_continuations.py --set mtbench --out /work/replay/mtbench.pt
  python benchmarks/record_continuations.py --set calib --gsm8k-file ../shared/data/gsm8k_train_questions.jsonl \
      --out /work/replay/calib.pt   # never MT-Bench
  # other heads on the same continuations: one teacher-forced forward per sequence instead of decoding
  python benchmarks/record_continuations.py --rescore /work/replay/mtbench.pt --heads runs/new --out new.pt

`mtbench` = the MT-Bench questions shipped with dyntree; `calib` = fresh self-written prompts (a seed the
bundled heads' data did not use) + GSM8K questions from the end of the train file (the heads' distillation
never reached them), which `--gsm8k-file` names.
"""

from __future__ import annotations

import argparse
import time

import torch

from dyntree.api import DynTree
from dyntree.prompts import load_prompts
from dyntree.data import mt_bench_path
from dyntree.training.distill import chat_ids, generate_batched, self_prompts
from dyntree.training.prompts import read_prompt_file
from dyntree.training.dataset import recompute_hidden


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", choices=["mtbench", "calib", "file"])
    ap.add_argument("--prompts-file", default=None, metavar="FILE",
                    help="--set file: a JSONL prompt file (any format `dyntree distill --prompts` reads), e.g. "
                         "prompts the heads never saw")
    ap.add_argument("--rescore", default=None, metavar="FILE",
                    help="take the continuations of an earlier record; only the heads' guesses are recomputed")
    ap.add_argument("--heads", default="auto", help="heads directory (default: the bundled heads)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--self-prompts", type=int, default=48)
    ap.add_argument("--gsm8k", type=int, default=48)
    ap.add_argument("--gsm8k-file", default=None, metavar="FILE",
                    help="GSM8K train questions (JSONL) for --set calib, e.g. "
                         "../shared/data/gsm8k_train_questions.jsonl")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--topk", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if (args.set is None) == (args.rescore is None):
        ap.error("give --set or --rescore")
    if args.set == "calib" and args.gsm8k_file is None:
        ap.error("--set calib needs --gsm8k-file")
    if (args.set == "file") != (args.prompts_file is not None):
        ap.error("--set file goes with --prompts-file")
    torch.set_num_threads(args.threads)
    dt = DynTree.from_pretrained("default", heads=args.heads)
    if args.rescore:
        rescore(dt, args)
        return
    tok = dt.tokenizer
    if args.set == "mtbench":
        texts = [(f"mt{p.prompt_id}:{p.category}", p.turns[0])
                 for p in load_prompts(mt_bench_path())]
    elif args.set == "file":
        texts = [(f"file{i}", p.text) for i, p in enumerate(read_prompt_file(args.prompts_file))]
    else:
        texts = [(f"self{i}", p.text) for i, p in
                 enumerate(self_prompts(dt.model, args.self_prompts, seed=20261123))]
        gsm = read_prompt_file(args.gsm8k_file)
        texts += [(f"gsm{len(gsm) - 1 - i}", p.text) for i, p in enumerate(gsm[::-1][: args.gsm8k])]
    texts = texts[: args.limit] if args.limit else texts
    prompts = [(tag, chat_ids(tok, text)) for tag, text in texts]
    start = time.time()
    records = {}
    for c in generate_batched(dt.model.backbone, prompts, args.max_new_tokens, args.batch_size):
        records[c.tag] = {"prompt_len": len(c.prompt_ids), "tokens": c.prompt_ids + c.response_ids}
        if not dt.heads.conditional:  # Medusa heads' guesses; others are scored from the states (heads_eval)
            ids, probs = dt.heads.topk(c.hidden.float(), dt.model.backbone.lm_head, args.topk)
            records[c.tag].update(head_ids=ids.to(torch.int32), head_probs=probs.to(torch.float32))
        print(f"{len(records)}/{len(prompts)} {c.tag} {len(c.response_ids)} tokens, {time.time() - start:.0f}s",
              flush=True)
    order = [tag for tag, _ in prompts if tag in records]
    torch.save({"tags": order, "records": [records[t] for t in order], "topk": args.topk}, args.out)


def rescore(dt, args) -> None:
    """The same greedy continuations with other heads' top-k (the hidden states do not depend on heads)."""
    old = torch.load(args.rescore, weights_only=False)
    records = []
    for tag, rec in zip(old["tags"], old["records"]):
        hidden = recompute_hidden(dt.model.backbone, torch.tensor(rec["tokens"]), rec["prompt_len"])
        ids, probs = dt.heads.topk(hidden.float(), dt.model.backbone.lm_head, args.topk)
        records.append({**rec, "head_ids": ids.to(torch.int32), "head_probs": probs.to(torch.float32)})
        print(f"{len(records)}/{len(old['tags'])} {tag}", flush=True)
    torch.save({"tags": old["tags"], "records": records, "topk": args.topk}, args.out)


if __name__ == "__main__":
    main()
