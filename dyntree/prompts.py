"""Prompt files, read in one place: every command and script that takes prompts reads them here.

A prompt file is JSONL (one object per line: MT-Bench `turns`, or `prompt` / `question` / `instruction`, with a
self-instruct `input` or `instances`, / `text`) or plain text with one prompt per line. `mtbench` names the
packaged MT-Bench questions and `builtin` a small built-in set, so that `dyntree bench` runs with no files.
`read_rows` turns a file into numbered rows (every error names the file and the line). A row is then read in
one of two ways, by what it is for:
- `load_prompts`: conversations to benchmark (`BenchPrompt`: every turn, the row's id and category);
- `prompt_texts`: the prompts a row offers to training and calibration (the first turn; one prompt per
  non-empty input of a self-instruct row).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .data import mt_bench_path
from .errors import DynTreeError
from .jsonl import read_jsonl_objects, read_lines

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


def source_path(source: str | os.PathLike) -> Path:
    """The file a prompt source names: `mtbench`, `builtin` or a path."""
    if str(source) == MTBENCH:
        return mt_bench_path()
    return builtin_prompts_path() if str(source) == BUILTIN else Path(source).expanduser()


def read_rows(source: str | os.PathLike) -> list[tuple[int, dict]]:
    """`(line number, row)` for every non-blank line of a prompt file (or `mtbench` / `builtin`). A file not
    named `.jsonl` whose first line is not a JSON object holds one prompt per line (`{"prompt": line}`)."""
    path = source_path(source)
    if path.suffix.lower() != ".jsonl" and path.is_file():
        lines = read_lines(path)
        if lines and not lines[0][1].lstrip().startswith("{"):
            return [(number, {"prompt": line.strip()}) for number, line in lines]
    return read_jsonl_objects(path)


PROMPT_FIELDS = ("turns", "question", "instruction", "prompt", "text")


def prompt_texts(row: dict) -> list[str]:
    """The prompts one row offers to training and calibration: MT-Bench `turns` (the first), `question`,
    `instruction` (+ `instances[].input`, one prompt each), `prompt`, `text`; ValueError when it has none."""
    if "turns" in row:
        turns = row["turns"]
        if not isinstance(turns, list) or not turns or not isinstance(turns[0], str):
            raise ValueError("`turns` must be a non-empty list of strings")
        return [turns[0]]
    if "question" in row:
        return [row["question"]]
    if "instruction" in row:
        instruction = row["instruction"]
        if not isinstance(instruction, str):
            raise ValueError("`instruction` must be a string")
        inputs = [inst.get("input", "") for inst in row.get("instances") or [] if isinstance(inst, dict)]
        inputs = [i for i in inputs if isinstance(i, str) and i.strip()]
        return [f"{instruction}\n\n{i}" for i in inputs] if inputs else [instruction]
    for name in ("prompt", "text"):
        if name in row:
            return [row[name]]
    raise ValueError(f"no prompt field (expected one of: {', '.join(PROMPT_FIELDS)})")


def texts_of(rows: list[tuple[int, dict]], source: str | os.PathLike) -> list[str]:
    """Every prompt of `rows` (`prompt_texts`, stripped, blanks dropped), in file order; a line-numbered error
    for a row without one, and an error when there are none."""
    texts = []
    for number, row in rows:
        try:
            found = prompt_texts(row)
        except ValueError as exc:
            raise DynTreeError(f"{source}:{number}: {exc}") from None
        for text in found:
            if not isinstance(text, str):
                raise DynTreeError(f"{source}:{number}: prompt is {type(text).__name__}, expected a string")
            if text.strip():
                texts.append(text.strip())
    if not texts:
        raise DynTreeError(f"{source} holds no prompts")
    return texts


def read_prompt_texts(source: str | os.PathLike) -> list[str]:
    """Every prompt of a prompt file, as training and calibration read it (`prompt_texts`)."""
    return texts_of(read_rows(source), source_path(source))


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
    """Conversations to benchmark from a prompt file, `mtbench` or `builtin` (the default).

    `per_category` keeps the first N prompts of every category: a balanced subset of a file sorted by
    category, such as MT-Bench's, where `limit` alone would cover one or two categories. `limit` then keeps
    the first N of what is left.
    """
    if limit is not None and limit < 1:
        raise DynTreeError("--limit must be at least 1")
    if per_category is not None and per_category < 1:
        raise DynTreeError("--per-category must be at least 1")
    path = source_path(source)
    prompts: list[BenchPrompt] = []
    seen_ids: set[str] = set()
    taken: dict[str | None, int] = {}
    for line_no, row in read_rows(path):
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
