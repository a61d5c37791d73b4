"""Token ids to streamed text: what the API's `stream` and the server's streaming both show, and when.

A forward pass may accept several tokens or half a character. The text shown so far must never change, so
a delta is held back while the text ends in an incomplete UTF-8 sequence, or in a tail that could still grow
into a stop string; the first stop string ends the stream, and only the tokens needed to produce it count.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TextDelta:
    """Text to show now and the token ids it came from (every id exactly once over a stream)."""

    text: str
    token_ids: list[int]


class TextStream:
    """Feed it each pass's new token ids (`push`); it answers with what may be shown."""

    def __init__(self, tokenizer, stops: list[str] | tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stops = list(stops)
        self.tokens: list[int] = []
        self.text = ""  # shown so far
        self.stopped = False  # a stop string was reached
        self._emitted = 0  # tokens already handed out in deltas

    def push(self, new_ids: list[int], finished: bool = False) -> TextDelta | None:
        """Add a pass's tokens; returns a delta with new visible text (or, once `finished` or stopped, the
        last ids even without text), else None while text is held back."""
        if self.stopped:
            return None
        before = len(self.tokens)
        self.tokens.extend(new_ids)
        text = self._decode(self.tokens)
        cut = find_stop(text, self.stops) if self.stops else -1
        if cut >= 0:
            for k in range(before + 1, len(self.tokens) + 1):  # the fewest tokens that produce the stop
                if find_stop(self._decode(self.tokens[:k]), self.stops) >= 0:
                    del self.tokens[k:]
                    break
            text, self.stopped = text[:cut], True
        elif not finished:
            if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
                return None
            text = text[: len(text) - held_back(text, self.stops)]
        if len(text) <= len(self.text) and not (finished or self.stopped):
            return None
        delta = TextDelta(text[len(self.text):], self.tokens[self._emitted:])
        self.text = text if len(text) > len(self.text) else self.text
        self._emitted = len(self.tokens)
        return delta

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


def find_stop(text: str, stops: list[str]) -> int:
    """Where the earliest stop string starts in `text`, or -1."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string (not shown yet)."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest
