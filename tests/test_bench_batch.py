"""`dyntree bench --batch-size`: prompts decoded B at a time, one record per sequence, and the sweep's table."""

from __future__ import annotations

import json

import pytest

from dyntree.bench import BenchContext, BenchSettings, build_methods, collect_results, load_prompts, \
    parse_method_list, run_benchmark
from dyntree.bench.runner import batch_groups, split_seconds
from dyntree.bench.sweep import parse_batch_sizes, sweep_markdown, sweep_rows
from dyntree.cli import main
from dyntree.errors import DynTreeError

from test_bench import prompts_file, tiny_model_dir  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def runs(tiny_model_dir, prompts_file):  # noqa: F811
    """The same methods at batch 1 and batch 2 (two turns: the second turns form their own groups)."""
    context = BenchContext(model=str(tiny_model_dir), heads="random")
    methods = build_methods(parse_method_list("ar,static,dynamic:n=auto:max=8"), context)
    prompts = load_prompts(prompts_file)
    out = {}
    for size in (1, 2):
        settings = BenchSettings(max_new_tokens=14, turns=2, seed=0, warmup=1, repeats=1, kl_samples=0,
                                 batch_size=size)
        bench = run_benchmark(methods, prompts, context, settings)
        out[size] = (bench, collect_results(bench, context, f"dyntree bench --batch-size {size} (test)", "test"))
    return out


def test_batched_sequences_equal_their_batch_one_runs(runs):
    one, two = runs[1][0], runs[2][0]
    by_key = {(r.method, r.prompt_id, r.turn): r.token_ids for r in one.records}
    assert len(two.records) == len(one.records) == 3 * 5  # 3 methods x (3 first turns + 2 second turns)
    for r in two.records:
        assert r.token_ids == by_key[(r.method, r.prompt_id, r.turn)]
    results = runs[2][1]
    assert results["settings"]["batch_size"] == 2
    for name, m in results["methods"].items():
        if name != "ar":
            assert m["exact_match_rate"] == 1.0 and m["exact_compared"] == 5


def test_batched_timing_counts_every_sequence(runs):
    bench, results = runs[2]
    groups = {}
    for r in bench.records:
        groups.setdefault((r.method, r.group), []).append(r)
    # 3 first turns -> groups of 2 and 1; 2 second turns -> one group of 2
    assert sorted(len(g) for (m, _), g in groups.items() if m == "ar") == [1, 2, 2]
    for members in groups.values():
        assert sum(r.wall_seconds for r in members) == pytest.approx(members[0].group_wall_seconds)
        assert sum(len(r.accepted_lengths) for r in members) >= max(r.decode_passes for r in members)
        for r in members:
            assert sum(r.accepted_lengths) + 1 == r.new_tokens  # the first token comes from the prefill
    ar = [r for r in bench.records if r.method == "ar"]
    seconds = sum(g[0].group_wall_seconds for (m, _), g in groups.items() if m == "ar")
    assert results["methods"]["ar"]["tokens_per_second"] == pytest.approx(sum(r.new_tokens for r in ar) / seconds)


def test_split_and_groups():
    assert split_seconds(3.0, [1, 2]) == [1.0, 2.0] and split_seconds(2.0, [0, 0]) == [1.0, 1.0]
    assert [list(g) for g in batch_groups(5, 2)] == [[0, 1], [2, 3], [4]]


def test_sweep_table_has_a_row_per_batch_size(runs):
    results = [runs[2][1], runs[1][1]]
    rows = sweep_rows(results)
    assert [r["batch_size"] for r in rows] == [1, 2]
    md = sweep_markdown(results, "dyntree bench --batch-size 1,2")
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| batch | ar tok/s | static tok/s (vs ar)") and len(lines) == 3
    assert lines[2].startswith("| 2 |") and "100% of 5" in lines[2]
    speedup = rows[1]["methods"]["static"]["speedup_vs_ar"]
    assert f"({speedup:.2f}x)" in lines[2]
    assert lines[2].endswith("| 15/15 |")  # 3 greedy methods x 5 sequences, each equal to ar alone (batch 1)
    assert rows[1]["methods"]["ar"]["equal_to_ar_batch1"] == 5
    broken = json.loads(json.dumps(results))
    broken[0]["runs"][0]["token_ids"] = broken[0]["runs"][0]["token_ids"][:-1]  # one batched sequence differs
    assert sweep_markdown(broken, "x").splitlines()[5].endswith("| 14/15 |")


def test_cli_sweep_writes_every_run_and_the_table(tiny_model_dir, prompts_file, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "sweep"
    code = main(["bench", "--methods", "ar,dynamic", "--prompts", str(prompts_file), "--batch-size", "1,3",
                 "--max-new-tokens", "8", "--kl-samples", "0", "--model", str(tiny_model_dir), "--heads", "random",
                 "--out", str(out)])
    assert code == 0
    for size in (1, 3):
        results = json.loads((out / f"batch{size}" / "results.json").read_text())
        assert results["settings"]["batch_size"] == size
        assert ("--batch-size 3" in results["command"]) == (size == 3)
    summary = json.loads((out / "batch_sweep.json").read_text())
    assert [r["batch_size"] for r in summary["rows"]] == [1, 3] and "--batch-size 1,3" in summary["command"]
    assert "| 3 |" in (out / "batch_sweep.md").read_text()
    assert (out / "batch_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "batch_sweep.md" in capsys.readouterr().out


@pytest.mark.parametrize("value, message", [("0", "positive integers"), ("x", "positive integers"),
                                            ("2,2", "listed twice"), ("1,", "positive integers"),
                                            ("-1", "positive integers"), ("9", "exceeds the 3 prompts")])
def test_bad_batch_sizes_give_one_line(value, message, prompts_file, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    assert main(["bench", "--methods", "ar", "--prompts", str(prompts_file), f"--batch-size={value}",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not out.exists()


def test_methods_without_batches_are_refused(tiny_model_dir, prompts_file, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    assert main(["bench", "--methods", "hf,ar", "--prompts", str(prompts_file), "--batch-size", "2",
                 "--model", str(tiny_model_dir), "--heads", "random", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "hf cannot decode batches" in err and "\n" not in err
    with pytest.raises(DynTreeError, match="--batch-size must be at least 1"):
        BenchSettings(batch_size=0).validate()


def test_parse_batch_sizes():
    assert parse_batch_sizes("4") == [4] and parse_batch_sizes("1, 2,4") == [1, 2, 4] and parse_batch_sizes(8) == [8]


def test_batch_latency_is_measured_before_the_timed_runs(tiny_model_dir, prompts_file):  # noqa: F811
    context = BenchContext(model=str(tiny_model_dir), heads="random")
    (method,) = build_methods(parse_method_list("dynamic:n=auto:max=6"), context)
    calls = []
    real = method.prepare_batch
    method.prepare_batch = lambda size: calls.append(size) or real(size)
    settings = BenchSettings(max_new_tokens=6, turns=1, warmup=0, kl_samples=0, batch_size=3)
    run_benchmark([method], load_prompts(prompts_file), context, settings)
    assert calls == [3] and 3 in method.dyntree.proposer._batch_latency.tree
