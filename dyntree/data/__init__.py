"""Data the package ships beside its code: MT-Bench's 80 questions, the standard prompt set of `dyntree bench`,
`dyntree quality` and the benchmark scripts. It is what we measure on, so the training prompt readers refuse
it (dyntree/training/prompts.py). `dyntree.prompts` reads it."""

from __future__ import annotations

from pathlib import Path

MT_BENCH_FILE = "mt_bench_questions.jsonl"


def mt_bench_path() -> Path:
    """The packaged MT-Bench questions (`question_id`, `category`, two user `turns` per row)."""
    # Beside the code rather than through importlib.resources, as prompts.py does for the built-in set.
    return Path(__file__).resolve().parent / MT_BENCH_FILE
