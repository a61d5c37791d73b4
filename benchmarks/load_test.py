"""Load test for `dyntree serve`: C concurrent clients send N streamed chat requests; JSON with the outcome.

  python benchmarks/load_test.py --url http://127.0.0.1:8000 --concurrency 8 --requests 64 --max-tokens 64 \
      --out load-c8.json

Each request is greedy (temperature 0) with `max_tokens` T and `stream_options.include_usage`, so the test
measures time to first token (the first chunk with text) and the whole answer's latency, and counts completion
tokens from the server's own `usage`. Prompts: the packaged MT-Bench first turns, in order, cycled (or
`--prompts FILE`, one per line or JSONL with "prompt"/"turns").

Written JSON: `ok`, `errors` (every request is one or the other: none is lost), `throughput_tokens_per_s`
(completion tokens of the ok requests over the wall time of the whole test), `ttft_p50_s`, `latency_p50_s`,
`latency_p95_s`, plus p95 TTFT, status counts and the first few error messages.

Bounded: loopback URLs only (127.0.0.0/8, ::1, localhost: this is not a tool for loading other people's
servers); at most 10,000 requests, 256 clients and 4,096 tokens a request; each request has a timeout and
the whole test a time limit, after which requests not yet started are not sent and count as errors.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

MAX_REQUESTS = 10_000
MAX_CONCURRENCY = 256
MAX_TOKENS = 4096
FALLBACK_PROMPTS = ["Write a haiku about the sea.", "What is the capital of France? Explain briefly.",
                    "Give three tips for learning to cook.", "Explain what a hash table is."]


class LoadTestError(Exception):
    """Bad arguments: one line, exit status 2."""


@dataclass
class Result:
    """One request: its HTTP status (0: no answer), times from its start, tokens, error message if any."""

    status: int = 0
    ttft_s: float | None = None
    latency_s: float | None = None
    completion_tokens: int = 0
    error: str | None = None
    text: str = field(default="", repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200


def check_loopback(url: str) -> str:
    """The base URL without a trailing slash, if it is http(s) on this machine; else LoadTestError."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LoadTestError(f"--url must be an http(s) URL like http://127.0.0.1:8000, got {url!r}")
    host = parts.hostname
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False  # a name other than localhost: not resolved, refused
        if not loopback:
            raise LoadTestError(f"refusing {host!r}: the load test only targets this machine (127.0.0.1, ::1, "
                                f"localhost)")
    return url.rstrip("/")


def load_prompts(path: str | None) -> list[str]:
    if path is None:
        try:
            from dyntree.prompts import mt_bench_first_turns

            return mt_bench_first_turns()
        except ImportError:
            return list(FALLBACK_PROMPTS)
    prompts = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            row = json.loads(line)
            line = row.get("prompt") or (row.get("turns") or [""])[0]
        if line:
            prompts.append(line)
    if not prompts:
        raise LoadTestError(f"no prompts in {path}")
    return prompts


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


async def one_request(http, prompt: str, max_tokens: int, timeout: float) -> Result:
    """One streamed chat completion; every failure becomes a Result with `error`, never an exception."""
    result = Result()
    start = time.perf_counter()
    try:
        await asyncio.wait_for(_stream_answer(http, prompt, max_tokens, result, start), timeout)
    except asyncio.TimeoutError:
        result.error = f"no complete answer within {timeout:g} s"
    except Exception as exc:  # connection refused or reset, malformed events: counted, not raised
        result.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
    if result.error is None and result.status == 200:
        result.latency_s = time.perf_counter() - start
    return result


async def _stream_answer(http, prompt: str, max_tokens: int, result: Result, start: float) -> None:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        result.status = response.status_code
        if response.status_code != 200:
            raw = await response.aread()
            try:
                result.error = json.loads(raw)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                result.error = raw[:200].decode("utf-8", "replace") or f"HTTP {response.status_code}"
            return
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[len("data: "):]
            if payload == "[DONE]":
                return
            event = json.loads(payload)
            if "error" in event:
                result.error = event["error"].get("message", "error event")
                return
            if event.get("usage"):
                result.completion_tokens = int(event["usage"]["completion_tokens"])
            for choice in event.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    if result.ttft_s is None:
                        result.ttft_s = time.perf_counter() - start
                    result.text += text
        result.error = "the stream ended without [DONE]"


async def run_load(url: str, concurrency: int, requests: int, max_tokens: int, prompts: list[str],
                   timeout: float = 300.0, time_limit: float = 3600.0) -> dict:
    """Send `requests` requests from `concurrency` clients; the summary dict (see the module docstring)."""
    import httpx

    base = check_loopback(url)
    if not 1 <= requests <= MAX_REQUESTS:
        raise LoadTestError(f"--requests must be in 1..{MAX_REQUESTS}, got {requests}")
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise LoadTestError(f"--concurrency must be in 1..{MAX_CONCURRENCY}, got {concurrency}")
    if not 1 <= max_tokens <= MAX_TOKENS:
        raise LoadTestError(f"--max-tokens must be in 1..{MAX_TOKENS}, got {max_tokens}")
    if not timeout > 0 or not time_limit > 0:
        raise LoadTestError("--timeout and --time-limit must be positive")
    results: list[Result | None] = [None] * requests
    next_index = 0
    start = time.perf_counter()
    deadline = start + time_limit

    async def client(http):
        nonlocal next_index
        while next_index < requests and time.perf_counter() < deadline:
            i = next_index
            next_index += 1
            left = deadline - time.perf_counter()
            results[i] = await one_request(http, prompts[i % len(prompts)], max_tokens, min(timeout, max(left, 0.001)))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=httpx.Timeout(timeout)) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    wall = time.perf_counter() - start
    for i, r in enumerate(results):
        if r is None:
            results[i] = Result(error="not sent: the test's time limit passed")
    ok = [r for r in results if r.ok]
    errors = [r for r in results if not r.ok]
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    tokens = sum(r.completion_tokens for r in ok)
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    latencies = [r.latency_s for r in ok]
    return {
        "url": base, "concurrency": concurrency, "requests": requests, "max_tokens": max_tokens,
        "ok": len(ok), "errors": len(errors), "statuses": statuses,
        "error_messages": sorted({r.error for r in errors})[:5],
        "wall_s": round(wall, 3), "completion_tokens": tokens,
        "throughput_tokens_per_s": round(tokens / wall, 3) if wall > 0 else 0.0,
        "ttft_p50_s": _round(percentile(ttfts, 0.5)), "ttft_p95_s": _round(percentile(ttfts, 0.95)),
        "latency_p50_s": _round(percentile(latencies, 0.5)), "latency_p95_s": _round(percentile(latencies, 0.95)),
        "latency_max_s": _round(max(latencies) if latencies else None),
        "distinct_answers_per_prompt": _distinct_per_prompt(results, prompts),
    }


def _distinct_per_prompt(results: list[Result], prompts: list[str]) -> float | None:
    """Mean number of different answers a prompt got (1.0: greedy answers never changed under load)."""
    seen: dict[str, set[str]] = {}
    for i, r in enumerate(results):
        if r.ok:
            seen.setdefault(prompts[i % len(prompts)], set()).add(r.text)
    return round(sum(len(s) for s in seen.values()) / len(seen), 3) if seen else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the server's base URL (loopback only)")
    parser.add_argument("--concurrency", type=int, required=True, help="clients sending at once")
    parser.add_argument("--requests", type=int, required=True, help="requests in all")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of each request")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--prompts", default=None, help="prompt file (default: the packaged MT-Bench first turns)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take")
    parser.add_argument("--time-limit", type=float, default=3600.0, help="seconds the whole test may take")
    args = parser.parse_args(argv)
    try:
        summary = asyncio.run(run_load(args.url, args.concurrency, args.requests, args.max_tokens,
                                       load_prompts(args.prompts), args.timeout, args.time_limit))
    except LoadTestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: summary[k] for k in ("concurrency", "ok", "errors", "throughput_tokens_per_s",
                                              "ttft_p50_s", "latency_p50_s", "latency_p95_s")}))
    return 0 if summary["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
