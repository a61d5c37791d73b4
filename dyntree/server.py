"""An OpenAI-compatible HTTP server for decoding with heads and trees (`dyntree serve`).

`create_app(dt)` returns a FastAPI app serving one loaded `DynTree`:

- `POST /v1/chat/completions` (chat template applied) and `POST /v1/completions` (raw text or token ids),
  with `stream: true` sending one server-sent event per forward pass that added text, then `data: [DONE]`;
- `GET /health`, `GET /v1/models`.

Requests are decoded one at a time: a single worker thread owns the torch model (the decoder, the KV cache
it builds and a dynamic tree's online statistics are not safe to share between threads), and requests
wait their turn in arrival order. Everything the app needs lives in the objects `create_app` builds: no
module-level state, so two apps (two models) can live in one process.

Greedy (temperature 0 or absent) output is token-for-token the model's plain greedy output, whatever the
tree; sampling is lossless tree speculative sampling unless a request asks for `acceptance: "typical"`.
Bad input raises `DynTreeError` (ours or the library's) and becomes HTTP 400 with a one-line JSON error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Union

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from .api import DynTree
from .config import TreeConfig, parse_early_prune
from .errors import DynTreeError
from .loading import DEFAULT_GGUF_FILE, DEFAULT_MODEL
from .sampling import SamplingConfig
from .textstream import TextStream

log = logging.getLogger("dyntree.server")

REQUEST_TREES = ("ar", "static", "dynamic")  # file paths are never taken from a request
MAX_REQUEST_TREE_SIZE = 256  # bounds what one request may make the server build (and time, for "auto")
MAX_REQUEST_TOPK = 32
MAX_REQUEST_LOOKUP = 32
MAX_STOP_STRINGS = 4
ENGINE_CACHE_SIZE = 8  # distinct per-request tree settings kept built
DEFAULT_MAX_TOKENS = 256


# -- request bodies (OpenAI fields we honour, plus dyntree extensions) ---------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class DecodingFields(BaseModel):
    """Fields shared by both endpoints. Unknown fields are ignored, as OpenAI clients send many."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    # OpenAI fields this server cannot honour: refused unless left at their neutral value.
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    # dyntree / vLLM extensions
    top_k: int | None = None
    acceptance: Literal["lossless", "typical"] | None = None
    typical_eps: float | None = None
    typical_alpha: float | None = None
    tree: str | None = None
    tree_size: int | str | None = None
    topk: int | None = None
    lookup: int | None = None
    early_prune: str | None = None  # "LAYER:K" or "off" (ProPD early pruning inside the tree pass)
    return_token_ids: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[TextPart] | None = None


class ChatRequest(DecodingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    tools: list | None = None


class CompletionRequest(DecodingFields):
    prompt: Union[str, list[int], list[str]]
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


# -- what a request asks for, validated ----------------------------------------------------------------------
@dataclass
class DecodeSpec:
    """One request reduced to what the decoder needs (built on the event loop; cheap checks only)."""

    prompt: object  # text, token ids, or chat messages
    chat: bool
    max_tokens: int | None
    sampling: SamplingConfig
    stop: list[str]
    tree_fields: dict = field(default_factory=dict)  # the request's own tree settings (`tree_request`)


@dataclass
class Outcome:
    """A finished request: its text and the numbers for `usage` and the `dyntree` stats object."""

    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    finish_reason: str
    stats: dict = field(default_factory=dict)


def _refuse_unsupported(req: DecodingFields) -> None:
    if req.n not in (None, 1):
        raise DynTreeError("n must be 1: one choice per request")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise DynTreeError(f"{name} is not supported (it would change the model's distribution)")
    if req.logit_bias:
        raise DynTreeError("logit_bias is not supported")


def sampling_from(req: DecodingFields) -> SamplingConfig:
    """The request's sampling settings; temperature absent or 0 means greedy."""
    if req.seed is not None and not 0 <= req.seed < 2 ** 64:
        raise DynTreeError(f"seed must be an integer in [0, 2^64), got {req.seed}")
    return SamplingConfig.from_options(temperature=req.temperature, top_p=req.top_p,
                                       top_k=None if req.top_k == -1 else req.top_k,  # -1 = off, as in vLLM
                                       seed=req.seed, mode=req.acceptance, eps=req.typical_eps,
                                       alpha=req.typical_alpha)


def stop_strings(stop) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise DynTreeError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    if any(not s for s in stops):
        raise DynTreeError("stop strings must not be empty")
    return stops


def tree_request(req: DecodingFields) -> dict:
    """The request's tree extension fields (`tree`, `tree_size`, `topk`, `lookup`, `early_prune`) that it
    sets, within what one request may make the server build; the engine checks them against its tree
    (`TreeConfig`) and the model (the early-prune layer)."""
    if req.tree is not None and req.tree not in REQUEST_TREES:
        raise DynTreeError(f"unknown tree {req.tree!r}: choose from {', '.join(REQUEST_TREES)}")
    fields = {name: getattr(req, name) for name in ("tree", "tree_size", "topk", "lookup", "early_prune")
              if getattr(req, name) is not None}
    if "early_prune" in fields:
        fields["early_prune"] = parse_early_prune(fields["early_prune"])  # hashable, and checked here
    if "tree_size" in fields:
        probe = TreeConfig.parse("dynamic", fields["tree_size"])
        if not 2 <= probe.resolved_size <= MAX_REQUEST_TREE_SIZE:
            raise DynTreeError(f"tree_size must be between 2 and {MAX_REQUEST_TREE_SIZE}, got {req.tree_size!r}")
    if req.topk is not None and not 1 <= req.topk <= MAX_REQUEST_TOPK:
        raise DynTreeError(f"topk must be between 1 and {MAX_REQUEST_TOPK}, got {req.topk}")
    if req.lookup is not None and not 0 <= req.lookup <= MAX_REQUEST_LOOKUP:
        raise DynTreeError(f"lookup must be between 0 and {MAX_REQUEST_LOOKUP}, got {req.lookup}")
    return fields


def _requested_max_tokens(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise DynTreeError(f"max_tokens must be at least 1, got {value}")
    return value


def chat_spec(req: ChatRequest) -> DecodeSpec:
    _refuse_unsupported(req)
    if req.logprobs:
        raise DynTreeError("logprobs are not supported")
    if req.tools:
        raise DynTreeError("tools are not supported")
    if not req.messages:
        raise DynTreeError("messages must not be empty")
    messages = []
    for i, m in enumerate(req.messages):
        if not m.role:
            raise DynTreeError(f"messages[{i}] has an empty role")
        if isinstance(m.content, list):
            if any(p.type != "text" for p in m.content):
                raise DynTreeError(f"messages[{i}]: only text content parts are supported")
            content = "".join(p.text or "" for p in m.content)
        else:
            content = m.content or ""
        messages.append({"role": m.role, "content": content})
    if not any(m["content"].strip() for m in messages):
        raise DynTreeError("messages have no content")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return DecodeSpec(messages, True, _requested_max_tokens(max_tokens), sampling_from(req),
                      stop_strings(req.stop), tree_request(req))


def completion_spec(req: CompletionRequest) -> DecodeSpec:
    _refuse_unsupported(req)
    if req.echo:
        raise DynTreeError("echo is not supported")
    if req.logprobs:
        raise DynTreeError("logprobs are not supported")
    if req.best_of not in (None, 1):
        raise DynTreeError("best_of must be 1")
    if req.suffix:
        raise DynTreeError("suffix is not supported")
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise DynTreeError("one prompt per request: batched prompts are not supported")
        prompt = prompt[0]
    if isinstance(prompt, str) and not prompt.strip() or not prompt:
        raise DynTreeError("prompt must not be empty")
    return DecodeSpec(prompt, False, _requested_max_tokens(req.max_tokens), sampling_from(req),
                      stop_strings(req.stop), tree_request(req))


# -- the service: one model, one worker thread -----------------------------------------------------------------
def served_name(dt: DynTree) -> str:
    """The name `/v1/models` reports: the default model's real name, else the model directory's name."""
    if dt.model.name == DEFAULT_MODEL:
        return DEFAULT_GGUF_FILE.split(".")[0]
    return Path(dt.model.name).name or str(dt.model.name)


class DecodingService:
    """Owns the model and the one thread allowed to run it; builds and caches per-request tree engines."""

    def __init__(self, dt: DynTree, model_name: str, default_max_tokens: int, threads: int):
        self.base = dt
        self.model_name = model_name
        self.default_max_tokens = default_max_tokens
        self.engines: OrderedDict[tuple, DynTree] = OrderedDict()
        self.active: set[threading.Event] = set()
        # intra-op thread counts are per thread under OpenMP: set the worker's explicitly.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dyntree-decode",
                                           initializer=torch.set_num_threads, initargs=(threads,))

    @property
    def context_length(self) -> int:
        return self.base.model.config.max_position_embeddings

    def close(self) -> None:
        for cancel in list(self.active):
            cancel.set()
        self.executor.shutdown(wait=True, cancel_futures=True)

    # Everything below runs on the worker thread.
    def engine_for(self, spec: DecodeSpec) -> DynTree:
        """The base engine, or one with the request's tree settings (built once, then cached)."""
        base = self.base
        fields = spec.tree_fields
        if not fields:
            return base
        if base.heads is None and fields.get("tree", "ar") != "ar":
            raise DynTreeError("this server has no heads: only tree 'ar' is available")
        key = tuple(sorted(fields.items()))
        if key in self.engines:
            self.engines.move_to_end(key)
            return self.engines[key]
        config = base.config.replace(**fields)  # its own tree keeps the server's settings (score, latency...)
        log.info("building a tree engine for %s", config.settings())
        engine = base.with_tree(config)
        self.engines[key] = engine
        if len(self.engines) > ENGINE_CACHE_SIZE:
            self.engines.popitem(last=False)
        return engine

    def encode(self, spec: DecodeSpec) -> list[int]:
        if isinstance(spec.prompt, list) and all(isinstance(t, int) for t in spec.prompt):
            vocab = self.base.model.config.vocab_size
            bad = [t for t in spec.prompt if not 0 <= t < vocab]
            if bad:
                raise DynTreeError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
            return list(spec.prompt)
        try:
            return self.base.encode(spec.prompt, chat=spec.chat)
        except DynTreeError:
            raise
        except Exception as exc:  # a chat template refusing the conversation (e.g. roles out of order)
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DynTreeError(f"cannot apply the chat template: {first_line}") from exc

    def max_tokens_for(self, spec: DecodeSpec, prompt_tokens: int) -> int:
        limit = self.context_length
        if prompt_tokens >= limit:
            raise DynTreeError(f"the prompt is {prompt_tokens} tokens; the model's context is {limit} tokens")
        room = limit - prompt_tokens
        if spec.max_tokens is None:
            return min(self.default_max_tokens, room)
        if spec.max_tokens > room:
            raise DynTreeError(f"the prompt ({prompt_tokens} tokens) plus max_tokens ({spec.max_tokens}) exceeds "
                               f"the model's context of {limit} tokens")
        return spec.max_tokens

    def decode(self, spec: DecodeSpec, cancel: threading.Event, queued_at: float,
               on_text: Callable[[str, list[int]], None] | None = None) -> Outcome | None:
        """Decode one request; `on_text(delta, token_ids)` after each pass that adds visible text.

        Raises DynTreeError before any text for bad input. Returns None if cancelled before starting.
        """
        if cancel.is_set():
            return None
        started = time.perf_counter()
        engine = self.engine_for(spec)
        ids = self.encode(spec)
        max_tokens = self.max_tokens_for(spec, len(ids))
        run = engine.decoder(sampling=spec.sampling).run([ids], max_tokens, stop_at_eos=True)
        decode_started = time.perf_counter()
        text = TextStream(engine.tokenizer, spec.stop)
        for event in run:
            delta = text.push(event.new_tokens[0], finished=event.finished[0])
            if on_text is not None and delta is not None and delta.text:
                on_text(delta.text, delta.token_ids)
            if text.stopped or cancel.is_set():
                break
        if not (text.stopped or cancel.is_set()):  # a run cut short (context limit) may still hold text back
            delta = text.push([], finished=True)
            if on_text is not None and delta is not None and delta.text:
                on_text(delta.text, delta.token_ids)
        ended = time.perf_counter()
        stats = run.stats
        reason = stats.stop_reasons[0] if stats.stop_reasons else ""
        if text.stopped or reason == "eos":
            finish = "stop"
        else:
            finish = "cancelled" if cancel.is_set() and reason == "" else "length"
        seconds = ended - decode_started
        tokens = text.tokens
        return Outcome(text.text, tokens, ids, finish, {
            "tree": stats.method,
            "forward_passes": stats.decode_passes + 1,  # the prefill pass yields the first token
            "mean_accepted_per_pass": round(stats.mean_accepted_per_pass, 4),
            "mean_tree_size": round(stats.mean_tree_size, 2),
            "tokens_per_second": round(len(tokens) / seconds, 2) if seconds > 0 else 0.0,
            "generation_seconds": round(seconds, 4),
            "queue_seconds": round(started - queued_at, 4),
            "acceptance": stats.acceptance,
            "heads": engine.heads_note,
            **({"early_prune": _prune_figures(stats.early_prune)} if stats.early_prune is not None else {}),
        })


def _prune_figures(prune) -> dict:
    """What a response says of early pruning: where it pruned and what it dropped per pass."""
    figures = prune.as_dict()
    return {"layer": prune.layer, "k": prune.k, "pruned_nodes_per_pass": round(figures["pruned_nodes_per_pass"], 2),
            "pruned_share": round(figures["pruned_share"], 4), "miss_share": round(figures["miss_share"], 4)}


# -- response bodies -----------------------------------------------------------------------------------------
def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict:
    line = (str(message).strip().splitlines() or ["error"])[0]
    return {"error": {"message": line, "type": kind, "param": None, "code": code}}


def error_response(status: int, message: str, kind: str = "invalid_request_error",
                   code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, code), status_code=status)


def usage(outcome: Outcome) -> dict:
    prompt, completion = len(outcome.prompt_ids), len(outcome.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(dt: DynTree, served_model_name: str | None = None,
               default_max_tokens: int = DEFAULT_MAX_TOKENS) -> FastAPI:
    """A FastAPI app serving `dt`; requests run one at a time on a worker thread owned by the app.

    served_model_name: the name in `/v1/models` and responses (default: the model's own name).
    default_max_tokens: completion length when a request gives no max_tokens (capped by the context).
    """
    if default_max_tokens < 1:
        raise DynTreeError(f"the default max_tokens must be at least 1, got {default_max_tokens}")
    name = served_model_name or served_name(dt)
    service = DecodingService(dt, name, default_max_tokens, torch.get_num_threads())

    @asynccontextmanager
    async def lifespan(_app):
        yield
        service.close()

    app = FastAPI(title="dyntree", summary="Medusa-style heads and tree attention behind an OpenAI-style API",
                  lifespan=lifespan)
    app.state.service = service
    created = int(time.time())

    @app.exception_handler(DynTreeError)
    async def _bad_request(_request: Request, exc: DynTreeError):
        return error_response(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(_request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if not errors:
            return error_response(400, "invalid request body")
        first = errors[0]
        if first.get("type") == "json_invalid":
            return error_response(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '')})")
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "request body"
        return error_response(400, f"{where}: {first.get('msg', 'invalid value')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(_request: Request, exc: Exception):
        log.exception("internal error")
        return error_response(500, f"internal error ({type(exc).__name__}); see the server log", "server_error")

    def check_model(requested: str | None) -> None:
        if requested and requested not in (name, str(dt.model.name)):
            raise StarletteHTTPException(404, f"model {requested!r} is not served here; this server serves {name!r}")

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "dyntree",
                "max_model_len": service.context_length}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    async def complete(spec: DecodeSpec, build_body: Callable[[Outcome], dict]):
        loop = asyncio.get_running_loop()
        cancel = threading.Event()
        outcome = await loop.run_in_executor(service.executor, service.decode, spec, cancel, time.perf_counter())
        if outcome is None:
            return error_response(503, "the server is shutting down", "server_error")
        return build_body(outcome)

    async def stream(spec: DecodeSpec, chunk: Callable[[dict, str | None], dict], delta_of: Callable[[str], dict],
                     first_delta: dict | None, include_usage: bool, with_ids: bool):
        """Start decoding; answer 400 if it fails before any text, else stream one event per pass."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        service.active.add(cancel)

        def put(item):
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work():
            try:
                put(("done", service.decode(spec, cancel, time.perf_counter(),
                                            lambda text, ids: put(("text", text, ids)))))
            except DynTreeError as exc:
                put(("error", exc))
            except Exception as exc:  # a bug: log it, end the stream with an error event
                log.exception("internal error while streaming")
                put(("error", exc))

        service.executor.submit(work)
        first = await queue.get()
        if first[0] == "error":
            service.active.discard(cancel)
            if isinstance(first[1], DynTreeError):
                return error_response(400, str(first[1]))
            return error_response(500, f"internal error ({type(first[1]).__name__}); see the server log",
                                  "server_error")

        async def events():
            item = first
            try:
                if first_delta is not None:
                    yield sse(chunk(first_delta, None))
                while True:
                    kind = item[0]
                    if kind == "text":
                        delta = delta_of(item[1])
                        if with_ids:
                            delta["token_ids"] = item[2]
                        yield sse(chunk(delta, None))
                    elif kind == "done":
                        outcome = item[1]
                        if outcome is None:  # cancelled: the server is shutting down
                            break
                        final = chunk(delta_of("") if first_delta is None else {}, outcome.finish_reason)
                        final["dyntree"] = outcome.stats
                        yield sse(final)
                        if include_usage:
                            yield sse(dict(chunk({}, None), choices=[], usage=usage(outcome)))
                        break
                    else:
                        exc = item[1]
                        message = str(exc) if isinstance(exc, DynTreeError) else \
                            f"internal error ({type(exc).__name__}); see the server log"
                        yield sse(error_body(message, "server_error"))
                        break
                    item = await queue.get()
                yield "data: [DONE]\n\n"
            finally:
                cancel.set()  # a client that went away stops the decoding at the next pass
                service.active.discard(cancel)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def response_body(ident: str, kind: str, created: int, choice: dict, outcome: Outcome,
                      with_token_ids: bool) -> dict:
        """A whole (non-streamed) answer of either endpoint, around its one `choice`."""
        out = {"id": ident, "object": kind, "created": created, "model": name, "choices": [choice],
               "usage": usage(outcome), "dyntree": outcome.stats}
        if with_token_ids:
            choice["token_ids"] = outcome.token_ids
            out["prompt_token_ids"] = outcome.prompt_ids
        return out

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        check_model(req.model)
        spec = chat_spec(req)
        ident, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            def chunk(delta: dict, finish: str | None) -> dict:
                return {"id": ident, "object": "chat.completion.chunk", "created": now, "model": name,
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

            include = bool(req.stream_options and req.stream_options.include_usage)
            return await stream(spec, chunk, lambda text: {"content": text}, {"role": "assistant", "content": ""},
                                include, req.return_token_ids)

        def body(outcome: Outcome) -> dict:
            choice = {"index": 0, "message": {"role": "assistant", "content": outcome.text}, "logprobs": None,
                      "finish_reason": outcome.finish_reason}
            return response_body(ident, "chat.completion", now, choice, outcome, req.return_token_ids)

        return await complete(spec, body)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        check_model(req.model)
        spec = completion_spec(req)
        ident, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            def chunk(delta: dict, finish: str | None) -> dict:
                return {"id": ident, "object": "text_completion", "created": now, "model": name,
                        "choices": [dict(index=0, **delta, logprobs=None, finish_reason=finish)]}

            include = bool(req.stream_options and req.stream_options.include_usage)
            return await stream(spec, chunk, lambda text: {"text": text}, None, include, req.return_token_ids)

        def body(outcome: Outcome) -> dict:
            choice = {"index": 0, "text": outcome.text, "logprobs": None, "finish_reason": outcome.finish_reason}
            return response_body(ident, "text_completion", now, choice, outcome, req.return_token_ids)

        return await complete(spec, body)

    return app
