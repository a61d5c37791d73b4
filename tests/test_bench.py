"""`dyntree bench` on a tiny random Llama saved as a Hugging Face directory with its own small tokenizer."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch

from dyntree.bench import (METHODS, BenchContext, BenchSettings, build_methods, collect_results, load_prompts,
                           parse_method_list, register_method, run_benchmark, summarize)
from dyntree.bench.methods import DynTreeMethod
from dyntree.bench.summary import first_mismatch
from dyntree.cli import main
from dyntree.errors import DynTreeError

WORDS = ("the a cat dog sat on mat ran to park and then slept in sun is big small red blue one two three four "
         "five six what why how write story about poem code add number list city year water ice tree bird "
         "sing fly house door open close hello world please tell me more short long answer question").split()
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer Llama (hidden 32) with a word-level tokenizer and a chat template, saved like a hub model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    special = ["<unk>", "<s>", "</s>", "<user>", "<assistant>", "<system>"]
    vocab = {tok: i for i, tok in enumerate(special + sorted(set(WORDS)) + [".", ",", "?", "!", "'", ":"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                     pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=2, bos_token_id=1, pad_token_id=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights: peaked, repetitive distributions, like a real model's
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6.0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "mt.jsonl"
    rows = [
        {"question_id": 1, "category": "writing", "turns": ["write a short story about the cat .",
                                                            "now tell me more ."]},
        {"question_id": 2, "category": "math", "turns": ["add one and two and three .", "why ?"]},
        {"question_id": 3, "category": "writing", "turns": ["write a poem about the sun and the tree ."]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def bench_results(tiny_model_dir, prompts_file):
    """One run with every standard method (and a two-turn prompt set) on the tiny model."""
    context = BenchContext(model=str(tiny_model_dir), heads="random")
    specs = parse_method_list("hf,hf-lookup:n=4,ar,static")
    methods = build_methods(specs, context)
    prompts = load_prompts(prompts_file)
    settings = BenchSettings(max_new_tokens=16, turns=2, seed=0, warmup=1, repeats=2)
    bench = run_benchmark(methods, prompts, context, settings)
    return bench, collect_results(bench, context, "dyntree bench (test)", str(prompts_file))


def test_every_method_runs_on_every_prompt_turn(bench_results):
    bench, results = bench_results
    names = ["hf", "hf-lookup:n=4", "ar", "static"]
    assert list(results["methods"]) == names
    # 3 prompts, the first two with two turns -> 5 prompt turns, each timed twice per method.
    for name in names:
        runs = [r for r in bench.records if r.method == name]
        assert len(runs) == 5 * 2
        assert all(r.new_tokens == len(r.token_ids) and 1 <= r.new_tokens <= 16 for r in runs)
        assert results["methods"][name]["prompts"] == 5


def test_round_robin_rotates_the_order(bench_results):
    bench, _ = bench_results
    firsts = [r.method for r in bench.records if r.order == 0]
    assert set(firsts) == {"hf", "hf-lookup:n=4", "ar", "static"}


def test_tokens_equal_the_sum_over_passes(bench_results):
    bench, results = bench_results
    for r in bench.records:
        if r.method in ("ar", "static"):
            # The prefill pass yields the first token; each decoding pass adds its accepted tokens.
            assert r.new_tokens == 1 + sum(r.accepted_lengths)
            assert len(r.accepted_lengths) == r.decode_passes
        if r.method == "ar":
            assert set(r.accepted_lengths) <= {1}
    for name in ("ar", "static"):
        m = results["methods"][name]
        hist = {int(k): v for k, v in m["accepted_histogram"].items()}
        first_runs = [r for r in bench.records if r.method == name and r.repeat == 0]
        assert sum(hist.values()) == sum(r.decode_passes for r in first_runs) == m["decode_passes"]
        assert sum(k * v for k, v in hist.items()) == m["new_tokens"] - len(first_runs)
        assert math.isclose(m["mean_accepted_per_pass"], sum(k * v for k, v in hist.items()) / sum(hist.values()))
    assert results["methods"]["ar"]["mean_accepted_per_pass"] == 1.0
    # transformers: passes are counted forward calls; plain generate makes one per token.
    hf = results["methods"]["hf"]
    assert hf["passes_source"] == "forward calls" and hf["accepted_histogram"] is None
    assert hf["decode_passes"] == hf["new_tokens"] - hf["prompts"]


def test_speedups_come_from_the_raw_timings(bench_results):
    bench, results = bench_results
    tps = {}
    for name in results["methods"]:
        per_prompt: dict = {}
        for r in bench.records:
            if r.method == name:
                per_prompt.setdefault((r.prompt_id, r.turn), []).append(r)
        tokens = sum(runs[0].new_tokens for runs in per_prompt.values())
        assert all(len(runs) == 2 for runs in per_prompt.values())
        seconds = sum((a.wall_seconds + b.wall_seconds) / 2 for a, b in per_prompt.values())  # median of two
        tps[name] = tokens / seconds
        assert math.isclose(results["methods"][name]["tokens_per_second"], tps[name], rel_tol=1e-9)
    for name, m in results["methods"].items():
        assert math.isclose(m["speedup_vs_hf"], tps[name] / tps["hf"], rel_tol=1e-9)
        assert math.isclose(m["speedup_vs_ar"], tps[name] / tps["ar"], rel_tol=1e-9)
    assert results["methods"]["hf"]["speedup_vs_hf"] == 1.0
    for m in results["methods"].values():
        assert set(m["by_category"]) == {"writing", "math"}


def test_exactness_is_measured_against_ar(bench_results):
    bench, results = bench_results
    ar = {(r.prompt_id, r.turn): r.token_ids for r in bench.records if r.method == "ar" and r.repeat == 0}
    for name, m in results["methods"].items():
        mine = {(r.prompt_id, r.turn): r.token_ids for r in bench.records if r.method == name and r.repeat == 0}
        same = sum(mine[k] == ar[k] for k in ar)
        assert m["exact_compared"] == len(ar) == 5
        assert m["exact_matches"] == same and m["exact_match_rate"] == same / 5
        assert len(m["mismatches"]) == 5 - same
    # Our tree decoding is lossless: the static tree reproduces plain decoding token for token.
    assert results["methods"]["static"]["exact_match_rate"] == 1.0
    assert results["methods"]["ar"]["exact_match_rate"] == 1.0


def test_static_tree_accepts_more_than_one_token_sometimes(bench_results):
    # A sanity check of the numbers, not of speed: random heads on a repetitive tiny model do guess some.
    _, results = bench_results
    assert results["methods"]["static"]["mean_accepted_per_pass"] >= 1.0
    assert results["methods"]["static"]["phase_ms_per_pass"].keys() == {"proposal", "forward", "verification",
                                                                         "cache"}


def test_second_turn_continues_the_reference_answer(bench_results, tiny_model_dir):
    bench, results = bench_results
    first_answer = next(r.token_ids for r in bench.records if r.method == "ar" and r.prompt_id == "1"
                        and r.turn == 1)
    second_input = bench.inputs[("1", 2)]["token_ids"]
    first_input = bench.inputs[("1", 1)]["token_ids"]
    assert len(second_input) > len(first_input) + 1
    assert second_input[: len(first_input) - 1] == first_input[:-1]  # same conversation start
    assert results["prompts"]["items"][0]["input_tokens"] == {"1": len(first_input), "2": len(second_input)}
    assert first_answer  # the answer is part of the second turn's context
    # every method saw the same input on every prompt turn
    for key in bench.inputs:
        assert len({r.prompt_tokens for r in bench.records if (r.prompt_id, r.turn) == key}) == 1


def test_mismatch_position():
    assert first_mismatch([1, 2, 3], [1, 2, 3]) is None
    assert first_mismatch([1, 2, 3], [1, 5, 3]) == 1
    assert first_mismatch([1, 2, 3], [1, 2]) == 2


def test_summary_reports_a_mismatch_down_to_the_token():
    from dyntree.bench.runner import RunRecord

    def record(method, tokens, seconds):
        return RunRecord(method=method, prompt_id="p", category=None, turn=1, repeat=0, order=0, prompt_tokens=3,
                         token_ids=tokens, new_tokens=len(tokens), wall_seconds=seconds, decode_passes=len(tokens) - 1,
                         accepted_lengths=[1] * (len(tokens) - 1), phase_seconds=None, prefill_seconds=None,
                         tree_nodes=None, stop_reason="length", peak_memory_bytes=None, run_memory_bytes=None)

    summary = summarize([record("ar", [5, 6, 7, 8], 2.0), record("other", [5, 6, 9, 8], 1.0)], ["ar", "other"])
    miss = summary["other"]["mismatches"][0]
    assert (miss["position"], miss["ar_token"], miss["method_token"]) == (2, 7, 9)
    assert summary["other"]["exact_match_rate"] == 0.0
    assert summary["other"]["speedup_vs_ar"] == 2.0 and summary["other"]["speedup_vs_hf"] is None


def test_a_registered_method_plugs_in_without_touching_the_harness(tiny_model_dir, prompts_file):
    @register_method("test-ar-copy", "our ar under another name (test only)", options={})
    def _factory(context, spec):
        return DynTreeMethod(spec.text, context.dyntree().with_tree("ar"), {"tree": "ar"})

    try:
        context = BenchContext(model=str(tiny_model_dir), heads=None)
        methods = build_methods(parse_method_list("ar,test-ar-copy"), context)
        bench = run_benchmark(methods, load_prompts(prompts_file, limit=1), context,
                              BenchSettings(max_new_tokens=8, warmup=0))
        results = collect_results(bench, context, "test", "file")
        assert results["methods"]["test-ar-copy"]["exact_match_rate"] == 1.0
        assert results["methods"]["test-ar-copy"]["speedup_vs_hf"] is None
    finally:
        METHODS.pop("test-ar-copy")


def test_cli_writes_outputs_that_parse_back(tiny_model_dir, prompts_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["bench", "--methods", "hf,hf-lookup,ar,static", "--prompts", str(prompts_file), "--limit", "2",
                 "--max-new-tokens", "12", "--model", str(tiny_model_dir), "--heads", "random", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    for name in ("hf", "hf-lookup", "ar", "static"):
        m = results["methods"][name]
        for key in ("tokens_per_second", "speedup_vs_hf", "speedup_vs_ar", "mean_accepted_per_pass",
                    "exact_match_rate"):
            assert m[key] is not None and m[key] >= 0
    assert results["prompts"]["count"] == 2 and results["settings"]["max_new_tokens"] == 12
    assert results["environment"]["torch"] == torch.__version__
    assert "--limit 2" in results["command"] and (out / "command.txt").read_text().strip() == results["command"]
    md = (out / "results.md").read_text()
    assert "| static |" in md and "Speedup over `hf` by category" in md
    for png in ("tokens_per_second.png", "accepted_lengths.png", "speedup_by_category.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "static" in printed and "results.json" in printed


def test_builtin_prompts_need_no_file():
    prompts = load_prompts()
    assert len(prompts) >= 10
    assert len({p.category for p in prompts}) >= 6
    assert all(len(p.turns) == 2 for p in prompts)


def test_prompt_file_formats(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"question": "b"}\n'
                    '{"instruction": "c", "instances": [{"input": "d", "output": "e"}]}\n')
    prompts = load_prompts(path)
    assert [p.turns for p in prompts] == [("a",), ("b",), ("c\n\nd",)]
    assert [p.prompt_id for p in prompts] == ["1", "3", "4"]
    assert len(load_prompts(path, limit=2)) == 2
    path.write_text('{"id": 7, "prompt": "a"}\n{"id": 7, "prompt": "b"}\n')
    with pytest.raises(DynTreeError, match="used twice"):
        load_prompts(path)


def test_one_reader_for_every_prompt_file(tmp_path):
    """Text files (one prompt per line) and JSONL read the same through the bench and through training's
    and calibration's reading (`dyntree.prompts`), with the same line-numbered errors."""
    from dyntree.prompts import read_prompt_texts
    from dyntree.training.prompts import read_prompt_file

    text = tmp_path / "p.txt"
    text.write_text("first question\n\n  second one  \n")
    assert [p.turns for p in load_prompts(text)] == [("first question",), ("second one",)]
    assert read_prompt_texts(text) == ["first question", "second one"]
    assert [p.text for p in read_prompt_file(text)] == ["first question", "second one"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{oops\n')
    for read in (load_prompts, read_prompt_texts, read_prompt_file):
        with pytest.raises(DynTreeError, match="bad.jsonl:2: not valid JSON"):
            read(bad)


def test_per_category_takes_a_balanced_subset(tmp_path):
    path = tmp_path / "mt.jsonl"
    rows = [{"question_id": i, "category": cat, "turns": [f"{cat} {i}"]}
            for i, cat in enumerate(["writing"] * 4 + ["math"] * 3 + ["coding"] * 1)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    picked = load_prompts(path, per_category=2)
    assert [p.prompt_id for p in picked] == ["0", "1", "4", "5", "7"]
    assert [p.prompt_id for p in load_prompts(path, limit=3, per_category=2)] == ["0", "1", "4"]
    with pytest.raises(DynTreeError, match="per-category"):
        load_prompts(path, per_category=0)


@pytest.mark.parametrize("argv, message", [
    (["--methods", "hf,warp"], "unknown method 'warp'"),
    (["--methods", "ar,ar"], "listed twice"),
    (["--methods", "static:depth=3"], "has no option 'depth'"),
    (["--methods", "hf-lookup:n=many"], "must be int"),
    (["--prompts", "/nonexistent/p.jsonl"], "not found"),
    (["--limit", "0"], "--limit must be at least 1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
])
def test_bad_input_gives_one_line_and_no_files(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not out.exists()


def test_bad_prompt_line_is_reported_with_its_number(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"turns": ["ok"]}\n{not json}\n')
    assert main(["bench", "--prompts", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err


def test_tree_methods_need_heads(tiny_model_dir, prompts_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["bench", "--methods", "ar,static", "--model", str(tiny_model_dir), "--heads", "none",
                 "--prompts", str(prompts_file), "--out", str(out)])
    assert code == 2
    assert "needs Medusa heads" in capsys.readouterr().err and not out.exists()


def test_default_methods_skip_trees_without_heads(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["bench", "--model", str(tiny_model_dir), "--heads", "none", "--limit", "1",
                 "--max-new-tokens", "4", "--warmup", "0", "--no-plots", "--out", str(out)])
    assert code == 0
    assert "skipping static" in capsys.readouterr().err
    assert list(json.loads((out / "results.json").read_text())["methods"]) == ["hf", "hf-lookup", "ar"]


def test_dynamic_runs_exactly_and_records_its_tree(tiny_model_dir, prompts_file, tmp_path):
    out = tmp_path / "out"
    code = main(["bench", "--methods", "ar,dynamic:n=6:lookup=2", "--model", str(tiny_model_dir), "--heads",
                 "random", "--prompts", str(prompts_file), "--limit", "1", "--max-new-tokens", "8", "--out", str(out)])
    assert code == 0
    method = json.loads((out / "results.json").read_text())["methods"]["dynamic:n=6:lookup=2"]
    assert method["exact_match_rate"] == 1.0
    assert method["settings"]["tree"] == "dynamic" and method["settings"]["size"] == 6
    assert method["settings"]["lookup"] == 2 and method["settings"]["topk"] == 8


def test_list_methods(capsys):
    assert main(["bench", "--list-methods"]) == 0
    printed = capsys.readouterr().out
    for name in ("hf", "hf-lookup", "ar", "static", "dynamic"):
        assert name in printed


def test_auto_sized_dynamic_tree_runs_in_the_bench(tiny_model_dir, prompts_file):
    context = BenchContext(model=str(tiny_model_dir), heads="random")
    methods = build_methods(parse_method_list("ar,dynamic:n=auto:max=6"), context)
    assert methods[1].dyntree.proposer.max_nodes == 6 and methods[1].dyntree.proposer.latency is not None
    bench = run_benchmark(methods, load_prompts(prompts_file)[:1], context,
                          BenchSettings(max_new_tokens=10, turns=1, seed=0, warmup=0, repeats=1))
    results = collect_results(bench, context, "dyntree bench (test)", str(prompts_file))
    assert results["methods"]["dynamic:n=auto:max=6"]["exact_match_rate"] == 1.0
    with pytest.raises(DynTreeError):
        build_methods(parse_method_list("dynamic:n=8:max=6"), context)


def test_static_prefix_and_lookup_options(tiny_model_dir, prompts_file):
    context = BenchContext(model=str(tiny_model_dir), heads="random")
    methods = build_methods(parse_method_list("ar,static:n=5,dynamic:lookup=0,dynamic:lookup=4"), context)
    assert methods[1].dyntree.proposer.tree.num_nodes == 5
    assert methods[2].dyntree.proposer.lookup is None and methods[3].dyntree.proposer.lookup.max_len == 4
    bench = run_benchmark(methods, load_prompts(prompts_file)[:2], context,
                          BenchSettings(max_new_tokens=12, turns=1, seed=0, warmup=0, repeats=1))
    results = collect_results(bench, context, "dyntree bench (test)", str(prompts_file))
    assert all(m["exact_match_rate"] == 1.0 for m in results["methods"].values())


def test_methods_can_bring_their_own_heads(tiny_model_dir, prompts_file, tmp_path):
    """`dynamic:heads=DIR` compares other heads on the same loaded model, in the same interleaved run."""
    from dyntree.heads import MedusaHeads

    context = BenchContext(model=str(tiny_model_dir), heads="random")
    other = tmp_path / "other-heads"
    MedusaHeads.random(context.dyntree().model.config, num_heads=5, seed=7).save(other)
    methods = build_methods(parse_method_list(f"ar,dynamic,dynamic:heads={other},static:heads={other}"), context)
    assert methods[1].dyntree.heads is context.dyntree().heads
    assert methods[2].dyntree.heads is methods[3].dyntree.heads  # loaded once
    assert methods[2].dyntree.heads.num_heads == 5 and methods[2].dyntree.model is context.dyntree().model
    bench = run_benchmark(methods, load_prompts(prompts_file)[:1], context,
                          BenchSettings(max_new_tokens=10, turns=1, seed=0, warmup=0, repeats=1))
    results = collect_results(bench, context, "dyntree bench (test)", str(prompts_file))
    assert all(m["exact_match_rate"] == 1.0 for m in results["methods"].values())
    assert str(other) in results["methods"][f"dynamic:heads={other}"]["settings"]["heads"]
    with pytest.raises(DynTreeError, match="no heads at"):
        build_methods(parse_method_list(f"dynamic:heads={tmp_path / 'missing'}"), context)


def test_dtype_is_global_and_per_method_and_recorded(tiny_model_dir, prompts_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["bench", "--methods", "ar,ar:dtype=bfloat16,static:dtype=bfloat16,hf:dtype=bfloat16",
                 "--dtype", "float32", "--model", str(tiny_model_dir), "--heads", "random", "--prompts",
                 str(prompts_file), "--limit", "1", "--max-new-tokens", "6", "--kl-samples", "0", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["weights"] == "float32"  # --dtype is the older name of --weights
    methods = results["methods"]
    assert methods["ar"]["settings"]["weights"] == "float32"
    for name in ("ar:dtype=bfloat16", "static:dtype=bfloat16", "hf:dtype=bfloat16"):
        assert methods[name]["settings"]["weights"] == "bfloat16", name
    assert results["environment"]["cpu"] and isinstance(results["environment"]["cpu_flags"], list)
    capsys.readouterr()
    assert main(["bench", "--methods", "ar", "--dtype", "half", "--model", str(tiny_model_dir), "--prompts",
                 str(prompts_file), "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown weights 'half': use one of auto, gguf, q4, float32, bfloat16, float16"
    assert main(["bench", "--methods", "ar:dtype=half", "--dtype", "float32", "--model", str(tiny_model_dir),
                 "--prompts", str(prompts_file), "--out", str(tmp_path / "bad2")]) == 2
    assert "unknown weights 'half'" in capsys.readouterr().err


def test_exactness_is_checked_within_a_dtype_and_a_miss_reports_its_logit_gap(tiny_model_dir, prompts_file):
    from dataclasses import replace as dc_replace

    class OffByOne(DynTreeMethod):
        """Plain decoding whose third token is replaced: a planted mismatch."""

        def run(self, prompt_ids, max_new_tokens):
            tokens, stats = super().run(prompt_ids, max_new_tokens)
            tokens = tokens[:2] + [(tokens[2] + 1) % 128] + tokens[3:]
            return tokens, dc_replace(stats)

    @register_method("test-off-by-one", "plain decoding with a planted mismatch (test only)", options={})
    def _factory(context, spec):
        engine = context.dyntree("float32").with_tree("ar")
        return OffByOne(spec.text, engine, {"tree": "ar", "dtype": "float32"})

    try:
        context = BenchContext(model=str(tiny_model_dir), heads="random", weights="bfloat16")
        methods = build_methods(parse_method_list("ar,ar:dtype=float32,static,static:dtype=float32,"
                                                  "test-off-by-one"), context)
        bench = run_benchmark(methods, load_prompts(prompts_file, limit=1), context,
                              BenchSettings(max_new_tokens=8, warmup=0, kl_samples=0))
        results = collect_results(bench, context, "test", "file")
        m = results["methods"]
        assert m["static"]["exactness_note"].startswith("static vs ar,")
        assert m["static:dtype=float32"]["exactness_note"].startswith("static:dtype=float32 vs ar:dtype=float32")
        assert m["static"]["exact_match_rate"] == m["static:dtype=float32"]["exact_match_rate"] == 1.0
        (miss,) = m["test-off-by-one"]["mismatches"]
        assert miss["position"] == 2 and miss["logit_gap"] > 0  # plain decoding's token was the argmax
    finally:
        METHODS.pop("test-off-by-one")


def test_mtbench_is_a_prompt_set_name():
    prompts = load_prompts("mtbench", per_category=1)
    assert len(prompts) == 8 and len({p.category for p in prompts}) == 8
    assert len(load_prompts("mtbench")) == 80
