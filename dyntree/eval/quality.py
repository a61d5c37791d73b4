"""Output quality of a decoding mode: BLEU against plain decoding and a KL divergence to the model's distribution.

Greedy tree decoding and lossless tree sampling cannot change what the model would emit (greedy: the same
tokens; lossless: the same distribution); typical acceptance can. Two measures make this visible:

- `corpus_bleu(hypotheses, references)`: sacrebleu corpus BLEU of a method's decoded texts against plain
  decoding's texts for the same prompts. For sampling, two plain runs with different seeds already differ,
  so compare with the "floor": plain-vs-plain BLEU (`measure_quality` reports it).
- First-tree-token KL (docs/sampling.md defines it): on a fixed context (prompt + the model's greedy first
  token as the tree root), the model's sampling distribution p of the token after the root is known
  exactly; draw S emissions of that token from a method (re-running only the random verification on one
  tree forward, which is exact because the tree's hidden states do not depend on the random draws) and
  compute KL(p_hat || p) = sum_x p_hat(x) log(p_hat(x) / p(x)) with p_hat the empirical distribution. It
  needs no smoothing (every method emits only tokens with p > 0; otherwise it is infinite, and reported so)
  and has a positive small-sample bias (~ (support - 1) / 2S), so it is reported next to the same estimate
  for S draws straight from p (the noise floor a lossless method matches).

`measure_quality` runs the whole comparison (greedy, lossless, typical) on MT-Bench prompts; `dyntree
quality` (or `python -m dyntree.eval.quality`) is its command line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..errors import DynTreeError
from ..proposal import Proposal, Proposer, RootOnlyProposer, propose_step
from ..sampling import SamplingConfig, processed_probs
from ..trees import TreeBuffers
from ..verify import verify_tree


# -- BLEU ------------------------------------------------------------------------------------------------
def corpus_bleu(hypotheses: list[str], references: list[str]) -> float:
    """sacrebleu corpus BLEU (0-100) of `hypotheses` against one reference each."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise DynTreeError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise DynTreeError("no texts to score")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


# -- KL of the first tree-verified token -----------------------------------------------------------------
def empirical_kl(samples: torch.Tensor, model_probs: torch.Tensor) -> float:
    """KL(p_hat || p) in nats: p_hat the empirical distribution of token ids `samples` [S], p `[V]`."""
    counts = torch.bincount(samples.flatten().cpu(), minlength=model_probs.numel()).double()
    p_hat = counts / counts.sum()
    p = model_probs.double().cpu()
    seen = p_hat > 0
    if bool((p[seen] <= 0).any()):
        return math.inf
    return float((p_hat[seen] * (p_hat[seen].log() - p[seen].log())).sum())


@dataclass
class TreeContext:
    """One fixed context for the KL estimate: the tree built after it and the model's logits at every node."""

    root: int
    proposal: Proposal  # batch 1
    node_logits: torch.Tensor  # [n, V]


@torch.inference_mode()
def build_tree_context(backbone, heads, proposer: Proposer, prompt_ids: list[int]) -> TreeContext:
    """Prefill `prompt_ids`, take the greedy next token as the root, build and run one tree over it."""
    from ..decoding import Decoder

    budget = Decoder(backbone, heads, proposer, eos_token_ids=()).max_tree_nodes
    cache = backbone.new_cache(1, len(prompt_ids) + budget + 1)
    hidden = backbone.forward(torch.tensor([prompt_ids], device=backbone.device), cache)
    cache.lengths.fill_(len(prompt_ids))
    last = hidden[:, -1]
    root = backbone.logits(last).argmax(-1)
    head_ids = head_probs = None
    if proposer.uses_heads:
        head_ids, head_probs = heads.topk(last, backbone.lm_head, proposer.topk)
    proposal = propose_step(proposer, root, head_ids, head_probs, lambda: [list(prompt_ids) + [int(root[0])]])
    tree_hidden = backbone.forward(proposal.tokens, cache, block_mask=proposal.buffers.tree_mask,
                                   depths=proposal.buffers.depths)
    return TreeContext(int(root[0]), proposal, backbone.logits(tree_hidden[0]))


def _expand(proposal: Proposal, batch: int) -> Proposal:
    b = proposal.buffers
    buffers = TreeBuffers(*(t[:1].expand(batch, *t.shape[1:]) for t in
                            (b.parents, b.depths, b.tree_mask, b.retrieve_paths)))
    return Proposal(proposal.tokens[:1].expand(batch, -1), buffers)


def first_token_samples(context: TreeContext, sampling: SamplingConfig, num_samples: int,
                        generator: torch.Generator, chunk: int = 256) -> torch.Tensor:
    """`num_samples` draws of the token a method emits right after the root, from one tree forward.

    Verification only reads the node logits, so it is replayed with fresh random draws on a batch of copies
    of the same tree (the logits are passed as the "hidden states" with an identity projection).
    """
    out = []
    tokens = context.proposal.tokens
    done = 0
    while done < num_samples:
        m = min(chunk, num_samples - done)
        proposal = _expand(context.proposal, m)
        hidden = context.node_logits[None].expand(m, -1, -1)
        result = verify_tree(lambda x: x, hidden, proposal, None, sampling, generator)
        for b, nodes in enumerate(result.accepted_nodes):
            out.append(int(tokens[0, nodes[1]]) if nodes.numel() > 1 else int(result.next_tokens[b]))
        done += m
    return torch.tensor(out, dtype=torch.long)


@dataclass
class KLEstimate:
    """Per-context KLs (nats) of a method, next to the noise floor of the same number of direct draws."""

    method_kl: list[float]
    floor_kl: list[float]
    num_samples: int

    @property
    def mean(self) -> float:
        return sum(self.method_kl) / len(self.method_kl)

    @property
    def floor(self) -> float:
        return sum(self.floor_kl) / len(self.floor_kl)


def estimate_first_token_kl(contexts: list[TreeContext], sampling: SamplingConfig, num_samples: int,
                            seed: int = 0) -> KLEstimate:
    """The first-tree-token KL of `sampling` (lossless or typical) over `contexts`, and its floor."""
    gen = torch.Generator(device=contexts[0].node_logits.device).manual_seed(seed)
    method, floor = [], []
    for ctx in contexts:
        p = processed_probs(ctx.node_logits[:1], sampling)[0]
        method.append(empirical_kl(first_token_samples(ctx, sampling, num_samples, gen), p))
        direct = torch.multinomial(p, num_samples, replacement=True, generator=gen) if not sampling.is_greedy \
            else p.argmax().repeat(num_samples)
        floor.append(empirical_kl(direct, p))
    return KLEstimate(method, floor, num_samples)


# -- the whole comparison --------------------------------------------------------------------------------
def load_mt_bench_prompts(count: int, path: str | Path | None = None) -> list[str]:
    """The first user turn of the first `count` questions of `path` (default: the packaged MT-Bench)."""
    from ..bench.prompts import load_prompts  # the one reader of prompt files, with its line-numbered errors
    from ..data import mt_bench_path

    return [p.turns[0] for p in load_prompts(path or mt_bench_path(), limit=count)]


@dataclass
class ModeResult:
    label: str  # e.g. "tree greedy", "plain lossless(T=0.7)"
    acceptance: str
    tokens: int
    passes: int
    seconds: float
    mean_accepted_per_pass: float
    bleu: float | None = None  # against the plain reference of the same sampling settings
    kl: float | None = None
    kl_floor: float | None = None
    texts: list[str] = field(default_factory=list, repr=False)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "texts"}
        d["tokens_per_second"] = self.tokens_per_second
        return d


def _run_mode(dt, prompt_ids: list[list[int]], proposer: Proposer, sampling: SamplingConfig | None,
              max_new_tokens: int, label: str) -> ModeResult:
    tokens = passes = 0
    seconds = 0.0
    accepted: list[int] = []
    texts = []
    for i, ids in enumerate(prompt_ids):
        # A distinct, reproducible seed per prompt.
        s = None if sampling is None else replace(sampling, seed=(sampling.seed or 0) * 1000 + i)
        run = dt.decoder(proposer, s).run([ids], max_new_tokens).consume()
        tokens += run.stats.new_tokens
        passes += run.stats.decode_passes
        seconds += run.stats.wall_seconds
        accepted += run.stats.accepted_lengths
        texts.append(dt.tokenizer.decode(run.tokens[0], skip_special_tokens=True))
    mean_acc = sum(accepted) / len(accepted) if accepted else 0.0
    return ModeResult(label, sampling.label if sampling else "greedy", tokens, passes, seconds, mean_acc, texts=texts)


def measure_quality(dt, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.7, top_p: float = 1.0,
                    top_k: int = 0, seed: int = 0, kl_samples: int = 1000, eps: float | None = None,
                    alpha: float | None = None, progress=None) -> dict:
    """Greedy vs lossless vs typical on `prompts` with the DynTree `dt`'s tree: speed and quality.

    Rows: plain and tree greedy; plain sampling (the reference, seed A), plain sampling with seed B (the
    floor of BLEU/KL for sampling), tree lossless and tree typical (seed B). BLEU is against the plain row of
    the same sampling settings; KL is the first-tree-token KL over the prompts as fixed contexts.
    """
    if dt.heads is None:
        raise DynTreeError("quality needs heads (pass --heads DIR or --heads random)")
    say = progress or (lambda msg: None)
    ids = [dt.encode(p) for p in prompts]
    tree = dt.proposer
    plain = RootOnlyProposer()
    typical_kw = {k: v for k, v in (("eps", eps), ("alpha", alpha)) if v is not None}
    ref_s = SamplingConfig(temperature, top_p, top_k, seed=seed + 1)
    other = dict(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed + 2)
    lossless = SamplingConfig(**other, mode="lossless")
    typical = SamplingConfig(**other, mode="typical", **typical_kw)
    rows: list[ModeResult] = []
    plan = [("plain greedy", plain, None), ("tree greedy", tree, None),
            ("plain sampling (reference)", plain, ref_s), ("plain sampling (floor)", plain, lossless),
            ("tree lossless", tree, lossless), ("tree typical", tree, typical)]
    for label, proposer, sampling in plan:
        say(f"decoding: {label}")
        rows.append(_run_mode(dt, ids, proposer, sampling, max_new_tokens, label))
    greedy_ref, sample_ref = rows[0].texts, rows[2].texts
    for row in rows:
        if row is rows[0] or row is rows[2]:
            continue
        row.bleu = corpus_bleu(row.texts, greedy_ref if row.acceptance == "greedy" else sample_ref)

    say(f"KL: {len(ids)} contexts x {kl_samples} samples")
    backbone = dt.model.backbone
    contexts = [build_tree_context(backbone, dt.heads, tree, p) for p in ids]
    from ..sampling import GREEDY

    for row, sampling in ((rows[1], GREEDY), (rows[4], lossless), (rows[5], typical)):
        est = estimate_first_token_kl(contexts, sampling, kl_samples, seed=seed)
        row.kl, row.kl_floor = est.mean, est.floor
    rows[3].kl = rows[4].kl_floor  # direct draws from p: the floor itself
    greedy_acc = rows[1].mean_accepted_per_pass
    return {
        "prompts": len(prompts), "max_new_tokens": max_new_tokens, "tree": tree.name, "heads": dt.heads_note,
        "temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed, "kl_samples": kl_samples,
        "typical": {"eps": typical.eps, "alpha": typical.alpha},
        "lossless_over_greedy_accepted": rows[4].mean_accepted_per_pass / greedy_acc if greedy_acc else None,
        "rows": [r.as_dict() for r in rows],
    }


def quality_table(report: dict):
    from rich.table import Table

    table = Table(title=f"quality and speed: {report['prompts']} MT-Bench prompts x {report['max_new_tokens']} "
                        f"tokens, tree {report['tree']}")
    for col in ("run", "acceptance", "tokens", "acc/pass", "tok/s", "BLEU vs plain", "KL (nats)", "KL floor"):
        table.add_column(col, justify="left" if col in ("run", "acceptance") else "right")

    def fmt(v, spec):
        return "-" if v is None else (f"{v:{spec}}" if math.isfinite(v) else "inf")

    for r in report["rows"]:
        table.add_row(r["label"], r["acceptance"], str(r["tokens"]), f"{r['mean_accepted_per_pass']:.2f}",
                      f"{r['tokens_per_second']:.1f}", fmt(r["bleu"], ".1f"), fmt(r["kl"], ".4f"),
                      fmt(r["kl_floor"], ".4f"))
    return table


def main(argv=None) -> int:
    from ..cli import main as cli_main

    import sys

    return cli_main(["quality", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
