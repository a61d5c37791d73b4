"""The first-token KL of the bench's sampling methods, measured after the timed runs.

It is the estimate of `dyntree quality` (dyntree/eval/quality.py; defined in docs/sampling.md, "First-tree-token
KL"), reused as is: on a few fixed contexts (the first prompts' first turns, each followed by the model's
greedy next token as the tree root), the token a method emits right after the root is drawn `S` times by
replaying only its verification on one tree forward, and KL(p_hat || p) against the model's own sampling
distribution p (same temperature / top-p / top-k) is averaged over the contexts. Next to it: the floor, the
same estimate for `S` draws straight from p. A lossless method sits on the floor; a biased one above it.

A method takes part when it samples and can replay its verification (`first_token_kl`); greedy methods get
null fields (nothing to measure: greedy output is checked token for token instead).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # the bench package imports this module: no import back at run time
    from ..bench.methods import BenchMethod

DEFINITION = "docs/sampling.md, First-tree-token KL"


def measures_kl(method: BenchMethod) -> bool:
    """Whether the method samples and can replay its verification on a fixed context."""
    return getattr(method, "sampling", None) is not None and callable(getattr(method, "first_token_kl", None))


def kl_context_ids(inputs: dict, count: int) -> list[tuple[str, list[int]]]:
    """(prompt_id, token ids) of the first `count` prompts' first turns, in run order (deterministic)."""
    firsts = [(pid, value["token_ids"]) for (pid, turn), value in inputs.items() if turn == 1]
    return firsts[:count]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def not_measured(method: BenchMethod, num_samples: int) -> dict:
    if getattr(method, "sampling", None) is None and getattr(method, "greedy", True):
        why = "greedy: not applicable (its output is checked token for token against ar)"
    elif num_samples == 0:
        why = "not measured (--kl-samples 0)"
    else:
        why = "not measured: this method cannot replay its verification"
    return {"kl": None, "kl_floor": None, "kl_samples": 0, "kl_contexts": 0, "kl_by_context": [], "kl_note": why}


def measure_first_token_kl(methods: list[BenchMethod], inputs: dict, num_samples: int, num_contexts: int,
                           progress: Callable[[str], None] | None = None) -> dict[str, dict]:
    """KL fields for every method (the `kl*` keys of each method in results.json)."""
    contexts = kl_context_ids(inputs, num_contexts)
    out = {}
    for method in methods:
        if num_samples == 0 or not contexts or not measures_kl(method):
            out[method.name] = not_measured(method, num_samples)
            continue
        if progress:
            progress(f"KL {method.name}: {len(contexts)} contexts x {num_samples} samples")
        estimate = method.first_token_kl([ids for _, ids in contexts], num_samples)
        by_context = [{"prompt_id": pid, "kl": _finite(kl), "floor": _finite(floor)}
                      for (pid, _), kl, floor in zip(contexts, estimate.method_kl, estimate.floor_kl)]
        mean = _finite(estimate.mean)
        note = (f"first-tree-token KL(p_hat || p) in nats, mean over {len(contexts)} contexts x {num_samples} "
                f"samples; floor: the same for direct draws from p ({DEFINITION})")
        if mean is None:
            note = "infinite: the method emitted a token the model's sampling distribution excludes"
        out[method.name] = {"kl": mean, "kl_floor": _finite(estimate.floor), "kl_samples": num_samples,
                            "kl_contexts": len(contexts), "kl_by_context": by_context, "kl_note": note}
    return out
