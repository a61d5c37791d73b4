"""From raw run records to per-method figures. Pure functions: every number here is recomputable from the
records kept in `results.json`."""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Callable

from ..early import summarize_prune
from ..eval.quality import corpus_bleu
from .runner import REFERENCE_METHOD, RunRecord

HF_BASELINE = "hf"
AR_BASELINE = REFERENCE_METHOD


@dataclass
class Sample:
    """One method on one prompt turn, repeats folded: tokens of the first run, median time of all."""

    method: str
    key: tuple[str, int]  # (prompt_id, turn)
    category: str | None
    token_ids: list[int]
    new_tokens: int
    wall_seconds: float
    decode_passes: int | None
    accepted_lengths: list[int] | None
    repeats_agree: bool

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.wall_seconds if self.wall_seconds > 0 else 0.0


def fold_repeats(records: list[RunRecord]) -> dict[str, list[Sample]]:
    """Group records by method, then by prompt turn, in first-seen order."""
    groups: dict[tuple[str, str, int], list[RunRecord]] = defaultdict(list)
    for r in records:
        groups[(r.method, r.prompt_id, r.turn)].append(r)
    samples: dict[str, list[Sample]] = defaultdict(list)
    for (method, prompt_id, turn), runs in groups.items():
        first = runs[0]
        samples[method].append(Sample(
            method=method, key=(prompt_id, turn), category=first.category, token_ids=first.token_ids,
            new_tokens=first.new_tokens, wall_seconds=statistics.median(r.wall_seconds for r in runs),
            decode_passes=first.decode_passes, accepted_lengths=first.accepted_lengths,
            repeats_agree=all(r.token_ids == first.token_ids for r in runs)))
    return dict(samples)


def spread(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)

    def quantile(q: float) -> float:
        pos = q * (len(ordered) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return {"mean": statistics.fmean(values), "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": ordered[0], "p25": quantile(0.25), "median": quantile(0.5), "p75": quantile(0.75),
            "max": ordered[-1], "n": len(values)}


def throughput(samples: list[Sample]) -> float:
    """Total tokens over total time (long answers weigh more, as they do for a user)."""
    seconds = sum(s.wall_seconds for s in samples)
    return sum(s.new_tokens for s in samples) / seconds if seconds > 0 else 0.0


def mean_accepted(samples: list[Sample]) -> float | None:
    """Tokens added per decoding pass (the prefill pass, which yields the first token, is not counted)."""
    lengths = [n for s in samples if s.accepted_lengths is not None for n in s.accepted_lengths]
    if lengths and all(s.accepted_lengths is not None for s in samples):
        return sum(lengths) / len(lengths)
    if any(s.decode_passes is None for s in samples):
        return None
    passes = sum(s.decode_passes for s in samples)
    decoded = sum(max(s.new_tokens - 1, 0) for s in samples)
    return decoded / passes if passes else None


def first_mismatch(expected: list[int], got: list[int]) -> int | None:
    """Index of the first differing token (or the shorter length when one is a prefix); None if equal."""
    if expected == got:
        return None
    for i, (a, b) in enumerate(zip(expected, got)):
        if a != b:
            return i
    return min(len(expected), len(got))


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _phase_ms(records: list[RunRecord]) -> dict | None:
    timed = [r for r in records if r.phase_seconds and r.decode_passes]
    if not timed:
        return None
    passes = sum(r.decode_passes for r in timed)
    phases = sorted({p for r in timed for p in r.phase_seconds})
    return {p: 1000 * sum(r.phase_seconds.get(p, 0.0) for r in timed) / passes for p in phases}


def summarize(records: list[RunRecord], method_names: list[str], greedy: dict[str, bool] | None = None,
              decode: Callable[[list[int]], str] | None = None,
              text: Callable[[list[int]], str] | None = None,
              references: dict[str, str] | None = None) -> dict[str, dict]:
    """Per-method figures (the `methods` block of results.json).

    `decode` shows the tokens around a mismatch; `text` turns an output into the text BLEU scores (special
    tokens dropped, as stored in each run's `text`); without it BLEU is not computed. `references` names, per
    method, the plain-decoding method its tokens are checked against (default `ar`): exactness holds within
    one dtype, so a bf16 tree is checked against bf16 plain decoding.
    """
    references = references or {}
    greedy = greedy or {}
    samples = fold_repeats(records)
    by_method_records: dict[str, list[RunRecord]] = defaultdict(list)
    for r in records:
        by_method_records[r.method].append(r)
    tps = {m: throughput(samples.get(m, [])) for m in method_names}
    baselines = {name: {s.key: s for s in samples.get(name, [])} for name in (HF_BASELINE, AR_BASELINE)}
    out: dict[str, dict] = {}
    for name in method_names:
        mine = samples.get(name, [])
        runs = by_method_records.get(name, [])
        summary: dict = {
            "prompts": len(mine),
            "runs": len(runs),
            "new_tokens": sum(s.new_tokens for s in mine),
            "wall_seconds": sum(s.wall_seconds for s in mine),
            "tokens_per_second": tps[name],
            "tokens_per_second_per_prompt": spread([s.tokens_per_second for s in mine]),
            "speedup_vs_hf": _ratio(tps[name], tps.get(HF_BASELINE)) if HF_BASELINE in method_names else None,
            "speedup_vs_ar": _ratio(tps[name], tps.get(AR_BASELINE)) if AR_BASELINE in method_names else None,
        }
        # Paired per-prompt ratios: machine noise that hits one prompt's round hits both sides of the ratio.
        for base in (HF_BASELINE, AR_BASELINE):
            paired = [s.tokens_per_second / baselines[base][s.key].tokens_per_second for s in mine
                      if s.key in baselines[base] and baselines[base][s.key].tokens_per_second > 0]
            summary[f"speedup_vs_{base}_per_prompt"] = spread(paired) if base in method_names else {}
        lengths = [n for s in mine if s.accepted_lengths is not None for n in s.accepted_lengths]
        passes = [s.decode_passes for s in mine]
        summary["decode_passes"] = sum(passes) if mine and None not in passes else None
        summary["mean_accepted_per_pass"] = mean_accepted(mine) if mine else None
        summary["passes_source"] = ("decoder" if mine and all(s.accepted_lengths is not None for s in mine)
                                    else "forward calls" if summary["decode_passes"] is not None else None)
        summary["accepted_histogram"] = ({str(k): v for k, v in sorted(Counter(lengths).items())}
                                         if summary["passes_source"] == "decoder" else None)
        summary["phase_ms_per_pass"] = _phase_ms(runs)
        prefill = [r.prefill_seconds for r in runs if r.prefill_seconds is not None]
        summary["prefill_ms_mean"] = 1000 * statistics.fmean(prefill) if prefill else None
        peaks = [r.peak_memory_bytes for r in runs if r.peak_memory_bytes is not None]
        deltas = [r.run_memory_bytes for r in runs if r.run_memory_bytes is not None]
        summary["peak_memory_bytes"] = max(peaks) if peaks else None
        summary["run_memory_bytes"] = max(deltas) if deltas else None
        summary["repeats_agree"] = all(s.repeats_agree for s in mine)
        summary["early_prune"] = _early_prune(runs)
        reference_name = references.get(name, AR_BASELINE)
        reference = {s.key: s for s in samples.get(reference_name, [])}
        summary.update(_exactness(mine, reference, greedy.get(name, True),
                                  all(r.reference_exact for r in runs), name, decode, reference_name))
        summary.update(bleu_vs_reference(mine, reference, text))
        summary["by_category"] = _by_category(mine, samples, method_names)
        out[name] = summary
    return out


PRUNE_TOTALS = ("passes", "nodes", "pruned", "misses", "overhead_seconds", "late_seconds", "measured_passes",
                "full_late_seconds", "lost_tokens", "lost_counted")


def _early_prune(records: list[RunRecord]) -> dict | None:
    """Early pruning's totals over a method's runs and the per-pass figures they give (None: no pruning)."""
    pruned = [r.early_prune for r in records if r.early_prune]
    if not pruned:
        return None
    totals = {key: sum(p[key] for p in pruned) for key in PRUNE_TOTALS}
    return {"layer": pruned[0]["layer"], "k": pruned[0]["k"], "vocab": pruned[0]["vocab"],
            "head": pruned[0].get("head", "lens"), **totals,
            **summarize_prune(totals)}


def _exactness(mine: list[Sample], reference: dict, is_greedy: bool, reference_exact: bool, name: str,
               decode: Callable[[list[int]], str] | None, reference_name: str = AR_BASELINE) -> dict:
    if not reference or not is_greedy or not reference_exact:
        why = (f"no {reference_name} run to compare with" if not reference else "not a greedy method" if not is_greedy
               else f"other numerics than {reference_name} (e.g. quantised weights): compared by BLEU, not token "
               "for token")
        return {"exact_match_rate": None, "exact_matches": None, "exact_compared": 0, "mismatches": [],
                "exactness_note": why}
    matches, compared, mismatches = 0, 0, []
    for s in mine:
        ref = reference.get(s.key)
        if ref is None:
            continue
        compared += 1
        pos = first_mismatch(ref.token_ids, s.token_ids)
        if pos is None:
            matches += 1
            continue
        miss = {"prompt_id": s.key[0], "turn": s.key[1], "position": pos,
                "ar_token": ref.token_ids[pos] if pos < len(ref.token_ids) else None,
                "method_token": s.token_ids[pos] if pos < len(s.token_ids) else None,
                "ar_length": len(ref.token_ids), "method_length": len(s.token_ids)}
        if decode is not None:
            context = ref.token_ids[max(pos - 8, 0): pos]
            miss.update(context_text=decode(context),
                        ar_text=decode(ref.token_ids[pos: pos + 8]), method_text=decode(s.token_ids[pos: pos + 8]))
        mismatches.append(miss)
    return {"exact_match_rate": matches / compared if compared else None, "exact_matches": matches,
            "exact_compared": compared, "mismatches": mismatches,
            "exactness_note": f"{name} vs {reference_name}, token for token"}


def bleu_vs_reference(mine: list[Sample], reference: dict, text: Callable[[list[int]], str] | None) -> dict:
    """Corpus BLEU (sacrebleu) of a method's outputs against greedy `ar`'s outputs on the same prompt turns.

    100 for a token-exact method; for a sampling method it says how far its answers drift from the greedy
    ones (compare with plain sampling, `ar:temperature=T`, which drifts by design); for a peer on other
    numerics (`llama-cpp`) it is the only comparison with `ar`.
    """
    if text is None or not reference:
        why = "no ar run to compare with" if not reference else "no tokenizer to turn outputs into text"
        return {"bleu_vs_ar": None, "bleu_compared": 0, "bleu_note": why}
    pairs = [(text(s.token_ids), text(reference[s.key].token_ids)) for s in mine if s.key in reference]
    if not pairs:
        return {"bleu_vs_ar": None, "bleu_compared": 0, "bleu_note": "no prompt in common with ar"}
    hypotheses, references = zip(*pairs)
    return {"bleu_vs_ar": corpus_bleu(list(hypotheses), list(references)), "bleu_compared": len(pairs),
            "bleu_note": "sacrebleu corpus BLEU of the outputs (first repeat) against greedy ar's"}


def _by_category(mine: list[Sample], samples: dict[str, list[Sample]], method_names: list[str]) -> dict:
    categories = sorted({s.category for s in mine if s.category is not None})
    out = {}
    for cat in categories:
        own = throughput([s for s in mine if s.category == cat])
        row = {"prompts": sum(1 for s in mine if s.category == cat), "tokens_per_second": own}
        for base in (HF_BASELINE, AR_BASELINE):
            if base in method_names:
                row[f"speedup_vs_{base}"] = _ratio(own, throughput([s for s in samples.get(base, [])
                                                                      if s.category == cat]))
            else:
                row[f"speedup_vs_{base}"] = None
        out[cat] = row
    return out
