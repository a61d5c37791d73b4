"""The `llama-cpp` bench peer: skipped with a note when llama_cpp is missing or crashes in its probe, one-line
errors for what a user gets wrong, BLEU instead of exactness; a real run when llama_cpp is installed (slow)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import signal
import sys
import types

import pytest

from dyntree.bench import BenchContext, BenchSettings, build_methods, collect_results, load_prompts, \
    parse_method_list, run_benchmark, summarize
from dyntree.bench import llamacpp
from dyntree.bench.llamacpp import ProbeOutcome, probe_extra_bufts
from dyntree.bench.methods import MethodSkipped
from dyntree.bench.runner import RunRecord
from dyntree.cli import main
from dyntree.errors import DynTreeError
from test_bench import prompts_file, tiny_model_dir  # noqa: F401 - module fixtures shared with the bench tests

HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


@pytest.fixture
def no_llama_cpp(monkeypatch):
    """llama_cpp is not importable, whether or not this machine has it."""
    monkeypatch.setitem(sys.modules, "llama_cpp", None)


@pytest.fixture
def gguf_file(tmp_path):
    """A file that gguf= accepts (never loaded: the tests that use it stop before llama.cpp would)."""
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    return path


def test_missing_package_skips_with_one_note(tiny_model_dir, gguf_file, no_llama_cpp):
    context = BenchContext(model=str(tiny_model_dir), heads=None)
    specs = parse_method_list(f"ar,llama-cpp:gguf={gguf_file}")  # no error: the method is optional
    notes = []
    methods = build_methods(specs, context, note=notes.append)
    assert [m.name for m in methods] == ["ar"]
    assert notes == [f"skipping llama-cpp:gguf={gguf_file}: llama_cpp is not installed "
                     "(pip install 'dyntree[llamacpp]')"]


def test_bench_runs_the_other_methods_without_llama_cpp(tiny_model_dir, prompts_file, gguf_file, tmp_path,
                                                        capsys, no_llama_cpp):
    out = tmp_path / "out"
    code = main(["bench", "--methods", f"ar,llama-cpp:gguf={gguf_file}", "--model", str(tiny_model_dir),
                 "--heads", "none", "--prompts", str(prompts_file), "--limit", "1", "--max-new-tokens", "4",
                 "--warmup", "0", "--no-plots", "--out", str(out)])
    assert code == 0
    err = capsys.readouterr().err
    skipped = [line for line in err.splitlines() if "llama-cpp" in line]
    assert len(skipped) == 1 and "llama_cpp is not installed" in skipped[0] and "Traceback" not in err
    assert list(json.loads((out / "results.json").read_text())["methods"]) == ["ar"]


def test_nothing_left_to_run_is_an_error(tiny_model_dir, gguf_file, no_llama_cpp):
    context = BenchContext(model=str(tiny_model_dir), heads=None)
    with pytest.raises(DynTreeError, match="no method left to run"):
        build_methods(parse_method_list(f"llama-cpp:gguf={gguf_file}"), context, note=lambda line: None)


@pytest.mark.parametrize("method, message", [
    ("llama-cpp:n=3", "has no option 'n'"),
    ("llama-cpp", "needs the default model or a .gguf file"),
    ("llama-cpp:gguf=/nonexistent/model.gguf", "gguf=/nonexistent/model.gguf: no such file"),
])
def test_bad_options_give_one_line(method, message, tiny_model_dir, prompts_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["bench", "--methods", f"ar,{method}", "--model", str(tiny_model_dir), "--heads", "none",
                 "--prompts", str(prompts_file), "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not out.exists()


# -- the probe ---------------------------------------------------------------------------------------------
def fake_probe(monkeypatch, outcomes: dict) -> list:
    """Replace the subprocess probe by `outcomes[extra_bufts]`; returns the settings it was asked to try."""
    tried = []

    def probe(gguf, threads, extra_bufts):
        tried.append(extra_bufts)
        return outcomes[extra_bufts]

    monkeypatch.setattr(llamacpp, "run_probe", probe)
    return tried


def test_probe_turns_extra_bufts_off_after_a_signal(monkeypatch, gguf_file):
    tried = fake_probe(monkeypatch, {None: ProbeOutcome(-signal.SIGILL, ""), False: ProbeOutcome(0, "")})
    extra_bufts, note = probe_extra_bufts(gguf_file, 2, can_switch=True)
    assert extra_bufts is False and tried == [None, False]
    assert "SIGILL" in note and "use_extra_bufts=False" in note


def test_probe_keeps_the_defaults_that_run(monkeypatch, gguf_file):
    tried = fake_probe(monkeypatch, {None: ProbeOutcome(0, "")})
    assert probe_extra_bufts(gguf_file, 2, can_switch=True)[0] is None and tried == [None]


@pytest.mark.parametrize("outcomes, can_switch, words", [
    ({None: ProbeOutcome(-signal.SIGILL, ""), False: ProbeOutcome(-signal.SIGSEGV, "")}, True,
     ("SIGILL", "SIGSEGV", "use_extra_bufts=False")),
    ({None: ProbeOutcome(-signal.SIGILL, "")}, False, ("SIGILL", "cannot turn off")),
    ({None: ProbeOutcome(None, "")}, True, ("within",)),
])
def test_probe_that_never_survives_skips_the_method(monkeypatch, gguf_file, outcomes, can_switch, words):
    fake_probe(monkeypatch, outcomes)
    with pytest.raises(MethodSkipped) as caught:
        probe_extra_bufts(gguf_file, 2, can_switch)
    message = str(caught.value)
    assert "\n" not in message and all(word in message for word in words)


def test_probe_failing_without_a_signal_is_an_error(monkeypatch, gguf_file):
    fake_probe(monkeypatch, {None: ProbeOutcome(1, "ValueError: Failed to load model from file")})
    with pytest.raises(DynTreeError, match="Failed to load model") as caught:
        probe_extra_bufts(gguf_file, 2, can_switch=True)
    assert not isinstance(caught.value, MethodSkipped)


def test_crash_in_the_probe_skips_the_method_in_a_run(monkeypatch, tiny_model_dir, gguf_file):
    """The whole path through build_methods, with an importable stand-in for llama_cpp."""
    stand_in = types.ModuleType("llama_cpp")
    stand_in.__spec__ = importlib.machinery.ModuleSpec("llama_cpp", None)
    monkeypatch.setitem(sys.modules, "llama_cpp", stand_in)
    monkeypatch.setattr(llamacpp, "extra_bufts_switch", lambda: "argument")
    fake_probe(monkeypatch, {None: ProbeOutcome(-signal.SIGILL, ""), False: ProbeOutcome(-signal.SIGILL, "")})
    notes = []
    methods = build_methods(parse_method_list(f"ar,llama-cpp:gguf={gguf_file}"),
                            BenchContext(model=str(tiny_model_dir), heads=None), note=notes.append)
    assert [m.name for m in methods] == ["ar"]
    assert len(notes) == 1 and "SIGILL" in notes[0] and notes[0].startswith("skipping llama-cpp")


# -- exactness and BLEU --------------------------------------------------------------------------------------
def test_a_method_on_other_numerics_gets_bleu_not_exactness():
    def record(method, tokens, reference_exact=True):
        return RunRecord(method=method, prompt_id="p", category=None, turn=1, repeat=0, order=0, prompt_tokens=3,
                         token_ids=tokens, new_tokens=len(tokens), wall_seconds=1.0, decode_passes=len(tokens) - 1,
                         accepted_lengths=None, phase_seconds=None, prefill_seconds=None, tree_nodes=None,
                         stop_reason="length", peak_memory_bytes=None, run_memory_bytes=None,
                         reference_exact=reference_exact)

    words = "the cat sat on the mat and then it slept in the sun".split()
    summary = summarize([record("ar", [0, 1, 2, 3, 4, 5, 6, 7]), record("llama-cpp", [0, 1, 2, 3, 4, 5, 9, 8], False)],
                        ["ar", "llama-cpp"], text=lambda ids: " ".join(words[i] for i in ids))
    peer = summary["llama-cpp"]
    assert peer["exact_match_rate"] is None and peer["mismatches"] == [] and "BLEU" in peer["exactness_note"]
    assert 0 < peer["bleu_vs_ar"] < 100 and peer["bleu_compared"] == 1


# -- the real thing ------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (the llamacpp extra)")
def test_llama_cpp_runs_the_default_model_beside_ar():
    context = BenchContext(model="default", heads=None)
    methods = build_methods(parse_method_list("ar,llama-cpp"), context)
    peer = methods[1]
    assert peer.settings()["threads"] == __import__("torch").get_num_threads()
    bench = run_benchmark(methods, load_prompts(limit=2), context,
                          BenchSettings(max_new_tokens=12, warmup=0, kl_samples=0))
    results = collect_results(bench, context, "dyntree bench (test)", "builtin")
    summary = results["methods"]["llama-cpp"]
    assert summary["family"] == "llama.cpp" and summary["settings"]["engine"] == "llama.cpp"
    assert summary["exact_match_rate"] is None and summary["bleu_vs_ar"] is not None
    for run in (r for r in results["runs"] if r["method"] == "llama-cpp"):
        assert 1 <= run["new_tokens"] <= 12 and run["decode_passes"] == run["new_tokens"] - 1
        assert run["reference_exact"] is False
    # Greedy on the same prompt ids: the first token agrees with ar's despite Q4_1 against fp32.
    first = results["runs"][0]["prompt_id"]
    firsts = {r["method"]: r["token_ids"][0] for r in results["runs"] if r["prompt_id"] == first}
    assert firsts["llama-cpp"] == firsts["ar"]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (the llamacpp extra)")
def test_extra_bufts_off_reaches_the_model_params():
    """0.3.x Llama() swallows an unknown use_extra_bufts keyword, so check the setting where llama.cpp reads it."""
    from dyntree.loading import default_gguf_path

    llm = llamacpp.load_llama(str(default_gguf_path()), 1, 64, extra_bufts=False)
    assert llm.model_params.use_extra_bufts is False
