"""Benchmark prompts: JSONL files (MT-Bench `turns`, or `prompt` / `question` / `instruction` rows) or the
small built-in set, so that `dyntree bench` runs with no files at all."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .data import mt_bench_path
from .errors import DynTreeError
from .jsonl import read_jsonl_objects

BUILTIN = "builtin"
MTBENCH = "mtbench"  # MT-Bench's 80 questions, shipped in dyntree/data (the standard benchmark set)
BUILTIN_FILE = "bench_prompts.jsonl"
TEXT_FIELDS = ("prompt", "question", "instruction")


@dataclass(frozen=True)
class BenchPrompt:
    """One conversation to benchmark: its user turns (the second continues the first answer)."""

    prompt_id: str
    category: str | None
    turns: tuple[str, ...]


def builtin_prompts_path() -> Path:
    # Beside the code rather than through importlib.resources: `dyntree` is a namespace package, which
    # resources cannot always resolve when a checkout and an install both provide it.
    return Path(__file__).resolve().parent / "assets" / BUILTIN_FILE


def _row_to_prompt(row: dict, line_no: int, source: str) -> BenchPrompt:
    if not isinstance(row, dict):
        raise DynTreeError(f"{source}:{line_no}: expected a JSON object per line")
    if "turns" in row:
        turns = row["turns"]
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise DynTreeError(f"{source}:{line_no}: 'turns' must be a non-empty list of non-empty strings")
    else:
        field = next((f for f in TEXT_FIELDS if f in row), None)
        if field is None or not isinstance(row[field], str) or not row[field].strip():
            raise DynTreeError(f"{source}:{line_no}: no prompt text (expected 'turns', 'prompt', 'question' or "
                               "'instruction')")
        text = row[field]
        # Self-instruct rows keep the task input apart from the instruction.
        extra = row.get("input")
        if extra is None and isinstance(row.get("instances"), list) and row["instances"]:
            first = row["instances"][0]
            extra = first.get("input") if isinstance(first, dict) else None
        if isinstance(extra, str) and extra.strip():
            text = f"{text}\n\n{extra}"
        turns = [text]
    prompt_id = next((row[k] for k in ("question_id", "id") if row.get(k) is not None), line_no)
    category = row.get("category")
    return BenchPrompt(str(prompt_id), str(category) if category is not None else None, tuple(turns))


def load_prompts(source: str | os.PathLike = BUILTIN, limit: int | None = None,
                 per_category: int | None = None) -> list[BenchPrompt]:
    """Read prompts from a JSONL file (or the built-in set).

    `per_category` keeps the first N prompts of every category: a balanced subset of a file sorted by
    category, such as MT-Bench's, where `limit` alone would cover one or two categories. `limit` then keeps
    the first N of what is left.
    """
    if limit is not None and limit < 1:
        raise DynTreeError("--limit must be at least 1")
    if per_category is not None and per_category < 1:
        raise DynTreeError("--per-category must be at least 1")
    if str(source) == MTBENCH:
        path = mt_bench_path()
    else:
        path = builtin_prompts_path() if str(source) == BUILTIN else Path(source).expanduser()
    prompts: list[BenchPrompt] = []
    seen_ids: set[str] = set()
    taken: dict[str | None, int] = {}
    for line_no, row in read_jsonl_objects(path):
        prompt = _row_to_prompt(row, line_no, str(path))
        if prompt.prompt_id in seen_ids:
            raise DynTreeError(f"{path}:{line_no}: prompt id {prompt.prompt_id!r} is used twice")
        seen_ids.add(prompt.prompt_id)
        if per_category is not None and taken.get(prompt.category, 0) >= per_category:
            continue
        taken[prompt.category] = taken.get(prompt.category, 0) + 1
        prompts.append(prompt)
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise DynTreeError(f"{path} holds no prompts")
    return prompts


def mt_bench_first_turns(limit: int | None = None) -> list[str]:
    """The first user turn of the first `limit` MT-Bench questions (all 80 when None), in file order."""
    return [p.turns[0] for p in load_prompts(mt_bench_path(), limit=limit)]


def conversation(prompt: BenchPrompt, turn: int, earlier_answers: list[str]) -> list[dict]:
    """Chat messages for turn `turn` (0-based): earlier user turns with the answers given to them."""
    messages: list[dict] = []
    for i in range(turn):
        messages.append({"role": "user", "content": prompt.turns[i]})
        messages.append({"role": "assistant", "content": earlier_answers[i]})
    messages.append({"role": "user", "content": prompt.turns[turn]})
    return messages


def raw_text(prompt: BenchPrompt, turn: int, earlier_answers: list[str]) -> str:
    """Without a chat template: the turns and answers joined as plain text."""
    parts: list[str] = []
    for i in range(turn):
        parts += [prompt.turns[i], earlier_answers[i]]
    parts.append(prompt.turns[turn])
    return "\n\n".join(parts)
