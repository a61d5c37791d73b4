"""`dyntree serve` under concurrent load, over real sockets (uvicorn on a loopback port, tiny model): the queue
limit (429), clients that go away (their row is freed), timeouts (504), draining on shutdown (503) and the
Prometheus metrics that count all of it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from dyntree.api import DynTree
from dyntree.server import create_app

from test_bench import tiny_model_dir  # noqa: F401 - the tiny model with a tokenizer and a chat template

LONG = {"prompt": "the cat sat on the mat", "max_tokens": 400}  # 400 steps (no EOS): long enough to interrupt


@pytest.fixture(scope="module")
def dt(tiny_model_dir):  # noqa: F811
    return DynTree.from_pretrained(str(tiny_model_dir), heads="random", tree="ar")


def slowed(app, seconds: float = 0.01):
    """Make each engine step take at least `seconds`, so that requests stay in flight long enough to test."""
    engine = app.state.service.engine
    step = engine.step

    def slow_step():
        time.sleep(seconds)
        return step()

    engine.step = slow_step
    return engine


@contextlib.contextmanager
def serving(app):
    """Run `app` under uvicorn on a free loopback port in a thread; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(500):
        if server.started:
            break
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def metric(text: str, name: str, **labels) -> float:
    """One sample's value from Prometheus text (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def wait_for(condition, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_full_queue_answers_429_with_retry_after_and_nothing_is_lost(dt):
    app = create_app(dt, max_batch=1, max_queue=1)
    engine = slowed(app, 0.01)  # each answer takes 0.4 s at least: the five requests arrive well within it
    body = {"prompt": "w5 w6 w7", "max_tokens": 40}

    async def fire():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(5)))

    try:
        responses = asyncio.run(fire())
    finally:
        app.state.service.close()
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 2 and codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
    texts = {r.json()["choices"][0]["text"] for r in responses if r.status_code == 200}
    assert len(texts) == 1  # the same greedy answer each time
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert "busy" in r.json()["error"]["message"] and r.json()["error"]["type"] == "rate_limit_exceeded"
    assert engine.batch_size == 0 and engine.queue_depth == 0


@pytest.mark.parametrize("streaming", [True, False])
def test_a_client_that_disconnects_frees_its_row(dt, streaming):
    app = create_app(dt, max_batch=1, max_queue=0)
    engine = slowed(app)
    metrics = app.state.service.metrics
    with serving(app) as url:
        with httpx.Client(base_url=url, timeout=30) as http:
            if streaming:
                with http.stream("POST", "/v1/completions", json=dict(LONG, stream=True)) as r:
                    assert r.status_code == 200
                    next(r.iter_lines())  # the first event: it is decoding
                    assert engine.batch_size == 1
            else:
                with pytest.raises(httpx.ReadTimeout):
                    http.post("/v1/completions", json=LONG, timeout=0.5)
            # The only row is free again well before the 400 tokens would have been decoded.
            assert wait_for(lambda: engine.batch_size == 0, 3.0), "the row was not freed"
            assert metrics.finished_counter.labels("cancelled")._value.get() == 1
            r = http.post("/v1/completions", json={"prompt": "w5", "max_tokens": 3})
            assert r.status_code == 200  # max_queue 0: this needed the freed row


def test_requests_past_their_timeout_get_504(dt):
    app = create_app(dt, request_timeout=0.3)
    slowed(app)
    with TestClient(app) as client:
        r = client.post("/v1/completions", json=LONG)
        assert r.status_code == 504 and "timeout" in r.json()["error"]["message"]
        r = client.post("/v1/completions", json=dict(LONG, stream=True))  # a stream ends with an error event
        assert r.status_code == 200 and "timeout" in r.text and r.text.rstrip().endswith("[DONE]")
        assert client.post("/v1/completions", json={"prompt": "w5", "max_tokens": 2}).status_code == 200
        text = client.get("/metrics").text
    assert metric(text, "dyntree_requests_finished_total", reason="timeout") == 2
    assert metric(text, "dyntree_http_requests_total", path="/v1/completions", status="504") == 1


def test_drain_refuses_new_requests_and_fails_those_left_cleanly(dt):
    app = create_app(dt, shutdown_timeout=0.2)
    engine = slowed(app)
    service = app.state.service
    with serving(app) as url:
        with httpx.Client(base_url=url, timeout=30) as http:
            with http.stream("POST", "/v1/completions", json=dict(LONG, stream=True)) as r:
                lines = r.iter_lines()
                next(lines)
                service.drain()  # what SIGTERM does under `run_server`
                refused = http.post("/v1/completions", json={"prompt": "w5", "max_tokens": 2})
                assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
                assert http.get("/health").status_code == 503
                rest = "\n".join(lines)  # the in-flight stream ends with an error event, not silence
            assert "shutting down" in rest and rest.rstrip().endswith("data: [DONE]")
    assert engine.batch_size == 0


def test_drain_lets_requests_in_flight_finish_within_the_grace(dt):
    app = create_app(dt, shutdown_timeout=60)
    slowed(app, 0.002)
    with TestClient(app):  # (its lifespan closes the engine at the end)
        async def fire():
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as http:
                pending = asyncio.ensure_future(http.post("/v1/completions", json={"prompt": "w5", "max_tokens": 60}))
                await asyncio.sleep(0.3)
                app.state.service.drain()
                late = await http.post("/v1/completions", json={"prompt": "w5", "max_tokens": 2})
                return await pending, late

        done, late = asyncio.run(fire())
        assert late.status_code == 503
        assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 60


def test_metrics_change_as_requests_complete(dt):
    app = create_app(dt, max_batch=4)
    with TestClient(app) as client:
        before = client.get("/metrics")
        assert before.status_code == 200 and before.headers["content-type"].startswith("text/plain")
        r = client.post("/v1/completions", json={"prompt": "w5 w6", "max_tokens": 7})
        tokens = r.json()["usage"]["completion_tokens"]
        r2 = client.post("/v1/completions", json={"prompt": "w5", "stream": True, "max_tokens": 5})
        assert r2.status_code == 200
        client.post("/v1/completions", json={"prompt": ""})
        after = client.get("/metrics").text
    path = "/v1/completions"
    assert metric(after, "dyntree_http_requests_total", path=path, status="200") == 2
    assert metric(after, "dyntree_http_requests_total", path=path, status="400") == 1
    assert metric(after, "dyntree_http_requests_total", path="/metrics", status="200") == 1
    finished = sum(metric(after, "dyntree_requests_finished_total", reason=r) for r in ("stop", "length"))
    assert finished == 2
    generated = metric(after, "dyntree_generated_tokens_total")
    assert tokens + 1 <= generated <= tokens + 5
    steps = metric(after, "dyntree_step_seconds_count")
    assert steps >= tokens - 1 and metric(after, "dyntree_step_seconds_sum") > 0
    assert metric(after, "dyntree_tokens_per_pass_count") == metric(after, "dyntree_step_batch_size_sum")
    assert metric(after, "dyntree_tokens_per_pass_sum") == generated - 2  # the two first tokens come from prefills
    assert metric(after, "dyntree_queue_depth") == 0 and metric(after, "dyntree_batch_size") == 0
    # Each app has its own registry: a second app starts from zero.
    other = create_app(dt)
    assert metric(other.state.service.metrics.render().decode(), "dyntree_generated_tokens_total") == 0
    other.state.service.close()


def test_sigterm_finishes_the_request_in_flight_then_exits(tiny_model_dir):  # noqa: F811
    """The real command: SIGTERM while a stream is decoding; the stream still ends normally, new connections
    are refused, and the process exits."""
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    process = subprocess.Popen([sys.executable, "-m", "dyntree", "serve", "--model", str(tiny_model_dir),
                                "--heads", "none", "--port", str(port), "--threads", "1", "--log-level", "warning",
                                "--shutdown-timeout", "60"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _healthy(url), 120), "the server did not start"
        body = {"prompt": "the cat sat on the mat", "max_tokens": 480, "stream": True}
        with httpx.Client(base_url=url, timeout=60) as http:
            with http.stream("POST", "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                next(lines)
                process.send_signal(signal.SIGTERM)
                rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in rest[-2], rest[-2:]
        assert process.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a graceful stop
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if process.poll() is None:
            process.kill()
        output = process.communicate()[0]
    assert "shutting down: new requests get 503; 1 decoding" in output, output  # it was in flight


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("kwargs,words", [({"max_batch": 0}, "max batch"), ({"max_queue": -1}, "max queue"),
                                          ({"request_timeout": 0}, "timeout"), ({"shutdown_timeout": -1}, "shutdown"),
                                          ({"max_model_len": 100000}, "context"), ({"max_body_bytes": 10}, "body")])
def test_bad_server_settings_are_one_line_errors(dt, kwargs, words):
    from dyntree.errors import DynTreeError

    with pytest.raises(DynTreeError, match=words):
        create_app(dt, **kwargs)
