"""An OpenAI-compatible HTTP server for decoding with heads and trees (`dyntree serve`).

`create_app(dt)` returns a FastAPI app serving one loaded `DynTree`:

- `POST /v1/chat/completions` (chat template applied) and `POST /v1/completions` (raw text or token ids),
  with `stream: true` sending one server-sent event per forward pass that added text, then `data: [DONE]`;
- `GET /health`, `GET /v1/models`, `GET /metrics` (Prometheus text format).

Requests are decoded together by continuous batching (`engine.BatchEngine`): up to `max_batch` share each
forward pass, joining and leaving at step boundaries; up to `max_queue` more wait, and beyond that a request
is refused with 429 and Retry-After. The engine's one thread owns the torch model; handlers only tokenise
(on a helper thread), submit, and relay the engine's events. A client that goes away (streaming or not)
frees its row at the next step; a request past `request_timeout` ends with 504; `drain()` (SIGTERM under
`run_server`) refuses new work with 503 and gives requests in flight `shutdown_timeout` seconds to finish
before they are failed with a 503 of their own. Everything lives in the objects `create_app` builds (the
metrics registry too): no module-level state, so two apps (two models) can live in one process.

Greedy (temperature 0 or absent) output is token-for-token the model's plain greedy output, whatever the
tree and whatever else shares the batch; sampling is lossless tree speculative sampling unless a request asks
for `acceptance: "typical"`. Bad input raises `DynTreeError` (ours or the library's) and becomes HTTP 400
with a one-line JSON error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Union

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt
from starlette.exceptions import HTTPException as StarletteHTTPException

from .api import DynTree
from .config import TreeConfig, parse_early_prune
from .engine import BatchEngine, EngineObserver, EngineRefusal, EngineRequest, Outcome, RequestHandle
from .errors import DynTreeError
from .loading import DEFAULT_GGUF_FILE, DEFAULT_MODEL
from .sampling import SamplingConfig

log = logging.getLogger("dyntree.server")

REQUEST_TREES = ("ar", "static", "dynamic")  # file paths are never taken from a request
MAX_REQUEST_TREE_SIZE = 256  # bounds what one request may make the server build (and time, for "auto")
MAX_REQUEST_TOPK = 32
MAX_REQUEST_LOOKUP = 32
MAX_STOP_STRINGS = 4
DEFAULT_MAX_TOKENS = 256
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_QUEUE = 64
DEFAULT_REQUEST_TIMEOUT = 300.0  # seconds from arrival to the end of the answer
DEFAULT_SHUTDOWN_TIMEOUT = 30.0  # seconds requests in flight get to finish after SIGTERM
MAX_BODY_BYTES = 512 * 1024  # far above any prompt the default model's 8k context can hold
DISCONNECT_POLL_SECONDS = 0.25  # how often a waiting non-streaming request checks that its client is there
# OpenAI request fields that change nothing here and are accepted silently; any other unknown field is refused
# (a typo'd or unsupported option should not be ignored without a word).
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "tool_choice",
                  "top_logprobs")


# -- request bodies (OpenAI fields we honour, plus dyntree extensions) ---------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class DecodingFields(BaseModel):
    """Fields shared by both endpoints. Unknown fields are kept (`model_extra`) to be refused by name, except the
    OpenAI fields in `IGNORED_FIELDS`. Numbers and flags are strict: `true` or `"3"` is not a max_tokens."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: StrictInt | None = None
    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    # OpenAI fields this server cannot honour: refused unless left at their neutral value.
    n: StrictInt | None = None
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    logit_bias: dict | None = None
    # dyntree / vLLM extensions
    top_k: StrictInt | None = None
    acceptance: Literal["lossless", "typical"] | None = None
    typical_eps: StrictFloat | None = None
    typical_alpha: StrictFloat | None = None
    tree: str | None = None
    tree_size: StrictInt | str | None = None
    topk: StrictInt | None = None
    lookup: StrictInt | None = None
    early_prune: str | None = None  # "LAYER:K" or "off" (ProPD early pruning inside the tree pass)
    return_token_ids: StrictBool = False


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
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = None
    tools: list | None = None


class CompletionRequest(DecodingFields):
    prompt: Union[str, list[StrictInt], list[str]]
    echo: StrictBool | None = None
    logprobs: StrictInt | None = None
    best_of: StrictInt | None = None
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


def _refuse_unsupported(req: DecodingFields) -> None:
    unknown = sorted(set(req.model_extra or {}) - set(IGNORED_FIELDS))
    if unknown:
        raise DynTreeError(f"unknown field {unknown[0]!r}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1
                                                              else "") + ": see docs/serving.md for the fields served")
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
    for s in stops:
        check_text(s, "stop")
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
        check_text(m.role + content, f"messages[{i}]")
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
    if isinstance(prompt, str):
        check_text(prompt, "prompt")
    return DecodeSpec(prompt, False, _requested_max_tokens(req.max_tokens), sampling_from(req),
                      stop_strings(req.stop), tree_request(req))


# -- the service: one model, one engine ------------------------------------------------------------------------
def served_name(dt: DynTree) -> str:
    """The name `/v1/models` reports: the default model's real name, else the model directory's name."""
    if dt.model.name == DEFAULT_MODEL:
        return DEFAULT_GGUF_FILE.split(".")[0]
    return Path(dt.model.name).name or str(dt.model.name)


class ServerMetrics(EngineObserver):
    """The app's Prometheus metrics, in a registry of its own (two apps never share counters)."""

    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("dyntree_http_requests", "HTTP requests answered, by path and status code",
                                ["path", "status"], registry=registry)
        self.finished_counter = Counter("dyntree_requests_finished", "Decoding requests that left the engine, by "
                                        "reason (stop, length, cancelled, timeout, shutdown, error)", ["reason"],
                                        registry=registry)
        self.tokens = Counter("dyntree_generated_tokens", "Completion tokens generated", registry=registry)
        self.tokens_per_pass = Histogram("dyntree_tokens_per_pass", "Tokens one decoding pass added to one request",
                                         buckets=(1, 2, 3, 4, 5, 6, 8, 12, 16), registry=registry)
        self.step_seconds = Histogram("dyntree_step_seconds", "Seconds of one decoding step of the whole batch",
                                      buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28,
                                               2.56), registry=registry)
        self.step_batch = Histogram("dyntree_step_batch_size", "Requests decoded by one step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=registry)
        self.queue_depth = Gauge("dyntree_queue_depth", "Requests waiting for a row", registry=registry)
        self.batch_size = Gauge("dyntree_batch_size", "Requests holding a row now", registry=registry)

    def watch(self, engine: BatchEngine) -> None:
        self.queue_depth.set_function(lambda: engine.queue_depth)
        self.batch_size.set_function(lambda: engine.batch_size)

    def step(self, batch_size: int, seconds: float, tokens_per_row: list[int]) -> None:
        self.step_seconds.observe(seconds)
        self.step_batch.observe(batch_size)
        self.tokens.inc(sum(tokens_per_row))
        for count in tokens_per_row:
            self.tokens_per_pass.observe(count)

    def generated(self, tokens: int) -> None:
        self.tokens.inc(tokens)

    def finished(self, reason: str) -> None:
        self.finished_counter.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class DecodingService:
    """The engine and what requests need before it: tokenising (on a helper thread), context checks."""

    def __init__(self, dt: DynTree, model_name: str, default_max_tokens: int, threads: int, max_batch: int,
                 max_queue: int, request_timeout: float | None, shutdown_timeout: float,
                 max_model_len: int | None = None, tree_size_for=None):
        self.base = dt
        self.model_name = model_name
        self.default_max_tokens = default_max_tokens
        self.request_timeout = request_timeout
        self.shutdown_timeout = shutdown_timeout
        self.metrics = ServerMetrics()
        self.engine = BatchEngine(dt, max_batch=max_batch, max_queue=max_queue, tree_size_for=tree_size_for,
                                  threads=threads, observer=self.metrics, max_seq_len=max_model_len)
        self.metrics.watch(self.engine)
        # One tokenising thread: the engine thread decodes text with the same tokenizer meanwhile, and a fast
        # tokenizer takes only one mutable borrow at a time.
        self.tokenizer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dyntree-tokenize")

    @property
    def context_length(self) -> int:
        return self.engine.max_seq_len

    def drain(self) -> None:
        """Stop taking requests (503); those in flight get `shutdown_timeout` seconds to finish."""
        if self.engine.accepting:
            log.warning("shutting down: new requests get 503; %d decoding and %d waiting get %g s to finish",
                        self.engine.batch_size, self.engine.queue_depth, self.shutdown_timeout)
        self.engine.stop_accepting(self.shutdown_timeout)

    def close(self) -> None:
        self.engine.close(grace=0.0)
        self.tokenizer_pool.shutdown(wait=False, cancel_futures=True)

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

    def prepare(self, spec: DecodeSpec) -> tuple[list[int], int]:
        """Prompt ids and max_tokens (runs on the tokenising thread; raises DynTreeError for bad input)."""
        ids = self.encode(spec)
        return ids, self.max_tokens_for(spec, len(ids))

    def submit(self, spec: DecodeSpec, ids: list[int], max_tokens: int, sink) -> RequestHandle:
        handle = self.engine.submit(EngineRequest(ids, max_tokens, spec.sampling, sink, spec.stop, spec.tree_fields,
                                                  self.request_timeout))
        self.engine.start()
        return handle


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before any of it is parsed."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        chunks, size = [], 0
        while True:  # read it all (chunked bodies have no declared length), then hand it on
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                return await self._refuse(scope, receive, send)
            chunks.append(body)
            if not message.get("more_body"):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        response = error_response(413, f"the request body is larger than {self.limit} bytes")
        await response(scope, receive, send)


class StatusCounter:
    """ASGI middleware: counts every HTTP answer by path (the served ones; others as "other") and status."""

    def __init__(self, app, counter: Counter, paths: set[str]):
        self.app = app
        self.counter = counter
        self.paths = paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        labels = (path if path in self.paths else "other",)
        started = False

        async def counting(message):
            nonlocal started
            if message["type"] == "http.response.start":  # counted as the answer starts: before its body
                started = True
                self.counter.labels(*labels, str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, counting)
        finally:
            if not started:  # an exception no handler answered
                self.counter.labels(*labels, "500").inc()

# -- response bodies -----------------------------------------------------------------------------------------
def _type_tag(part) -> bool:
    """A union member's name in a validation error's location (`prompt.str`): not a field, left out."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "dict", "list") or "[" in part)


def check_text(value, where: str) -> None:
    """Refuse strings that are not valid Unicode (JSON may escape a lone surrogate): no tokenizer takes them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DynTreeError(f"{where} holds text that is not valid Unicode (a lone surrogate)") from None


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict:
    line = (str(message).strip().splitlines() or ["error"])[0]
    return {"error": {"message": line, "type": kind, "param": None, "code": code}}


def error_response(status: int, message: str, kind: str = "invalid_request_error",
                   code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, code), status_code=status)


def refusal_response(exc: EngineRefusal) -> JSONResponse:
    kind = {429: "rate_limit_exceeded", 504: "timeout"}.get(exc.status, "server_error")
    response = error_response(exc.status, str(exc), kind)
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


def failure_response(exc: Exception) -> JSONResponse:
    """An engine's error event as an answer: refusals keep their status, bad input 400, a bug 500."""
    if isinstance(exc, EngineRefusal):
        return refusal_response(exc)
    if isinstance(exc, DynTreeError):
        return error_response(400, str(exc))
    return error_response(500, f"internal error ({type(exc).__name__}); see the server log", "server_error")


def usage(outcome: Outcome) -> dict:
    prompt, completion = len(outcome.prompt_ids), len(outcome.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(dt: DynTree, served_model_name: str | None = None, default_max_tokens: int = DEFAULT_MAX_TOKENS,
               max_batch: int = DEFAULT_MAX_BATCH, max_queue: int = DEFAULT_MAX_QUEUE,
               request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
               shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT, max_model_len: int | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, tree_size_for=None) -> FastAPI:
    """A FastAPI app serving `dt` by continuous batching on an engine thread owned by the app.

    served_model_name: the name in `/v1/models` and responses (default: the model's own name).
    default_max_tokens: completion length when a request gives no max_tokens (capped by the context).
    max_batch, max_queue: requests decoded at once, and waiting beyond those (then 429).
    request_timeout: seconds a request may take from arrival to its last token (None: no limit; then 504).
    shutdown_timeout: seconds requests in flight get after `drain()` (SIGTERM) before they are failed (503).
    max_model_len: prompt + completion tokens per request (default: the model's context); bounds the cache.
    max_body_bytes: larger request bodies get 413.
    tree_size_for: nodes per row by batch size (`engine.default_tree_size_for` by default).
    """
    if default_max_tokens < 1:
        raise DynTreeError(f"the default max_tokens must be at least 1, got {default_max_tokens}")
    if request_timeout is not None and not request_timeout > 0:
        raise DynTreeError(f"the request timeout must be positive (or None for none), got {request_timeout}")
    if not shutdown_timeout >= 0:
        raise DynTreeError(f"the shutdown timeout must be >= 0, got {shutdown_timeout}")
    if max_body_bytes < 1024:
        raise DynTreeError(f"the body limit must be at least 1024 bytes, got {max_body_bytes}")
    name = served_model_name or served_name(dt)
    service = DecodingService(dt, name, default_max_tokens, torch.get_num_threads(), max_batch, max_queue,
                              request_timeout, shutdown_timeout, max_model_len, tree_size_for)
    dt.encode("warm up", chat=False)  # the tokenizer's settings are made once, before threads share it

    @asynccontextmanager
    async def lifespan(_app):
        yield
        service.close()

    app = FastAPI(title="dyntree", summary="Medusa-style heads and tree attention behind an OpenAI-style API",
                  lifespan=lifespan)
    app.state.service = service
    created = int(time.time())
    paths = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.add_middleware(StatusCounter, counter=service.metrics.requests, paths=paths)  # outermost: sees 413s too

    @app.exception_handler(EngineRefusal)
    async def _refused(_request: Request, exc: EngineRefusal):
        return refusal_response(exc)

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
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body" and not _type_tag(p)) or "request body"
        return error_response(400, f"{where}: {first.get('msg', 'invalid value')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException):
        detail = str(exc.detail)
        if exc.status_code == 400 and detail == "There was an error parsing the body":
            detail = "the request body is not valid JSON in UTF-8"
        return error_response(exc.status_code, detail)

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
        if not service.engine.accepting:
            return JSONResponse({"status": "draining", "model": name}, status_code=503)
        return {"status": "ok", "model": name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def submit(spec: DecodeSpec) -> tuple[RequestHandle, asyncio.Queue]:
        """Tokenise off the event loop, then queue the request; its events arrive on the returned queue."""
        if not service.engine.accepting:  # before spending time on the prompt
            raise EngineRefusal("the server is shutting down", 503)
        loop = asyncio.get_running_loop()
        ids, max_tokens = await loop.run_in_executor(service.tokenizer_pool, service.prepare, spec)
        events: asyncio.Queue = asyncio.Queue()

        def sink(event):  # on the engine thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        return service.submit(spec, ids, max_tokens, sink), events

    async def next_event(events: asyncio.Queue, request: Request, handle: RequestHandle, checked: list[float]):
        """The engine's next event for this request, or None once its client has gone (the row is then freed
        at the next step). The client is looked at every `DISCONNECT_POLL_SECONDS` (`checked[0]`: last time),
        whether or not events keep coming."""
        loop = asyncio.get_running_loop()
        while True:
            wait = checked[0] + DISCONNECT_POLL_SECONDS - loop.time()
            if wait > 0:
                try:
                    return await asyncio.wait_for(events.get(), wait)
                except asyncio.TimeoutError:
                    pass
            checked[0] = loop.time()
            if await request.is_disconnected():
                handle.cancel()
                return None

    async def complete(request: Request, spec: DecodeSpec, build_body: Callable[[Outcome], dict]):
        handle, events = await submit(spec)
        checked = [asyncio.get_running_loop().time()]
        try:
            while True:
                event = await next_event(events, request, handle, checked)
                if event is None or event[0] == "cancelled":
                    return error_response(499, "the client closed the request", "client_closed")
                if event[0] == "done":
                    return build_body(event[1])
                if event[0] == "error":
                    return failure_response(event[1])
        finally:
            handle.cancel()  # no-op once it finished; frees the row if this handler is cancelled

    async def stream(request: Request, spec: DecodeSpec, chunk: Callable[[dict, str | None], dict],
                     delta_of: Callable[[str], dict], first_delta: dict | None, include_usage: bool,
                     with_ids: bool):
        """Queue the request; answer an error status if it fails before any text, else stream one event per pass."""
        handle, events = await submit(spec)
        try:
            first = await next_event(events, request, handle, [asyncio.get_running_loop().time()])
        except BaseException:
            handle.cancel()
            raise
        if first is None or first[0] == "cancelled":
            return error_response(499, "the client closed the request", "client_closed")
        if first[0] == "error":
            return failure_response(first[1])

        async def body():
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
                        final = chunk(delta_of("") if first_delta is None else {}, outcome.finish_reason)
                        final["dyntree"] = outcome.stats
                        yield sse(final)
                        if include_usage:
                            yield sse(dict(chunk({}, None), choices=[], usage=usage(outcome)))
                        break
                    elif kind == "error":
                        exc = item[1]
                        message = str(exc) if isinstance(exc, DynTreeError) else \
                            f"internal error ({type(exc).__name__}); see the server log"
                        yield sse(error_body(message, "server_error"))
                        break
                    else:  # cancelled
                        break
                    item = await events.get()
                yield "data: [DONE]\n\n"
            finally:
                handle.cancel()  # a client that went away leaves the batch at the next step

        return StreamingResponse(body(), media_type="text/event-stream",
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
    async def chat_completions(req: ChatRequest, request: Request):
        check_model(req.model)
        spec = chat_spec(req)
        ident, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            def chunk(delta: dict, finish: str | None) -> dict:
                return {"id": ident, "object": "chat.completion.chunk", "created": now, "model": name,
                        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

            include = bool(req.stream_options and req.stream_options.include_usage)
            return await stream(request, spec, chunk, lambda text: {"content": text},
                                {"role": "assistant", "content": ""}, include, req.return_token_ids)

        def body(outcome: Outcome) -> dict:
            choice = {"index": 0, "message": {"role": "assistant", "content": outcome.text}, "logprobs": None,
                      "finish_reason": outcome.finish_reason}
            return response_body(ident, "chat.completion", now, choice, outcome, req.return_token_ids)

        return await complete(request, spec, body)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        spec = completion_spec(req)
        ident, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            def chunk(delta: dict, finish: str | None) -> dict:
                return {"id": ident, "object": "text_completion", "created": now, "model": name,
                        "choices": [dict(index=0, **delta, logprobs=None, finish_reason=finish)]}

            include = bool(req.stream_options and req.stream_options.include_usage)
            return await stream(request, spec, chunk, lambda text: {"text": text}, None, include,
                                req.return_token_ids)

        def body(outcome: Outcome) -> dict:
            choice = {"index": 0, "text": outcome.text, "logprobs": None, "finish_reason": outcome.finish_reason}
            return response_body(ident, "text_completion", now, choice, outcome, req.return_token_ids)

        return await complete(request, spec, body)

    return app


def run_server(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    """Serve `app` with uvicorn; SIGTERM/SIGINT first drain the engine (new requests get 503, requests in
    flight get the app's shutdown timeout to finish), then uvicorn closes connections as they go idle."""
    import uvicorn

    service: DecodingService = app.state.service

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            service.drain()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=int(service.shutdown_timeout) + 5)
    DrainingServer(config).run()
