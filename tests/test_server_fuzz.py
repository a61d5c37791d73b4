"""HTTP fuzzing of `dyntree serve`: whatever a client sends, the answer is a 4xx with a one-line message (never a
500 or a hang), and the server keeps serving the next request. Tiny random model, random heads."""

from __future__ import annotations

import json
import random

import pytest
from fastapi.testclient import TestClient

from dyntree.api import DynTree
from dyntree.server import create_app

from test_bench import tiny_model_dir  # noqa: F401 - the tiny model with a tokenizer and a chat template

VALID = {"prompt": "w5 w6 w7 w8", "max_tokens": 3}
CHAT = {"messages": [{"role": "user", "content": "w5 w6"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def client(tiny_model_dir):  # noqa: F811
    dt = DynTree.from_pretrained(str(tiny_model_dir), heads="random", tree="dynamic")
    with TestClient(create_app(dt, default_max_tokens=4, max_body_bytes=64 * 1024)) as c:
        yield c


def raw(client, path: str, body: bytes, content_type: str = "application/json"):
    return client.post(path, content=body, headers={"content-type": content_type})


def assert_clear_4xx(response, *words: str, status: int | None = None) -> str:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    if status is not None:
        assert response.status_code == status, response.text[:300]
    error = response.json()["error"]
    message = error["message"]
    assert message and "\n" not in message and len(message) < 400, message
    assert "Traceback" not in message
    for word in words:
        assert word in message, message
    return message


def assert_still_serving(client):
    r = client.post("/v1/completions", json=VALID)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


MALFORMED = [b"", b"{", b"[", b"{\"prompt\": }", b"{'prompt': 'single quotes'}", b"{\"prompt\": \"w5\",}", b"null",
             b"42", b"\"w5 w6\"", b"[1, 2, 3]", b"{\"prompt\": \"w5\"} trailing", b"\x00\x01\x02", b"NaN",
             b"{\"prompt\": \"w5\", \"max_tokens\": NaN}", b"[" * 5000 + b"]" * 5000]


@pytest.mark.parametrize("body", MALFORMED, ids=range(len(MALFORMED)))
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_malformed_json_is_a_400(client, path, body):
    assert_clear_4xx(raw(client, path, body), status=400)
    assert_still_serving(client)


WRONG_TYPES = [
    ("/v1/completions", {"prompt": 5}, "prompt"),
    ("/v1/completions", {"prompt": {"text": "w5"}}, "prompt"),
    ("/v1/completions", {"prompt": [1.5, 2]}, "prompt"),
    ("/v1/completions", {"prompt": ["w5", 3]}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2]]}, "prompt"),
    ("/v1/completions", {"prompt": None}, "prompt"),
    ("/v1/completions", dict(VALID, max_tokens="ten"), "max_tokens"),
    ("/v1/completions", dict(VALID, max_tokens=1.5), "max_tokens"),
    ("/v1/completions", dict(VALID, max_tokens=True), "max_tokens"),
    ("/v1/completions", dict(VALID, temperature=[]), "temperature"),
    ("/v1/completions", dict(VALID, stream="yes please"), "stream"),
    ("/v1/completions", dict(VALID, stop=5), "stop"),
    ("/v1/completions", dict(VALID, stop=["a", "b", "c", "d", "e"]), "stop"),
    ("/v1/completions", dict(VALID, seed="x"), "seed"),
    ("/v1/completions", dict(VALID, seed=2 ** 70), "seed"),
    ("/v1/completions", dict(VALID, tree_size=[]), "tree_size"),
    ("/v1/completions", dict(VALID, top_p={}), "top_p"),
    ("/v1/completions", dict(VALID, stream_options=3), "stream_options"),
    ("/v1/chat/completions", {"messages": [1, 2]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "w5"}]}, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 7}]}, "content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text"),
    ("/v1/chat/completions", {"messages": {"role": "user"}}, "messages"),
]


@pytest.mark.parametrize("path,body,word", WRONG_TYPES, ids=range(len(WRONG_TYPES)))
def test_wrong_types_are_400s_naming_the_field(client, path, body, word):
    assert_clear_4xx(client.post(path, json=body), word, status=400)


@pytest.mark.parametrize("value", [10 ** 30, 2 ** 63, 2 ** 31, 100000, -1, -(2 ** 63), 0])
def test_huge_or_negative_max_tokens_is_a_400(client, value):
    assert_clear_4xx(client.post("/v1/completions", json=dict(VALID, max_tokens=value)), "max_tokens", status=400)
    assert_clear_4xx(client.post("/v1/chat/completions", json=dict(CHAT, max_tokens=value)), "max_tokens",
                     status=400)


def test_unknown_fields_and_models(client, tiny_model_dir):  # noqa: F811
    assert_clear_4xx(client.post("/v1/completions", json=dict(VALID, temprature=0.5)), "unknown field 'temprature'",
                     status=400)
    assert_clear_4xx(client.post("/v1/chat/completions", json=dict(CHAT, ignore_eos=True, best=1)),
                     "unknown field 'best'", "1 more", status=400)
    assert_clear_4xx(client.post("/v1/completions", json=dict(VALID, model="gpt-4")), "not served", status=404)
    # OpenAI fields that change nothing here pass.
    assert client.post("/v1/chat/completions", json=dict(CHAT, user="u1", metadata={"a": "b"})).status_code == 200
    assert client.post("/v1/completions", json=dict(VALID, model=tiny_model_dir.name)).status_code == 200


def test_prompts_longer_than_the_context_are_400s(client):
    context = client.get("/v1/models").json()["data"][0]["max_model_len"]
    assert_clear_4xx(client.post("/v1/completions", json={"prompt": [5] * context, "max_tokens": 1}), "context",
                     status=400)
    assert_clear_4xx(client.post("/v1/completions", json={"prompt": "w5 " * (context + 10)}), "context", status=400)
    long_chat = {"messages": [{"role": "user", "content": "w5 " * context}], "stream": True}
    assert_clear_4xx(client.post("/v1/chat/completions", json=long_chat), "context", status=400)
    assert_still_serving(client)


def test_invalid_utf8_is_a_400(client):
    for body in (b'{"prompt": "w5 \xff\xfe w6"}', b'\xef\xbb\xbf{"prompt": "w5"}\xc3', b'{"prompt": "\xed\xa0\x80"}'):
        assert_clear_4xx(raw(client, "/v1/completions", body), status=400)
    # A lone surrogate escaped in valid JSON is a string no tokenizer takes.
    for path, body in (("/v1/completions", b'{"prompt": "w5 \\ud800 w6"}'),
                       ("/v1/completions", b'{"prompt": "w5", "stop": "\\udc00"}'),
                       ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}')):
        assert_clear_4xx(raw(client, path, body), "not valid Unicode", status=400)
    assert_still_serving(client)


def test_one_megabyte_bodies_are_413s(client):
    big_prompt = json.dumps({"prompt": "w5 " * (1 << 18)}).encode()
    assert len(big_prompt) > 1 << 19
    assert_clear_4xx(raw(client, "/v1/completions", big_prompt), "larger than", status=413)
    garbage = random.Random(0).randbytes(1 << 20)
    assert_clear_4xx(raw(client, "/v1/chat/completions", garbage, "application/octet-stream"), "larger than",
                     status=413)

    def chunks():  # no content-length: the limit applies while reading
        for _ in range(32):
            yield b"x" * (1 << 15)

    r = client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert_clear_4xx(r, "larger than", status=413)
    assert_still_serving(client)


def test_other_content_types_and_methods(client):
    assert_clear_4xx(raw(client, "/v1/completions", json.dumps(VALID).encode(), "text/plain"), status=400)
    assert client.get("/v1/completions").status_code == 405
    assert_clear_4xx(client.get("/v1/completions"))


def _mutations(rng: random.Random, base: dict):
    values = [None, 0, -1, 1, 3, 2 ** 40, -(2 ** 40), 1.5, float("inf"), "", "w5", "\u0000", "\U0001f600" * 3,
              [], [1], ["w5"], {}, {"a": 1}, True, False, "auto", "dynamic", "static", "ar", "lossless"]
    fields = list(base) + ["temperature", "top_p", "top_k", "seed", "stop", "stream", "tree", "tree_size", "topk",
                           "lookup", "acceptance", "n", "logprobs", "max_completion_tokens", "stream_options",
                           "return_token_ids", "typical_eps", "model"]
    body = dict(base)
    for _ in range(rng.randint(1, 3)):
        kind = rng.random()
        name = rng.choice(fields)
        if kind < 0.15:
            body.pop(name, None)
        else:
            body[name] = rng.choice(values)
    if isinstance(body.get("max_tokens"), int) and not isinstance(body.get("max_tokens"), bool) \
            and 3 < body["max_tokens"] < 2 ** 31:
        body["max_tokens"] = 3  # keep the valid ones quick
    text = json.dumps(body, allow_nan=True)
    if rng.random() < 0.2:  # cut or corrupt the bytes too
        data = bytearray(text.encode())
        if rng.random() < 0.5:
            data = data[: rng.randrange(len(data))]
        else:
            data[rng.randrange(len(data))] = rng.randrange(256)
        return bytes(data)
    return text.encode()


@pytest.mark.parametrize("seed", range(3))
def test_random_bodies_never_break_the_server(client, seed):
    rng = random.Random(seed)
    for i in range(40):
        path, base = (("/v1/completions", VALID), ("/v1/chat/completions", CHAT))[i % 2]
        body = _mutations(rng, base)
        r = raw(client, path, body)
        assert r.status_code in (200, 400, 404, 413), (body, r.status_code, r.text[:300])
        if r.status_code != 200:
            assert_clear_4xx(r)
        elif r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]
        else:
            assert r.json()["choices"], r.text[:300]
    assert_still_serving(client)
    assert client.app.state.service.engine.batch_size == 0  # nothing left holding a row
