"""Quality measures (BLEU, first-tree-token KL) and the sampling flags of the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dyntree.cli import main
from dyntree.errors import DynTreeError
from dyntree.eval.kl import build_tree_context, empirical_kl, estimate_first_token_kl
from dyntree.eval.quality import corpus_bleu
from dyntree.sampling import GREEDY, SamplingConfig

from test_sampling import PROMPT, BigramTreeProposer, make_tiny


def test_corpus_bleu():
    texts = ["the cat sat on the mat", "a quick brown fox jumps over the lazy dog"]
    assert corpus_bleu(texts, texts) == pytest.approx(100.0)
    assert corpus_bleu(["completely different words here", "nothing alike at all"], texts) < 10
    with pytest.raises(DynTreeError):
        corpus_bleu(texts, texts[:1])


def test_empirical_kl():
    p = torch.tensor([0.5, 0.25, 0.25, 0.0])
    assert empirical_kl(torch.tensor([0, 0, 1, 2]), p) == pytest.approx(0.0, abs=1e-12)
    assert empirical_kl(torch.tensor([0, 0, 0, 0]), p) == pytest.approx(math.log(2))
    assert empirical_kl(torch.tensor([0, 3]), p) == math.inf  # a token the model never samples


def test_first_token_kl_lossless_matches_floor_typical_does_not():
    backbone, _, _ = make_tiny()
    proposer = BigramTreeProposer(backbone)
    contexts = [build_tree_context(backbone, None, proposer, prompt) for prompt in (PROMPT, [9, 8, 7], [3, 30, 33])]
    lossless = estimate_first_token_kl(contexts, SamplingConfig(0.8, mode="lossless"), 4000, seed=1)
    typical = estimate_first_token_kl(contexts, SamplingConfig(0.8, mode="typical"), 4000, seed=1)
    floor = lossless.floor
    assert 0 < floor < 0.01
    assert lossless.mean < 2 * floor  # estimator noise only
    assert typical.mean > 10 * floor
    greedy = estimate_first_token_kl(contexts, GREEDY, 50)
    assert greedy.mean == 0.0 and greedy.floor == 0.0


@pytest.mark.parametrize("flags", [["--temperature", "-1"], ["--top-p", "0"], ["--top-k", "-2"],
                                   ["--temperature", "0.7", "--typical-eps", "3"]])
def test_generate_rejects_bad_sampling_flags_with_one_line(flags, capsys):
    assert main(["generate", "--prompt", "hi", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_quality_rejects_bad_arguments(capsys, tmp_path):
    assert main(["quality", "--temperature", "0"]) == 2
    assert main(["quality", "--out", str(tmp_path / "missing" / "q.json")]) == 2
    assert main(["quality", "--questions", str(tmp_path / "none.jsonl"), "--heads", "random"]) == 2
    assert all(line.startswith("error: ") for line in capsys.readouterr().err.strip().splitlines())


@pytest.mark.parametrize("argv, source, limit, note", [
    ([], "mtbench", 8, False),
    (["--prompts", "p.jsonl", "--limit", "3"], "p.jsonl", 3, False),
    (["--prompts", "builtin", "--per-category", "1"], "builtin", None, False),
    (["--prompts", "5"], "mtbench", 5, True),  # the old spelling: a count
    (["--questions", "q.jsonl", "--prompts", "2"], "q.jsonl", 2, True),
])
def test_quality_takes_prompts_as_the_bench_does(argv, source, limit, note):
    from dyntree.cli import build_parser
    from dyntree.commands.quality import prompt_source

    got = prompt_source(build_parser().parse_args(["quality", *argv]))
    assert got[:2] == (source, limit) and (got[2] is not None and "deprecated" in got[2]) == note


@pytest.mark.slow
def test_quality_command_on_the_default_model(tmp_path, capsys):
    out = tmp_path / "quality.json"
    assert main(["quality", "--heads", "random", "--prompts", "1", "--max-new-tokens", "6", "--kl-samples", "64",
                 "--out", str(out), "--threads", "1"]) == 0
    report = json.loads(out.read_text())
    rows = {r["label"]: r for r in report["rows"]}
    assert rows["tree greedy"]["bleu"] == pytest.approx(100.0)  # greedy tree decoding is token-exact
    assert rows["tree greedy"]["kl"] == 0.0
    assert math.isfinite(rows["tree lossless"]["kl"]) and rows["tree typical"]["acceptance"].startswith("typical")
    assert "quality and speed" in capsys.readouterr().out


@pytest.mark.slow
def test_generate_with_a_seed_is_reproducible(capsys):
    args = ["generate", "--heads", "random", "--prompt", "Name a colour.", "--max-new-tokens", "8",
            "--temperature", "0.7", "--top-p", "0.9", "--seed", "3", "--threads", "1"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first
