"""`dyntree bench` with sampling methods and quality columns (BLEU vs ar, first-token KL) on a tiny model."""

from __future__ import annotations

import json
import math

import pytest

from dyntree.bench import (BenchContext, BenchSettings, build_methods, collect_results, load_prompts,
                           parse_method_list, run_benchmark)
from dyntree.bench.methods import parse_method_spec, prompt_seed
from dyntree.bench.report import markdown
from dyntree.cli import main
from dyntree.errors import DynTreeError

from test_bench import prompts_file, tiny_model_dir  # noqa: F401 - module fixtures shared with the bench tests

HOT = "temperature=1.5"  # hot enough that the tiny model's samples leave its greedy answer
SAMPLERS = [f"ar:{HOT}", f"static:{HOT}:accept=lossless", f"dynamic:{HOT}:accept=typical",
            f"dynamic:{HOT}:accept=lossless:top_k=20:top_p=0.9"]
GREEDY = ["ar", "static", "dynamic"]


def run_bench(model_dir, prompts_path, methods: str, seed: int = 0, kl_samples: int = 200, repeats: int = 1,
              heads: str | None = "random"):
    context = BenchContext(model=str(model_dir), heads=heads, seed=seed)
    methods = build_methods(parse_method_list(methods), context)
    settings = BenchSettings(max_new_tokens=12, turns=1, seed=seed, warmup=0, repeats=repeats,
                             kl_samples=kl_samples, kl_contexts=2)
    bench = run_benchmark(methods, load_prompts(prompts_path), context, settings)
    return bench, collect_results(bench, context, "dyntree bench (test)", str(prompts_path))


@pytest.fixture(scope="module")
def sampled(tiny_model_dir, prompts_file):  # noqa: F811
    return run_bench(tiny_model_dir, prompts_file, ",".join(GREEDY + SAMPLERS), repeats=2)


def tokens_of(bench, name: str) -> dict:
    return {(r.prompt_id, r.turn): r.token_ids for r in bench.records if r.method == name and r.repeat == 0}


def test_sampling_methods_run_and_are_flagged_as_sampling(sampled):
    bench, results = sampled
    for name in SAMPLERS:
        m = results["methods"][name]
        assert m["greedy"] is False and m["prompts"] == 3
        assert m["settings"]["sampling"]["temperature"] == 1.5
        accept = m["settings"]["sampling"]["accept"]
        assert m["settings"]["decoding"] == f"{accept or 'sampling'}(T=1.5" + (", top-p=0.9, top-k=20)"
                                                                               if "top_k" in name else ")")
        assert (accept is None) == name.startswith("ar:")
        # Not compared token for token (a sample differs from greedy by design), so never a "mismatch".
        assert m["exact_match_rate"] is None and m["mismatches"] == [] and m["exact_compared"] == 0
        assert m["repeats_agree"]  # the two repeats of a prompt drew the same tokens
    assert results["methods"][SAMPLERS[3]]["settings"]["sampling"] == {
        "temperature": 1.5, "top_p": 0.9, "top_k": 20, "seed": 0, "accept": "lossless"}
    assert results["methods"][SAMPLERS[2]]["settings"]["sampling"]["eps"] == 0.09
    for name in GREEDY:
        assert results["methods"][name]["greedy"] is True
        assert results["methods"][name]["exact_match_rate"] == 1.0
        assert results["methods"][name]["settings"]["decoding"] == "greedy"


def test_sampled_tokens_depend_on_the_seed_only(sampled, tiny_model_dir, prompts_file):  # noqa: F811
    bench, _ = sampled
    names = "ar," + ",".join(SAMPLERS[:2])
    again, _ = run_bench(tiny_model_dir, prompts_file, names, kl_samples=0)  # another run, another order
    other, _ = run_bench(tiny_model_dir, prompts_file, names, seed=5, kl_samples=0)
    for name in SAMPLERS[:2]:
        assert tokens_of(again, name) == tokens_of(bench, name)
        assert tokens_of(other, name) != tokens_of(bench, name)
    pinned, _ = run_bench(tiny_model_dir, prompts_file, f"ar:{HOT}:seed=5", seed=0, kl_samples=0)
    assert tokens_of(pinned, f"ar:{HOT}:seed=5") == tokens_of(other, f"ar:{HOT}")  # seed= overrides --seed
    assert prompt_seed(0, [1, 2, 3]) == prompt_seed(0, [1, 2, 3]) != prompt_seed(0, [1, 2, 4])


def test_bleu_against_greedy_ar(sampled):
    bench, results = sampled
    ar = tokens_of(bench, "ar")
    for name in GREEDY:
        assert results["methods"][name]["bleu_vs_ar"] == pytest.approx(100.0)
        assert results["methods"][name]["bleu_compared"] == 3
    for name in SAMPLERS:
        assert tokens_of(bench, name) != ar
        bleu = results["methods"][name]["bleu_vs_ar"]
        assert 0 <= bleu < 100, name


def test_bleu_is_recomputable_from_the_stored_texts(sampled):
    from dyntree.eval.quality import corpus_bleu

    _, results = sampled
    texts = {}
    for r in results["runs"]:
        if r["repeat"] == 0:
            texts.setdefault(r["method"], []).append(r["text"])
    for name, m in results["methods"].items():
        assert m["bleu_vs_ar"] == pytest.approx(corpus_bleu(texts[name], texts["ar"]))


def test_kl_fields(sampled):
    _, results = sampled
    for name in SAMPLERS:
        m = results["methods"][name]
        assert m["kl_samples"] == 200 and m["kl_contexts"] == 2
        assert math.isfinite(m["kl"]) and m["kl"] >= 0
        assert math.isfinite(m["kl_floor"]) and m["kl_floor"] >= 0
        assert [c["prompt_id"] for c in m["kl_by_context"]] == ["1", "2"]
        assert m["kl"] == pytest.approx(sum(c["kl"] for c in m["kl_by_context"]) / 2)
    for name in GREEDY:
        m = results["methods"][name]
        assert m["kl"] is None and m["kl_floor"] is None and m["kl_note"].startswith("greedy")


def test_kl_of_plain_sampling_is_at_the_floor_and_typical_sits_above(tiny_model_dir, prompts_file):  # noqa: F811
    """Plain sampling emits exactly p; with a tree whose every candidate clears the threshold (eps=0), typical
    acceptance always emits the first candidate instead: far above the floor. Both are the same estimate."""
    _, results = run_bench(tiny_model_dir, prompts_file, f"ar:{HOT},static:{HOT}:accept=typical:eps=0",
                           kl_samples=2000)
    plain, typical = results["methods"][f"ar:{HOT}"], results["methods"][f"static:{HOT}:accept=typical:eps=0"]
    assert plain["kl"] < 3 * plain["kl_floor"] + 0.01
    assert typical["kl"] > 10 * typical["kl_floor"]


def test_kl_can_be_switched_off_and_bleu_needs_ar(tiny_model_dir, prompts_file):  # noqa: F811
    _, results = run_bench(tiny_model_dir, prompts_file, f"static,static:{HOT}", kl_samples=0)
    m = results["methods"][f"static:{HOT}"]
    assert m["kl"] is None and m["kl_note"] == "not measured (--kl-samples 0)"
    assert m["bleu_vs_ar"] is None and m["bleu_note"] == "no ar run to compare with"
    assert results["methods"]["static"]["exact_match_rate"] is None


def test_cli_writes_the_quality_columns(tiny_model_dir, prompts_file, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    methods = f"ar,dynamic,ar:{HOT},dynamic:{HOT}:accept=lossless,dynamic:{HOT}:accept=typical"
    code = main(["bench", "--methods", methods, "--prompts", str(prompts_file), "--limit", "1",
                 "--max-new-tokens", "8", "--model", str(tiny_model_dir), "--heads", "random", "--kl-samples", "100",
                 "--no-plots", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["kl_samples"] == 100 and "--kl-samples 100" in results["command"]
    for name, m in results["methods"].items():
        for key in ("bleu_vs_ar", "bleu_note", "kl", "kl_floor", "kl_note", "exact_match_rate"):
            assert key in m
        assert (m["kl"] is None) == m["greedy"]
    md = (out / "results.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method | tok/s"))
    assert "| BLEU |" in header and "| KL (floor) |" in header
    row = next(line for line in md.splitlines() if line.startswith(f"| dynamic:{HOT}:accept=typical |"))
    assert row.endswith(f"{results['methods'][f'dynamic:{HOT}:accept=typical']['kl']:.3f} "
                        f"({results['methods'][f'dynamic:{HOT}:accept=typical']['kl_floor']:.3f}) |")
    assert "**KL (floor)**" in md
    printed = capsys.readouterr().out
    assert "KL (floor)" in printed and "BLEU" in printed
    assert markdown(results) == md  # the report re-renders from the parsed JSON


def test_tree_temperature_still_reaches_the_dynamic_tree(tiny_model_dir):  # noqa: F811
    context = BenchContext(model=str(tiny_model_dir), heads="random")
    (method,) = build_methods(parse_method_list("dynamic:tree_temperature=2"), context)
    assert method.dyntree.proposer.temperature == 2.0 and method.greedy
    assert method.settings()["tree_temperature"] == 2.0 and method.settings()["sampling"] is None


def test_integer_values_of_float_options_are_accepted():
    assert parse_method_spec("ar:temperature=1").options == {"temperature": 1.0}


@pytest.mark.parametrize("spec, message", [
    ("dynamic:temperature=0.7:accept=foo", "acceptance must be one of lossless, typical"),
    ("ar:temperature=-1", "temperature must be a finite number >= 0"),
    ("static:temperature=0.7:top_p=2", "top-p must be in (0, 1]"),
    ("static:temperature=0.7:top_k=-3", "top-k must be an integer >= 0"),
    ("static:temperature=hot", "must be float"),
    ("ar:temperature=0.7:accept=typical", "method 'ar' has no option 'accept'"),
    ("dynamic:accept=typical", "only apply when sampling"),
    ("static:top_p=0.9", "only apply when sampling"),
    ("static:temperature=0.7:eps=0.1", "only apply to accept=typical"),
    ("ar:temperature=0.7:seed=-2", "seed must be an integer >= 0"),
    ("ar:temperature=0.5:temperature=0.7", "given twice"),
])
def test_bad_sampling_options_give_one_line_before_loading(spec, message, tmp_path, capsys):
    with pytest.raises(DynTreeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_method_list(spec)
    out = tmp_path / "out"
    assert main(["bench", "--methods", spec, "--model", str(tmp_path / "no-model"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [(["--kl-samples", "-1"], "--kl-samples must be 0"),
                                           (["--kl-contexts", "0"], "--kl-contexts must be at least 1")])
def test_bad_kl_flags(argv, message, tmp_path, capsys):
    assert main(["bench", "--methods", "ar", "--out", str(tmp_path / "o"), *argv]) == 2
    assert message in capsys.readouterr().err
