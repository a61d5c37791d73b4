"""Output quality of a decoding mode: BLEU against plain decoding, and `dyntree quality`'s comparison.

Greedy tree decoding and lossless tree sampling cannot change what the model would emit (greedy: the same
tokens; lossless: the same distribution); typical acceptance can. Two measures make this visible:

- `corpus_bleu(hypotheses, references)`: sacrebleu corpus BLEU of a method's decoded texts against plain
  decoding's texts for the same prompts. For sampling, two plain runs with different seeds already differ,
  so compare with the "floor": plain-vs-plain BLEU (`measure_quality` reports it).
- the first-tree-token KL to the model's own sampling distribution, next to its noise floor (kl.py).

`measure_quality` runs the whole comparison (greedy, lossless, typical) on prompts (MT-Bench by default); `dyntree
quality` is its command line (`commands/quality.py`). sacrebleu comes with the 'bench' extra.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ..errors import DynTreeError
from ..extras import require_extra
from ..proposers import Proposer, RootOnlyProposer
from ..sampling import GREEDY, SamplingConfig
from .kl import build_tree_context, estimate_first_token_kl


# -- BLEU ------------------------------------------------------------------------------------------------
def corpus_bleu(hypotheses: list[str], references: list[str]) -> float:
    """sacrebleu corpus BLEU (0-100) of `hypotheses` against one reference each."""
    require_extra("bench", "BLEU")
    import sacrebleu

    if len(hypotheses) != len(references):
        raise DynTreeError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise DynTreeError("no texts to score")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


# -- the whole comparison --------------------------------------------------------------------------------
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
    ref_s = SamplingConfig.from_options(temperature, top_p, top_k, seed=seed + 1)
    lossless = replace(ref_s, seed=seed + 2)
    typical = SamplingConfig.from_options(temperature, top_p, top_k, seed + 2, "typical", eps, alpha)
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

    table = Table(title=f"quality and speed: {report['prompts']} prompts x {report['max_new_tokens']} "
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

