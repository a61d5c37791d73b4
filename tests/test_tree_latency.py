"""Per-step tree size from a latency model (ProPD-style): the choice rule, the model, lossless decoding."""

from __future__ import annotations

import random

import pytest
import torch

from dyntree.config import TreeConfig
from dyntree.decoding import Decoder
from dyntree.errors import DynTreeError
from dyntree.proposers import RootOnlyProposer
from dyntree.proposers import DynamicTreeProposer
from dyntree.trees.latency import LatencyModel, choose_tree_size, measure_latency

from test_dynamic_tree import tiny  # noqa: F401 - fixture


def brute_force_size(scores, latency, max_size):
    """Every size scored from scratch; ties go to the smaller tree (as the rule does)."""
    batch = len(scores)
    best = None
    for size in range(1, max_size + 1):
        expected = batch + sum(sum(row[: size - 1]) for row in scores)
        rate = expected / latency.cost(batch * size)
        if best is None or rate > best[1]:
            best = (size, rate)
    return best[0]


def test_cost_interpolates_and_extrapolates():
    model = LatencyModel([1, 4, 8], [0.040, 0.052, 0.060])
    assert model.cost(1) == pytest.approx(0.040)
    assert model.cost(2) == pytest.approx(0.044)
    assert model.cost(6) == pytest.approx(0.056)
    assert model.cost(12) == pytest.approx(0.068)  # last slope: 2 ms per row
    assert model.cost(0) == pytest.approx(0.040)


def test_choice_matches_brute_force_on_random_scores():
    rng = random.Random(0)
    for _ in range(300):
        sizes = sorted(rng.sample(range(1, 40), rng.randint(1, 6)))
        seconds = sorted(rng.uniform(0.01, 0.2) for _ in sizes)
        if len(set(seconds)) < len(seconds):
            continue
        latency = LatencyModel(sizes, seconds)
        batch, max_size = rng.randint(1, 3), rng.randint(1, 24)
        scores = [sorted((rng.random() ** rng.choice([1, 3]) for _ in range(max_size - 1)), reverse=True)
                  for _ in range(batch)]
        assert choose_tree_size(scores, latency, max_size) == brute_force_size(scores, latency, max_size)


def test_flat_latency_takes_the_whole_tree_and_steep_latency_none():
    scores = [[0.5, 0.4, 0.3, 0.1, 0.05]]
    assert choose_tree_size(scores, LatencyModel([1, 64], [0.01, 0.01000001]), 6) == 6
    assert choose_tree_size(scores, LatencyModel([1, 2], [0.01, 0.02]), 6) == 1  # doubling cost for +0.5


def test_latency_file_round_trip_and_errors(tmp_path):
    model = LatencyModel([1, 2, 8], [0.05, 0.06, 0.09], {"device": "cpu"})
    back = LatencyModel.load(model.save(tmp_path / "lat.json"))
    assert back.rows == model.rows and back.seconds == model.seconds and back.note == model.note
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(DynTreeError):
        LatencyModel.load(tmp_path / "bad.json")
    with pytest.raises(DynTreeError):
        LatencyModel([2, 1], [0.1, 0.2])
    with pytest.raises(DynTreeError):
        LatencyModel([1, 2], [0.1, 0.0])


def test_measure_latency_on_tiny_model(tiny):  # noqa: F811
    backbone, heads = tiny
    model = measure_latency(backbone, heads, sizes=(1, 3, 6), context=16, repeats=1)
    assert model.rows == [1, 3, 6] and all(s > 0 for s in model.seconds)
    assert model.seconds == sorted(model.seconds)


def test_monotone_costs_pull_outliers_down():
    from dyntree.trees.latency import monotone_costs

    assert monotone_costs([0.08, 0.10, 0.12, 0.077, 0.09, 0.37, 0.10]) == [0.077, 0.077, 0.077, 0.077, 0.09,
                                                                         0.10, 0.10]
    assert monotone_costs([0.01, 0.02, 0.03]) == [0.01, 0.02, 0.03]


@pytest.mark.parametrize("seconds", [(0.01, 0.0101, 0.0102, 0.0103), (0.01, 0.02, 0.04, 0.08),
                                     (0.01, 0.011, 0.03, 0.05)])
def test_auto_size_decoding_is_lossless_and_sizes_vary_with_latency(tiny, seconds):  # noqa: F811
    backbone, heads = tiny
    prompts = [[3, 4] * 10, [1, 5, 9, 3]]
    expected = Decoder(backbone, heads, RootOnlyProposer()).run(prompts, 40, stop_at_eos=False).consume().tokens
    latency = LatencyModel([1, 4, 8, 16], list(seconds))
    proposer = DynamicTreeProposer(4, topk=6, size=16, score="binned", latency=latency)
    for batch in (prompts, prompts[:1]):
        run = Decoder(backbone, heads, proposer).run(batch, 40, stop_at_eos=False).consume()
        assert run.tokens == expected[: len(batch)]
        assert len(run.stats.tree_sizes) == run.stats.decode_passes
        assert all(1 <= n <= 16 for n in run.stats.tree_sizes)
    if seconds[1] > 1.5 * seconds[0] and seconds[2] >= 2 * seconds[1]:
        assert max(run.stats.tree_sizes) < 16  # steep costs: never the largest tree
    if seconds[-1] < 1.05 * seconds[0]:
        assert run.stats.mean_tree_size > 8  # nearly free rows: big trees


def test_auto_size_config_and_cached_machine_latency(tiny, tmp_path, monkeypatch):  # noqa: F811
    from dyntree.trees import latency as latency_module

    backbone, heads = tiny
    latency = LatencyModel([1, 2], [0.01, 0.02])
    config = TreeConfig.parse("dynamic", "auto:12", latency=latency)
    assert config.auto and config.resolved_size == 12 and config.resolved_score == "binned"
    assert TreeConfig.parse("dynamic", "auto").resolved_size == 32
    proposer = DynamicTreeProposer(heads.num_heads, config)
    assert proposer.latency is latency and proposer.name.startswith("dynamic:auto12")
    with pytest.raises(DynTreeError, match="needs a latency model"):
        DynamicTreeProposer(heads.num_heads, TreeConfig.parse("dynamic", "auto:5"))
    for bad in ({"tree_size": "auto:x"}, {"tree_size": "auto:1"}, {"tree_size": "big"},
                {"tree_size": 8, "latency": latency}):
        with pytest.raises(DynTreeError):
            TreeConfig.parse("dynamic", **bad)

    from dyntree import precision

    monkeypatch.setattr(precision, "machine_busy", lambda: False)  # a busy machine's timings are not cached
    calls = []
    real_measure = latency_module.measure_latency
    monkeypatch.setattr(latency_module, "measure_latency", lambda *a, **k: calls.append(a) or real_measure(*a, **k))
    first = latency_module.machine_latency(backbone, heads, [1, 3, 5], topk=4, cache_dir=tmp_path)
    again = latency_module.machine_latency(backbone, heads, [1, 3, 5], topk=4, cache_dir=tmp_path)
    assert len(calls) == 1 and first.rows == again.rows == [1, 3, 5] and first.seconds == again.seconds
    other = latency_module.machine_latency(backbone, heads, [1, 3, 5], topk=6, cache_dir=tmp_path)
    assert len(calls) == 2 and other.note["key"]["topk"] == 6  # another draft width: measured anew
    (cached,) = [p for p in tmp_path.iterdir() if LatencyModel.load(p).note["key"]["topk"] == 4]
    cached.write_text("{broken")
    latency_module.machine_latency(backbone, heads, [1, 3, 5], topk=4, cache_dir=tmp_path)
    assert len(calls) == 3  # a damaged cache file is measured again
    monkeypatch.setattr(precision, "machine_busy", lambda: True)
    latency_module.machine_latency(backbone, heads, [1, 2], topk=4, cache_dir=tmp_path)
    latency_module.machine_latency(backbone, heads, [1, 2], topk=4, cache_dir=tmp_path)
    assert len(calls) == 5  # measured beside other work: used, not cached


def test_cli_rejects_bad_tree_size(capsys):
    from dyntree.cli import main

    assert main(["generate", "--prompt", "hi", "--tree", "dynamic", "--tree-size", "big"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "auto" in err and len(err.strip().splitlines()) == 1


def test_generate_shows_mean_size_when_it_varies():
    from dyntree.commands.generate import _nodes
    from dyntree.decoding import GenerationStats

    varying = GenerationStats("m", 1, [3], tree_nodes=4, tree_sizes=[1, 4, 2, 3])
    assert _nodes(varying) == "4 (2.5)"
    assert _nodes(GenerationStats("m", 1, [3], tree_nodes=8, tree_sizes=[8, 8])) == "8"
