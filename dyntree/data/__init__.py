"""Data the package ships beside its code: MT-Bench's 80 questions, the standard prompt set of `dyntree bench`,
`dyntree quality` and the benchmark scripts. It is what we measure on, so the training prompt readers refuse
it (dyntree/training/prompts.py)."""

from __future__ import annotations

from pathlib import Path

MT_BENCH_FILE = "mt_bench_questions.jsonl"


def mt_bench_path() -> Path:
    """The packaged MT-Bench questions (`question_id`, `category`, two user `turns` per row)."""
    # Beside the code rather than through importlib.resources, as bench/prompts.py does for its built-in set.
    return Path(__file__).resolve().parent / MT_BENCH_FILE


def mt_bench_first_turns(limit: int | None = None) -> list[str]:
    """The first user turn of the first `limit` MT-Bench questions (all 80 when None), in file order."""
    from ..bench.prompts import load_prompts  # the one reader of prompt files, with its line-numbered errors

    return [p.turns[0] for p in load_prompts(mt_bench_path(), limit=limit)]
