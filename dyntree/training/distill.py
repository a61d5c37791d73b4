"""Batched generation on the library's decoding step, and the self-distillation run built on it.

`generate_batched` keeps `batch_size` sequences in flight on one `KVCache` with per-sequence lengths: every
step is one plain-decoding `step.DecodeStep` (the library's and the server's step, with root-only trees) over
the batch, and a row whose sequence finished is refilled with the next prompt at once (continuous batching),
so the batch stays full until the prompts run out; then finished rows are dropped from the cache. Each step
already yields the backbone's final normed hidden state for every sequence, which is exactly what head
training needs, so it is kept (fp16) instead of recomputed later.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from ..errors import DynTreeError
from ..model import KVCache, Transformer
from ..sampling import Sampler, SamplingConfig
from ..step import DecodeStep, StepRows, prefill, take_tokens
from .dataset import DistillDataset, Sequence, model_fingerprint
from ..prompts import prompt_texts, read_rows
from .prompts import Prompt, clean_self_prompt, interleave, looks_like_benchmark, read_prompt_file, user_turn_prefix


@dataclass
class Completion:
    tag: object
    prompt_ids: list[int]
    response_ids: list[int]
    hidden: torch.Tensor | None  # [len(response_ids), H] fp16: state that predicted each response token
    finished_by_eos: bool


@dataclass
class Sampling:
    """Greedy when temperature == 0 (the default: heads then learn the model's own greedy continuations)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        _ = self.config  # bad values are a DynTreeError here, where they are given

    @property
    def config(self) -> SamplingConfig:
        """The library's sampling settings: the model's own distribution means one thing everywhere."""
        return SamplingConfig(temperature=self.temperature, top_p=self.top_p, seed=self.seed)


class _Row:
    __slots__ = ("tag", "prompt", "response", "hidden", "state", "root")

    def __init__(self, tag, prompt: list[int]):
        self.tag, self.prompt, self.response, self.hidden = tag, prompt, [], []
        self.state: torch.Tensor | None = None  # the normed state that chose `root`
        self.root = 0  # the last token, next step's input


@torch.inference_mode()
def generate_batched(backbone: Transformer, prompts: Iterable[tuple[object, list[int]]], max_new_tokens: int,
                     batch_size: int = 16, sampling: Sampling | None = None, keep_hidden: bool = True,
                     eos_token_ids: Iterable[int] | None = None) -> Iterator[Completion]:
    """Yield a `Completion` for each `(tag, prompt_ids)` as soon as it finishes (not in input order)."""
    sampling = sampling or Sampling()
    eos = set(eos_token_ids if eos_token_ids is not None else backbone.config.eos_token_ids)
    device = backbone.device
    sampler = Sampler(sampling.config, device)  # one generator for the run: a seed reproduces it
    step = DecodeStep(backbone)
    pending = iter(prompts)
    limit = backbone.config.max_position_embeddings
    rows: list[_Row | None] = []
    cache: KVCache | None = None

    def next_prompt() -> tuple[object, list[int]] | None:
        for tag, ids in pending:
            if ids and len(ids) + max_new_tokens <= limit:
                return tag, list(ids)
        return None

    # The cache is sized for the longest prompt seen so far; grow it (rarely) when a longer one arrives.
    def ensure_capacity(prompt_len: int) -> None:
        nonlocal cache
        need = prompt_len + max_new_tokens + 1
        if cache is not None and need <= cache.max_len:
            return
        new = backbone.new_cache(batch_size, max(need, 256 + max_new_tokens))
        if cache is not None:
            new.keys[:, : cache.batch_size, :, : cache.max_len] = cache.keys
            new.values[:, : cache.batch_size, :, : cache.max_len] = cache.values
            new.lengths[: cache.batch_size] = cache.lengths
        cache = new

    def emit(b: int, tokens: list[int], state: torch.Tensor) -> Completion | None:
        """Row b takes its new token (plain decoding: one a step), chosen from `state`."""
        row = rows[b]
        taken, reason = take_tokens(len(row.response), tokens, max_new_tokens, eos)
        row.response += taken
        if keep_hidden:
            row.hidden.append(state.to(torch.float16))
        row.state, row.root = state, taken[-1]
        if reason:
            hidden = torch.stack(row.hidden).cpu() if keep_hidden else None
            rows[b] = None
            return Completion(row.tag, row.prompt, row.response, hidden, reason == "eos")
        return None

    def fill(b: int) -> list[Completion]:
        """Prefill prompts into row b until one is still running there (or the prompts are exhausted)."""
        done = []
        while rows[b] is None:
            item = next_prompt()
            if item is None:
                return done
            tag, ids = item
            ensure_capacity(len(ids))
            rows[b] = _Row(tag, ids)
            last = prefill(backbone, cache.rows(b, 1, fresh=True), [ids])
            cache.lengths[b] = len(ids)
            finished = emit(b, [int(sampler.choose(backbone.logits(last))[0])], last[0])
            if finished is not None:
                done.append(finished)
        return done

    def context(index: list[int]) -> list[list[int]]:
        return [rows[b].prompt + rows[b].response for b in index]

    ensure_capacity(1)
    rows = [None] * batch_size
    for b in range(batch_size):
        yield from fill(b)
    while True:
        active = [b for b, r in enumerate(rows) if r is not None]
        if not active:
            return
        if len(active) < cache.batch_size:  # prompts exhausted: drop finished rows from the batch
            cache = cache.select(torch.tensor(active, device=device))
            rows = [rows[b] for b in active]
        batch = len(rows)
        state = StepRows(torch.stack([r.state for r in rows]),
                         torch.tensor([r.root for r in rows], dtype=torch.long, device=device), context,
                         [sampler] * batch, torch.ones(batch, dtype=torch.bool, device=device))
        out = step.run(cache, state, [(step.plain, list(range(batch)))])
        if out is None:  # (cannot happen: every prompt leaves room for max_new_tokens)
            raise RuntimeError("a row has no room left in the cache")
        for b in range(batch):
            finished = emit(b, out.tokens[b], out.hidden[b])
            if finished is not None:
                yield finished
                yield from fill(b)


# -- the distillation run ------------------------------------------------------------------------------
def chat_ids(tokenizer, text: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids if isinstance(ids, list) else ids["input_ids"])
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def self_prompts(loaded, count: int, batch_size: int = 16, max_tokens: int = 96, temperature: float = 1.0,
                 top_p: float = 0.95, seed: int = 0, on_prompt: Callable[[Prompt], None] | None = None,
                 max_attempts_factor: int = 4, avoid: set[str] | None = None) -> list[Prompt]:
    """Magpie-style: sample user queries from the chat template's user-turn prefix; keep clean, unique ones."""
    tok = loaded.tokenizer
    prefix = user_turn_prefix(tok)
    end_ids = set(loaded.config.eos_token_ids)
    end_id = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else None
    if end_id is not None:
        end_ids.add(end_id)
    out: list[Prompt] = []
    seen: set[str] = {t.lower() for t in avoid or ()}
    attempts = max(count * max_attempts_factor, count + batch_size)

    def requests():
        for i in range(attempts):
            if len(out) >= count:
                return
            yield i, prefix

    sampling = Sampling(temperature, top_p, seed)
    for c in generate_batched(loaded.backbone, requests(), max_tokens, batch_size, sampling, keep_hidden=False,
                              eos_token_ids=end_ids):
        if len(out) >= count:
            break
        if not c.finished_by_eos:
            continue
        text = clean_self_prompt(tok.decode(c.response_ids[:-1], skip_special_tokens=True))
        if text is None or text.lower() in seen:
            continue
        seen.add(text.lower())
        out.append(Prompt(text, "self"))
        if on_prompt:
            on_prompt(out[-1])
        if len(out) >= count:  # stop at once rather than finishing the queries still in flight
            break
    return out


def load_prompts(files: list[str], limit_per_file: int | None = None) -> list[Prompt]:
    groups = [read_prompt_file(f)[:limit_per_file] if limit_per_file else read_prompt_file(f) for f in files]
    return interleave(groups)


def distill(loaded, out_dir, prompts: list[Prompt], max_new_tokens: int = 256, batch_size: int = 16,
            shard_size: int = 64, sampling: Sampling | None = None, store_hidden: bool = True,
            max_prompt_tokens: int = 512, max_response_tokens_total: int | None = None,
            progress: bool = True, shard_prefix: str = "") -> dict:
    """Generate the base model's own answers to `prompts` into a resumable sharded dataset at `out_dir`."""
    from tqdm.auto import tqdm

    sampling = sampling or Sampling()
    settings = {"store_hidden": store_hidden, "max_new_tokens": max_new_tokens,
                "dtype": str(loaded.backbone.dtype).removeprefix("torch."), "weights": loaded.weights,
                "sampling": {"temperature": sampling.temperature, "top_p": sampling.top_p, "seed": sampling.seed}}
    ds = DistillDataset.create_or_resume(out_dir, model_fingerprint(loaded), settings)
    done = ds.done_keys()
    have = ds.stats()["response_tokens"] if done else 0
    todo = [p for p in prompts if p.key not in done]
    tok = loaded.tokenizer
    encoded = []
    for p in todo:
        ids = chat_ids(tok, p.text)
        if len(ids) <= max_prompt_tokens:
            encoded.append((p, ids))
    budget = None if max_response_tokens_total is None else max_response_tokens_total - have
    stats = {"skipped_done": len(prompts) - len(todo), "skipped_long": len(todo) - len(encoded), "sequences": 0,
             "response_tokens": 0, "shards": 0, "seconds": 0.0}
    if not encoded or (budget is not None and budget <= 0):
        return stats
    generated = 0

    def feed():
        for p, ids in encoded:
            if budget is not None and generated >= budget:
                return
            yield p, ids

    bar = tqdm(total=budget if budget is not None else len(encoded), unit="tok" if budget is not None else "prompt",
               disable=not progress, dynamic_ncols=True, desc="distill")
    buffer: list[Sequence] = []
    start = time.perf_counter()
    try:
        for c in generate_batched(loaded.backbone, feed(), max_new_tokens, batch_size, sampling,
                                  keep_hidden=store_hidden):
            p: Prompt = c.tag
            buffer.append(Sequence(p.key, p.source, c.prompt_ids, c.response_ids, c.hidden))
            generated += len(c.response_ids)
            stats["sequences"] += 1
            stats["response_tokens"] += len(c.response_ids)
            elapsed = time.perf_counter() - start
            bar.update(len(c.response_ids) if budget is not None else 1)
            bar.set_postfix(tok_s=f"{generated / max(elapsed, 1e-9):.0f}", total_tok=have + generated)
            if len(buffer) >= shard_size:
                ds.write_shard(buffer, shard_prefix)
                stats["shards"] += 1
                buffer = []
    except KeyboardInterrupt:
        if buffer:  # the finished sequences are complete: keep them
            ds.write_shard(buffer, shard_prefix)
        raise
    else:
        if buffer:
            ds.write_shard(buffer, shard_prefix)
            stats["shards"] += 1
    finally:
        bar.close()
    stats["seconds"] = time.perf_counter() - start
    return stats


# -- teacher-forced: existing prompt + answer text, forward passes only ------------------------------------
RESPONSE_FIELDS = ("response", "answer", "output", "completion")


@dataclass
class TextPair:
    """A prompt and an existing answer to it; `key` identifies the pair across resumed runs."""

    prompt: str
    response: str
    source: str

    @property
    def key(self) -> str:
        return hashlib.sha1((self.prompt + "\x00" + self.response).encode("utf-8")).hexdigest()[:16]


def read_text_pairs(path) -> list[TextPair]:
    """(prompt, response) pairs of a JSONL file: any prompt field `read_prompt_file` knows, plus a response in
    one of `RESPONSE_FIELDS`. A clear error for rows without one; MT-Bench is refused like everywhere else."""
    path = Path(path).expanduser()
    rows = read_rows(path)
    if looks_like_benchmark(path, [r for _, r in rows]):
        raise DynTreeError(f"{path} looks like MT-Bench, the benchmark: refusing to train on it")
    pairs = []
    for number, row in rows:
        response = next((row[f] for f in RESPONSE_FIELDS if isinstance(row.get(f), str) and row[f].strip()), None)
        if response is None:
            raise DynTreeError(f"{path}:{number}: no response text (one of {', '.join(RESPONSE_FIELDS)})")
        try:
            texts = prompt_texts({k: v for k, v in row.items() if k not in RESPONSE_FIELDS})
        except ValueError as exc:
            raise DynTreeError(f"{path}:{number}: {exc}") from exc
        pairs.append(TextPair(texts[0], response, path.stem))
    if not pairs:
        raise DynTreeError(f"{path} holds no prompt/response rows")
    return pairs


@torch.inference_mode()
def teacher_forced(loaded, out_dir, pairs: list[TextPair], batch_size: int = 8, shard_size: int = 64,
                   max_tokens: int = 1024, progress: bool = True, shard_prefix: str = "") -> dict:
    """Write existing prompt + answer text as a dataset: one forward pass per batch of sequences gives the
    state before every answer token, with no decoding. The answer tokens are the text's, not the model's
    greedy choices, so train such data with `--soft-targets` (the backbone's own distribution at each state)
    when it should teach the model's behaviour rather than the text's."""
    from tqdm.auto import tqdm

    tok = loaded.tokenizer
    backbone = loaded.backbone
    settings = {"store_hidden": True, "max_new_tokens": max_tokens, "teacher_forced": True,
                "dtype": str(backbone.dtype).removeprefix("torch.")}
    ds = DistillDataset.create_or_resume(out_dir, model_fingerprint(loaded), settings)
    done = ds.done_keys()
    eos = loaded.config.eos_token_ids[:1]
    todo = []
    for pair in pairs:
        if pair.key in done:
            continue
        ids = chat_ids(tok, pair.prompt)
        answer = list(tok(pair.response, add_special_tokens=False)["input_ids"]) + list(eos)
        if len(ids) + len(answer) <= max_tokens and len(answer) >= 2:
            todo.append((pair, ids, answer))
    stats = {"skipped_done": len(pairs) - len(todo), "sequences": 0, "response_tokens": 0, "shards": 0}
    start = time.perf_counter()
    buffer: list = []
    todo.sort(key=lambda t: len(t[1]) + len(t[2]))  # similar lengths together: little padding
    for first in tqdm(range(0, len(todo), batch_size), desc="teacher-forced", disable=not progress):
        group = todo[first : first + batch_size]
        seqs = [ids + answer for _, ids, answer in group]
        width = max(len(q) for q in seqs)
        batch = torch.zeros(len(seqs), width, dtype=torch.long)
        for b, q in enumerate(seqs):
            batch[b, : len(q)] = torch.tensor(q)
        cache = backbone.new_cache(len(seqs), width + 1)
        hidden = backbone.forward(batch.to(backbone.device), cache)  # right padding never reaches earlier rows
        for b, (pair, ids, answer) in enumerate(group):
            states = hidden[b, len(ids) - 1 : len(ids) + len(answer) - 1].to(torch.float16).cpu()
            buffer.append(Sequence(pair.key, pair.source, ids, answer, states))
            stats["sequences"] += 1
            stats["response_tokens"] += len(answer)
        if len(buffer) >= shard_size:
            ds.write_shard(buffer, shard_prefix)
            stats["shards"] += 1
            buffer = []
    if buffer:
        ds.write_shard(buffer, shard_prefix)
        stats["shards"] += 1
    stats["seconds"] = time.perf_counter() - start
    return stats
