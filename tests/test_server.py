"""`dyntree serve`: the OpenAI-style HTTP API on a tiny random Llama with random heads (FastAPI TestClient)."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from dyntree.api import DynTree
from dyntree.cli import main
from dyntree.sampling import SamplingConfig
from dyntree.server import create_app
from dyntree.textstream import find_stop, held_back

from test_bench import tiny_model_dir  # noqa: F401 - the tiny model with a tokenizer and a chat template

PROMPT = "write a short story about the cat ."
MESSAGES = [{"role": "system", "content": "answer in one line ."}, {"role": "user", "content": PROMPT}]
MAX = 24


@pytest.fixture(scope="module")
def dt(tiny_model_dir):  # noqa: F811
    return DynTree.from_pretrained(str(tiny_model_dir), heads="random", tree="static")


@pytest.fixture(scope="module")
def name(tiny_model_dir):  # noqa: F811
    return tiny_model_dir.name  # what the server calls a model loaded from a directory


@pytest.fixture(scope="module")
def client(dt):
    with TestClient(create_app(dt, default_max_tokens=8)) as c:
        yield c


@pytest.fixture(scope="module")
def plain(dt):
    """Plain autoregressive decoding, the reference every greedy answer must equal token for token."""
    return dt.with_tree("ar")


def sse_events(response) -> list:
    """The `data:` payloads of a server-sent event stream, JSON-decoded except the final [DONE]."""
    out = []
    for block in response.text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": MAX, **body})


def complete(client, **body):
    return client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": MAX, **body})


# -- greedy: token-exact with plain decoding, whatever the tree -------------------------------------------------
@pytest.mark.parametrize("tree", [None, "ar", "static", "dynamic"])
def test_greedy_chat_equals_plain_decoding(client, plain, name, tree):
    extra = {} if tree is None else {"tree": tree}
    r = chat(client, return_token_ids=True, **extra)
    assert r.status_code == 200, r.text
    body = r.json()
    ref = plain.generate(MESSAGES, max_new_tokens=MAX)
    choice = body["choices"][0]
    assert choice["token_ids"] == ref.token_ids
    assert choice["message"] == {"role": "assistant", "content": ref.text}
    assert body["prompt_token_ids"] == plain.encode(MESSAGES)
    assert body["object"] == "chat.completion" and body["model"] == name
    expected_finish = "stop" if ref.stats.stop_reasons[0] == "eos" else "length"
    assert choice["finish_reason"] == expected_finish
    stats = body["dyntree"]
    assert stats["tree"].split(":")[0] == (tree or "static")
    assert stats["forward_passes"] >= 1 and stats["tokens_per_second"] > 0
    assert "RANDOM" in stats["heads"]


def test_greedy_completion_is_raw_text_and_equals_plain_decoding(client, plain):
    r = complete(client, return_token_ids=True)
    assert r.status_code == 200, r.text
    body = r.json()
    ref = plain.generate(PROMPT, max_new_tokens=MAX, chat=False)
    assert body["choices"][0]["token_ids"] == ref.token_ids
    assert body["choices"][0]["text"] == ref.text
    assert body["prompt_token_ids"] == plain.encode(PROMPT, chat=False) != plain.encode(PROMPT)
    assert body["object"] == "text_completion"


def test_completion_accepts_token_ids(client, plain):
    ids = plain.encode(PROMPT, chat=False)
    by_ids = complete(client, prompt=ids).json()["choices"][0]["text"]
    assert by_ids == complete(client).json()["choices"][0]["text"]


def test_usage_counts_prompt_and_completion_tokens(client, plain):
    body = chat(client).json()
    ref = plain.generate(MESSAGES, max_new_tokens=MAX)
    prompt_tokens = len(plain.encode(MESSAGES))
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": len(ref.token_ids),
                             "total_tokens": prompt_tokens + len(ref.token_ids)}
    stats = body["dyntree"]
    # forward passes: the prefill (first token) plus decoding passes of `mean_accepted_per_pass` tokens each.
    passes = stats["forward_passes"] - 1
    assert 1 + passes * stats["mean_accepted_per_pass"] == pytest.approx(len(ref.token_ids), abs=1e-3)


def test_default_max_tokens_comes_from_the_app(client):
    body = client.post("/v1/completions", json={"prompt": PROMPT}).json()
    assert body["usage"]["completion_tokens"] <= 8


def test_max_completion_tokens_takes_precedence(client):
    body = chat(client, max_completion_tokens=3).json()
    assert body["usage"]["completion_tokens"] <= 3


# -- streaming -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tree", ["static", "dynamic"])
def test_chat_stream_concatenates_to_the_greedy_text(client, plain, tree):
    r = chat(client, stream=True, tree=tree, return_token_ids=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    ref = plain.generate(MESSAGES, max_new_tokens=MAX)
    text_chunks = [c for c in chunks[1:] if c["choices"] and "content" in c["choices"][0]["delta"]]
    assert "".join(c["choices"][0]["delta"]["content"] for c in text_chunks) == ref.text
    assert [t for c in text_chunks for t in c["choices"][0]["delta"]["token_ids"]] == ref.token_ids
    final, usage_chunk = chunks[-2], chunks[-1]
    assert final["choices"][0]["finish_reason"] in ("stop", "length") and final["choices"][0]["delta"] == {}
    # One event per forward pass that added text: never more events than passes.
    assert len(text_chunks) <= final["dyntree"]["forward_passes"]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == len(ref.token_ids)


def test_completion_stream_concatenates_to_the_greedy_text(client, plain):
    r = complete(client, stream=True)
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    ref = plain.generate(PROMPT, max_new_tokens=MAX, chat=False)
    assert "".join(c["choices"][0]["text"] for c in chunks) == ref.text
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and "dyntree" in chunks[-1]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert not any("usage" in c for c in chunks)  # only with stream_options.include_usage


def test_stream_errors_before_any_text_are_plain_400s(client):
    r = chat(client, stream=True, max_tokens=0)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = complete(client, stream=True, prompt="w " * 600)  # too long: found on the worker, still a 400
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]


# -- stop strings ------------------------------------------------------------------------------------------------
def test_stop_string_cuts_the_text_and_counts_tokens_up_to_it(client, plain):
    ref = plain.generate(PROMPT, max_new_tokens=MAX, chat=False)
    words = ref.text.split()
    assert len(words) >= 4, ref.text
    stop = " ".join(words[2:4])
    cut = ref.text.index(stop)
    body = complete(client, stop=[stop, "never appears"]).json()
    assert body["choices"][0]["text"] == ref.text[:cut]
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] < len(ref.token_ids)
    streamed = sse_events(complete(client, stop=stop, stream=True))
    assert "".join(c["choices"][0]["text"] for c in streamed[:-1]) == ref.text[:cut]
    assert streamed[-2]["choices"][0]["finish_reason"] == "stop"


def test_text_held_back_for_a_stop_string_is_sent_when_it_never_completes(client, plain):
    ref = plain.generate(PROMPT, max_new_tokens=MAX, chat=False)
    stop = ref.text + " never"  # every partial answer could still become the stop string
    events = sse_events(complete(client, stop=stop, stream=True))
    assert "".join(c["choices"][0]["text"] for c in events[:-1]) == ref.text
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert events[-2]["choices"][0]["finish_reason"] == ("stop" if ref.stats.stop_reasons[0] == "eos" else "length")


def test_stop_helpers():
    assert find_stop("abc STOP def", ["STOP", "c S"]) == 2
    assert find_stop("abc", ["x"]) == -1
    assert held_back("hello wor", ["world"]) == 3
    assert held_back("hello", ["world"]) == 0
    assert held_back("ab", ["abc", "b"]) == 2


# -- sampling -------------------------------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible(client, dt):
    hot = dict(temperature=1.5, seed=7, max_tokens=MAX, return_token_ids=True)
    first = complete(client, **hot).json()["choices"][0]
    assert complete(client, **hot).json()["choices"][0] == first
    # It is the engine's sampling: the same seed through the library gives the same tokens.
    cfg = SamplingConfig(temperature=1.5, seed=7)
    assert dt.generate(PROMPT, MAX, chat=False, sampling=cfg).token_ids == first["token_ids"]
    others = {tuple(complete(client, **dict(hot, seed=s)).json()["choices"][0]["token_ids"]) for s in range(4)}
    assert len(others) > 1, "different seeds should give different samples at temperature 1.5"
    typical = chat(client, temperature=1.5, seed=7, acceptance="typical").json()
    assert typical["dyntree"]["acceptance"].startswith("typical")


def test_stream_and_non_stream_sample_the_same_with_a_seed(client):
    hot = dict(temperature=1.5, seed=3, top_p=0.9, top_k=20)
    text = chat(client, **hot).json()["choices"][0]["message"]["content"]
    events = sse_events(chat(client, stream=True, **hot))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in events[:-1]) == text


# -- per-request trees ------------------------------------------------------------------------------------------------
def test_trees_are_built_once_per_setting(client):
    trees = client.app.state.service.engine.trees
    built = len(trees)
    for _ in range(2):
        assert chat(client, tree="dynamic", tree_size=6, topk=3).status_code == 200
    key = (("topk", 3), ("tree", "dynamic"), ("tree_size", 6))
    dt = trees[key]
    assert dt.proposer.tree_size == 6 and dt.proposer.topk == 3
    assert chat(client, tree="dynamic", tree_size=6, topk=3).json()["dyntree"]["tree"].startswith("dynamic:n6:k3")
    assert trees[key] is dt and len(trees) == built + 1
    assert chat(client, tree="dynamic", lookup=0).status_code == 200
    assert trees[(("lookup", 0), ("tree", "dynamic"))].proposer.lookup is None  # heads only
    assert chat(client, tree="static", tree_size=8).json()["dyntree"]["tree"] == "static:mc_sim_7b_63:8"


def test_concurrent_requests_are_batched_on_one_thread_and_equal_solo_answers(dt, plain, monkeypatch):
    """Six requests at once (three trees, streamed or not, different lengths) share decoding steps on the
    engine's one thread, and every greedy answer is plain decoding's answer to that prompt alone."""
    app = create_app(dt, max_batch=4)
    engine = app.state.service.engine
    threads, batch_sizes = set(), []
    step = engine.step

    def watched():
        threads.add(threading.current_thread().name)
        batch_sizes.append(engine.batch_size)
        time.sleep(0.002)  # let the requests pile up, so that they do share steps
        return step()

    monkeypatch.setattr(engine, "step", watched)
    prompts = [PROMPT, "w10 w11 w12 .", "w5 w6 w7", PROMPT + " w3", "w40 w41", "w9 w9 w9 w9"]
    lengths = [MAX, 10, 30, 5, 40, 17]

    async def fire():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as http:
            bodies = [{"prompt": p, "max_tokens": n, "tree": t, "stream": i % 2 == 1, "return_token_ids": True}
                      for i, (p, n, t) in enumerate(zip(prompts, lengths, ["static", "dynamic", "ar"] * 2))]
            return await asyncio.gather(*(http.post("/v1/completions", json=b) for b in bodies))

    try:
        responses = asyncio.run(fire())
    finally:
        app.state.service.close()
    for i, (r, p, n) in enumerate(zip(responses, prompts, lengths)):
        assert r.status_code == 200, r.text
        ref = plain.generate(p, max_new_tokens=n, chat=False)
        if i % 2:
            chunks = sse_events(r)[:-1]
            assert "".join(c["choices"][0]["text"] for c in chunks) == ref.text
        else:
            assert r.json()["choices"][0]["token_ids"] == ref.token_ids
    assert max(batch_sizes) > 1, "requests never shared a step"
    assert threads == {"dyntree-engine"}


# -- bad input: 400 with one line ----------------------------------------------------------------------------------
BAD_REQUESTS = [
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "  "}]}, "no content"),
    ("/v1/chat/completions", {"messages": "hello"}, "messages"),
    ("/v1/chat/completions", {}, "messages"),
    ("/v1/completions", {"prompt": ""}, "empty"),
    ("/v1/completions", {"prompt": []}, "empty"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "one prompt"),
    ("/v1/completions", {"prompt": [5, 100000]}, "vocabulary"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": -3}, "max_tokens"),
    ("/v1/completions", {"prompt": "w " * 600}, "context"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 100000}, "context"),
    ("/v1/completions", {"prompt": PROMPT, "tree": "huge"}, "unknown tree"),
    ("/v1/completions", {"prompt": PROMPT, "tree": "/etc/passwd"}, "unknown tree"),
    ("/v1/completions", {"prompt": PROMPT, "tree": "ar", "tree_size": 8}, "tree size"),
    ("/v1/completions", {"prompt": PROMPT, "tree": "dynamic", "tree_size": 1}, "tree size"),
    ("/v1/completions", {"prompt": PROMPT, "tree": "dynamic", "tree_size": "big"}, "tree size"),
    ("/v1/completions", {"prompt": PROMPT, "tree": "dynamic", "tree_size": 200, "topk": 2}, "exceeds"),
    ("/v1/completions", {"prompt": PROMPT, "topk": 0}, "topk"),
    ("/v1/completions", {"prompt": PROMPT, "lookup": -1}, "lookup"),
    ("/v1/completions", {"prompt": PROMPT, "tree": "static", "lookup": 4}, "lookup"),
    ("/v1/completions", {"prompt": PROMPT, "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": PROMPT, "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": PROMPT, "top_p": 0}, "top-p"),
    ("/v1/completions", {"prompt": PROMPT, "top_p": 1.5}, "top-p"),
    ("/v1/completions", {"prompt": PROMPT, "top_k": -5}, "top-k"),
    ("/v1/completions", {"prompt": PROMPT, "seed": -1}, "seed"),
    ("/v1/completions", {"prompt": PROMPT, "acceptance": "fast"}, "acceptance"),
    ("/v1/completions", {"prompt": PROMPT, "stop": ""}, "stop"),
    ("/v1/completions", {"prompt": PROMPT, "n": 2}, "n must be 1"),
    ("/v1/completions", {"prompt": PROMPT, "frequency_penalty": 0.5}, "frequency_penalty"),
    ("/v1/completions", {"prompt": PROMPT, "echo": True}, "echo"),
]


@pytest.mark.parametrize("path,body,words", BAD_REQUESTS, ids=[f"{p.split('/')[-1]}-{i}" for i, (p, _, _) in
                                                                enumerate(BAD_REQUESTS)])
def test_bad_input_is_a_400_with_one_line(client, path, body, words):
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "\n" not in error["message"] and words in error["message"], error["message"]


def test_broken_json_is_a_400(client):
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_unknown_model_and_path_are_404s_in_the_same_shape(client, name):
    r = complete(client, model="gpt-4")
    assert r.status_code == 404 and name in r.json()["error"]["message"]
    assert complete(client, model=name).status_code == 200
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "message" in r.json()["error"]


def test_no_heads_server_only_offers_plain_decoding(tiny_model_dir):  # noqa: F811
    dt = DynTree.from_pretrained(str(tiny_model_dir), heads=None)
    with TestClient(create_app(dt, served_model_name="plain")) as c:
        r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "tree": "static"})
        assert r.status_code == 400 and "no heads" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "model": "plain"})
        assert r.status_code == 200 and r.json()["dyntree"]["tree"] == "ar" and r.json()["model"] == "plain"


# -- health, models, CLI ---------------------------------------------------------------------------------------
def test_health_and_models(client, name):
    assert client.get("/health").json() == {"status": "ok", "model": name}
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [name]
    assert models["data"][0]["max_model_len"] == 512


def test_cli_serve_builds_the_app_and_runs_uvicorn(tiny_model_dir, monkeypatch, capsys):  # noqa: F811
    seen = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda server: seen.update(config=server.config, server=server))
    assert main(["serve", "--model", str(tiny_model_dir), "--heads", "random", "--tree", "dynamic",
                 "--tree-size", "5", "--port", "8123", "--served-model-name", "tiny", "--threads", "1",
                 "--max-batch", "3", "--max-queue", "5", "--shutdown-timeout", "7"]) == 0
    config = seen["config"]
    assert config.host == "127.0.0.1" and config.port == 8123 and config.timeout_graceful_shutdown == 12
    assert "up to 3 requests decode together, 5 more may wait" in capsys.readouterr().out
    service = config.app.state.service
    assert (service.engine.max_batch, service.engine.max_queue, service.request_timeout) == (3, 5, 300.0)
    with TestClient(config.app) as c:
        r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})
        assert r.status_code == 200 and r.json()["dyntree"]["tree"].startswith("dynamic:n5")
        assert r.json()["model"] == "tiny"
        seen["server"].handle_exit(15, None)  # SIGTERM: the app stops taking requests before uvicorn stops
        assert not service.engine.accepting and seen["server"].should_exit
        r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})
        assert r.status_code == 503 and "shutting down" in r.json()["error"]["message"]
        assert c.get("/health").status_code == 503


def test_cli_serve_without_fastapi_says_what_to_install(tiny_model_dir, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # makes `import uvicorn` fail
    assert main(["serve", "--model", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'dyntree[server]'" in err


def test_cli_serve_rejects_bad_options(tiny_model_dir, capsys):  # noqa: F811
    assert main(["serve", "--model", str(tiny_model_dir), "--port", "70000"]) == 2
    assert main(["serve", "--model", str(tiny_model_dir), "--max-tokens", "0"]) == 2
    assert main(["serve", "--model", str(tiny_model_dir), "--max-batch", "0"]) == 2
    assert main(["serve", "--model", str(tiny_model_dir), "--max-queue", "-1"]) == 2
    assert capsys.readouterr().err.count("error:") == 4


@pytest.mark.slow
def test_default_model_served_greedy_equals_plain_decoding():
    """The real model with its bundled heads: the served answer is plain greedy decoding's, in fewer passes."""
    dt = DynTree.from_pretrained("default", tree="dynamic")
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    with TestClient(create_app(dt)) as c:
        body = c.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 24,
                                                    "return_token_ids": True}).json()
    ref = dt.with_tree("ar").generate(messages, max_new_tokens=24)
    assert body["choices"][0]["token_ids"] == ref.token_ids
    assert body["model"] == "SmolLM2-135M-Instruct"
    assert body["dyntree"]["forward_passes"] < len(ref.token_ids)  # the heads do guess right sometimes
