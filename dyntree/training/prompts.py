"""Prompts for self-distillation: prompt files (read by `dyntree.prompts`), and self-written prompts.

Supported rows (one JSON object per line, or plain text lines): MT-Bench style `turns` (the first turn is
used), `question` (GSM8K), `instruction` with optional `instances[].input` (self-instruct; one prompt per
non-empty input), and plain `prompt` / `text` (`dyntree.prompts.prompt_texts`). MT-Bench itself is our benchmark and is refused: by its file name, by its rows'
fields, and by its questions (the package ships them, dyntree/data/), so a converted copy is refused too.

Self-prompts follow Magpie: an instruct model given only its chat template's user-turn prefix writes a
plausible user query, so heads can be trained without any external data.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ..errors import DynTreeError
from ..prompts import MTBENCH, load_prompts, read_rows, texts_of
_MT_BENCH_KEYS = {"question_id", "category", "turns"}
_SENTINEL = "\x00DYNTREE_USER_TURN\x00"


@dataclass(frozen=True)
class Prompt:
    """A user message and where it came from; `key` identifies it across resumed runs."""

    text: str
    source: str

    @property
    def key(self) -> str:
        return hashlib.sha1(self.text.encode("utf-8")).hexdigest()[:16]


def looks_like_benchmark(path: Path, rows: list[dict]) -> bool:
    """MT-Bench is what we measure on: training on it would inflate every reported number."""
    name = path.name.lower().replace("-", "_")
    if "mt_bench" in name:
        return True
    return bool(rows) and all(_MT_BENCH_KEYS <= set(r) for r in rows)


@cache
def mt_bench_turns() -> frozenset[str]:
    """Every user turn of the packaged MT-Bench, stripped as prompts are."""
    return frozenset(turn.strip() for prompt in load_prompts(MTBENCH) for turn in prompt.turns)


def read_prompt_file(path: str | Path) -> list[Prompt]:
    """All prompts of one prompt file (`dyntree.prompts`), in file order; a clear error for anything malformed
    or empty, and a refusal of the benchmark."""
    path = Path(path).expanduser()
    rows = read_rows(path)
    if looks_like_benchmark(path, [r for _, r in rows]):
        raise DynTreeError(f"{path} looks like MT-Bench, the benchmark: refusing to train on it")
    prompts = [Prompt(text, path.stem) for text in texts_of(rows, path)]
    leaked = [p.text for p in prompts if p.text in mt_bench_turns()]
    if leaked:
        raise DynTreeError(f"{path} holds {len(leaked)} MT-Bench question(s), the benchmark (the first: "
                           f"{leaked[0][:60]!r}): refusing to train on it")
    return prompts


def interleave(groups: list[list[Prompt]]) -> list[Prompt]:
    """Round-robin over sources (deduplicated), so a run stopped early still has a mix of all of them."""
    out: list[Prompt] = []
    seen: set[str] = set()
    longest = max((len(g) for g in groups), default=0)
    for i in range(longest):
        for group in groups:
            if i < len(group) and group[i].key not in seen:
                seen.add(group[i].key)
                out.append(group[i])
    return out


# -- Magpie-style self prompts -------------------------------------------------------------------------
def user_turn_prefix(tokenizer) -> list[int]:
    """Token ids of the chat template up to where a user's message would start."""
    if not getattr(tokenizer, "chat_template", None):
        raise DynTreeError("self-written prompts need an instruct model with a chat template")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                             add_generation_prompt=False)
    if _SENTINEL not in rendered:
        raise DynTreeError("cannot find the user turn in this model's chat template")
    prefix = rendered[: rendered.index(_SENTINEL)]
    ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DynTreeError("this model's chat template has an empty user-turn prefix")
    return list(ids)


_WORD = re.compile(r"\w+")


def clean_self_prompt(text: str, min_words: int = 3, max_chars: int = 1500) -> str | None:
    """The query, or None when it is empty, too short/long, repetitive or leaks template markup."""
    text = text.strip()
    if not text or len(text) > max_chars or "<|" in text or "|>" in text:
        return None
    words = _WORD.findall(text.lower())
    if len(words) < min_words:
        return None
    if len(words) >= 12 and len(set(words)) / len(words) < 0.4:  # loops like "the the the ..."
        return None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) >= 4 and len(set(lines)) / len(lines) < 0.5:
        return None
    return text
