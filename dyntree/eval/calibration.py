"""Calibration for dynamic trees: how often each head's guesses are accepted, measured by decoding prompts.

`dyntree calibrate` reads its prompts with `read_prompts` and decodes them with `collect_acceptance_stats`;
the statistics it writes start the calibrated node scores (`--tree-score rank|binned --tree-calibration`).
Calibration prompts must not be the benchmark's: rates measured on MT-Bench would flatter every MT-Bench run.
"""

from __future__ import annotations

from ..errors import DynTreeError
from ..prompts import read_prompt_texts
from ..proposers import DynamicTreeProposer
from ..trees.acceptance import AcceptanceStats


def read_prompts(path: str, limit: int) -> list[str]:
    """Up to `limit` prompts of a prompt file (`dyntree.prompts.read_prompt_texts`: JSONL rows as `dyntree
    distill` reads them, or one prompt per line)."""
    return read_prompt_texts(path)[:limit]


def collect_acceptance_stats(dt, prompts, max_new_tokens: int = 64, tree_size: int = 32, topk: int = 10,
                             stats: AcceptanceStats | None = None, progress=None) -> AcceptanceStats:
    """Decode `prompts` (text or ids) with a learning dynamic tree on `dt` (a `DynTree`) and return its table.

    Use prompts that are not the benchmark's. A wide tree sees more (depth, rank) cells per step.
    """
    if dt.heads.conditional:
        raise DynTreeError(f"acceptance tables calibrate Medusa heads' per-rank guesses; {dt.heads.config.head_type} "
                           "heads score nodes by their path probabilities, which need no calibration")
    # Heads only (every node then teaches the table), at tree temperature 1: the probability bins must be
    # those that the calibrated scores ("rank", "binned", tree temperature 1 by default) look up.
    proposer = DynamicTreeProposer(dt.heads.num_heads, topk=topk, size=tree_size, calibration=stats, learn=True,
                                   lookup=0, tree_temperature=1.0)
    for i, prompt in enumerate(prompts):
        dt.decoder(proposer).run([dt.encode(prompt)], max_new_tokens).consume()
        if progress is not None:
            progress(i + 1, len(prompts))
    return proposer.stats
