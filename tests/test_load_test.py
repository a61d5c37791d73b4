"""benchmarks/load_test.py against a tiny-model server on a loopback port (a few requests: correctness only)."""

from __future__ import annotations

import json

import pytest

from dyntree.api import DynTree
from dyntree.server import create_app

from conftest import load_benchmark
from test_bench import tiny_model_dir  # noqa: F401 - the tiny model with a tokenizer and a chat template
from test_server_batching import serving, slowed


@pytest.fixture(scope="module")
def load_test():
    return load_benchmark("load_test")


def test_load_test_reports_every_request(load_test, tiny_model_dir, tmp_path):  # noqa: F811
    dt = DynTree.from_pretrained(str(tiny_model_dir), heads="random", tree="dynamic")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat sat on the mat\n{\"prompt\": \"write a short story about the cat .\"}\n")
    out = tmp_path / "load.json"
    with serving(create_app(dt, max_batch=2, max_queue=8)) as url:
        code = load_test.main(["--url", url, "--concurrency", "3", "--requests", "6", "--max-tokens", "12",
                               "--prompts", str(prompts), "--out", str(out)])
    summary = json.loads(out.read_text())
    assert code == 0 and summary["ok"] == 6 and summary["errors"] == 0 and summary["statuses"] == {"200": 6}
    assert summary["completion_tokens"] == 6 * 12  # the tiny model does not stop early on these prompts
    assert summary["throughput_tokens_per_s"] > 0
    assert 0 < summary["ttft_p50_s"] <= summary["latency_p50_s"] <= summary["latency_p95_s"]
    assert summary["distinct_answers_per_prompt"] == 1.0  # greedy answers did not change under load


def test_errors_are_counted_not_lost(load_test, tiny_model_dir, tmp_path):  # noqa: F811
    dt = DynTree.from_pretrained(str(tiny_model_dir), heads=None)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat sat on the mat\n")
    with serving(create_app(dt, max_batch=1, max_queue=0, max_model_len=20)) as url:
        summary = __import__("asyncio").run(load_test.run_load(url, 2, 4, 30, ["the cat sat on the mat"]))
    assert summary["ok"] == 0 and summary["errors"] == 4 and summary["statuses"] == {"400": 4}
    assert "context" in summary["error_messages"][0]


def test_slow_answers_time_out_and_count_as_errors(load_test, tiny_model_dir):  # noqa: F811
    import asyncio

    dt = DynTree.from_pretrained(str(tiny_model_dir), heads=None)
    app = create_app(dt, max_batch=2)
    slowed(app, 0.02)
    with serving(app) as url:
        summary = asyncio.run(load_test.run_load(url, 2, 3, 200, ["the cat sat on the mat"], timeout=0.3))
    assert summary["ok"] == 0 and summary["errors"] == 3
    assert "within 0.3 s" in summary["error_messages"][0]


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com", "https://8.8.8.8", "ftp://127.0.0.1",
                                 "http://[2001:db8::1]:80", "127.0.0.1:8000"])
def test_only_loopback_urls_are_accepted(load_test, url, tmp_path, capsys):
    assert load_test.main(["--url", url, "--concurrency", "1", "--requests", "1", "--out",
                           str(tmp_path / "x.json")]) == 2
    assert "error:" in capsys.readouterr().err and not (tmp_path / "x.json").exists()
    for ok in ("http://127.0.0.1:8000", "http://localhost:1/", "http://[::1]:8000", "http://127.1.2.3"):
        assert load_test.check_loopback(ok).startswith("http://")


def test_counts_and_sizes_are_bounded(load_test):
    import asyncio

    for args in ((1, 0, 8), (1, 10_001, 8), (0, 1, 8), (257, 1, 8), (1, 1, 0), (1, 1, 5000)):
        with pytest.raises(load_test.LoadTestError):
            asyncio.run(load_test.run_load("http://127.0.0.1:9", *args, ["x"]))


def test_percentile(load_test):
    assert load_test.percentile([], 0.5) is None
    assert load_test.percentile([3.0], 0.95) == 3.0
    assert load_test.percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert load_test.percentile([4.0, 1.0, 3.0, 2.0], 1.0) == 4.0
