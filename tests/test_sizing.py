"""The default tree sized for the machine: profile x latency, against brute force, and through the API."""

from __future__ import annotations

import json
import random

import pytest

from dyntree.api import DynTree
from dyntree.config import TreeConfig
from dyntree.errors import DynTreeError
from dyntree.heads import MedusaHeads
from dyntree.trees.latency import LatencyModel
from dyntree.trees.sizing import PROFILE_FILE, TreeProfile, TreeSizer, best_fixed_size, find_profile

DEFAULT_POLICY = {k: v for k, v in TreeConfig.parse("dynamic").settings().items() if k != "size"}


def test_best_fixed_size_is_the_fastest_profiled_size():
    rng = random.Random(0)
    for _ in range(200):
        sizes = sorted(rng.sample(range(1, 40), rng.randint(1, 8)))
        tokens = {s: 1 + rng.random() * s ** 0.5 for s in sizes}
        latency = LatencyModel(sorted({1, *sizes}), sorted(rng.uniform(0.01, 0.05) for _ in range(len({1, *sizes}))))
        rate = {s: tokens[s] / latency.cost(s) for s in sizes}
        best = best_fixed_size(TreeProfile(tokens, DEFAULT_POLICY), latency)
        assert rate[best] == max(rate.values()) and best == min(s for s in sizes if rate[s] == rate[best])
    profile = TreeProfile({4: 2.0, 8: 2.4, 16: 2.6}, DEFAULT_POLICY)
    assert best_fixed_size(profile, LatencyModel([1, 64], [0.01, 0.0100001])) == 16  # nodes nearly free: grow
    assert best_fixed_size(profile, LatencyModel([1, 4, 8, 16], [0.01, 0.011, 0.02, 0.04])) == 4  # costly: shrink


def test_profile_files_round_trip_and_bad_ones_are_one_line(tmp_path):
    profile = TreeProfile({2: 1.5, 8: 2.25}, DEFAULT_POLICY, {"records": 3})
    profile.save(tmp_path / PROFILE_FILE)
    again = find_profile(tmp_path)
    assert again.tokens_per_pass == {2: 1.5, 8: 2.25} and again.policy == DEFAULT_POLICY
    assert find_profile(tmp_path / "nothing-here") is None
    (tmp_path / PROFILE_FILE).write_text(json.dumps({"format": "dyntree-tree-profile", "policy": {},
                                                     "tokens_per_pass": {"4": 0.5}}))
    with pytest.raises(DynTreeError, match="at least 1 token per pass"):
        find_profile(tmp_path)
    (tmp_path / PROFILE_FILE).write_text("{")
    with pytest.raises(DynTreeError, match="cannot read tree profile"):
        find_profile(tmp_path)


@pytest.fixture
def heads_dir_with_profile(tmp_path, tiny_hf):
    from dyntree.model import ModelConfig

    heads = MedusaHeads.random(ModelConfig.from_hf(tiny_hf.config), num_heads=3)
    heads.save(tmp_path / "heads")
    TreeProfile({3: 1.4, 6: 1.9, 12: 2.2}, DEFAULT_POLICY).save(tmp_path / "heads" / PROFILE_FILE)
    return tmp_path / "heads"


@pytest.mark.parametrize("seconds, size", [((0.01, 0.0101, 0.0102, 0.0103), 12), ((0.01, 0.01, 0.03, 0.2), 3)])
def test_default_tree_is_sized_for_the_machine(tiny_model_dir, heads_dir_with_profile, monkeypatch, seconds, size):
    measured = []

    def fake_machine_latency(backbone, heads, sizes, topk, cache_dir=None):
        measured.append(list(sizes))
        return LatencyModel([1, 3, 6, 12], list(seconds))

    monkeypatch.setattr("dyntree.trees.sizing.machine_latency", fake_machine_latency)
    dt = DynTree.from_pretrained(str(tiny_model_dir), heads=str(heads_dir_with_profile), dtype="float32")
    assert measured == [[3, 6, 12]] and dt.config.size == size and dt.proposer.max_nodes == size
    # A size the user sets, or another policy than the profiled one, is left alone (nothing measured).
    assert DynTree.from_pretrained(str(tiny_model_dir), heads=str(heads_dir_with_profile), dtype="float32",
                                   tree_size=5).config.size == 5
    assert dt.with_tree(lookup=0).config.size == size  # same kind: keeps its size
    other = dt.with_tree("ar").with_tree("dynamic", lookup=0)
    assert other.config.size is None and len(measured) == 1


def test_best_size_for_batch_is_the_fastest_rate_including_plain_decoding():
    from dyntree.trees.sizing import TreeProfile, best_size_for_batch

    profile = TreeProfile({2: 1.5, 4: 2.0, 8: 2.4}, {"tree": "dynamic"})
    # Cheap wide passes (a GPU): the largest tree.
    assert best_size_for_batch(profile, 0.010, lambda n: 0.010 + 0.0001 * n) == 8
    # Cost growing with every node (a CPU at a large batch): plain decoding wins.
    assert best_size_for_batch(profile, 0.010, lambda n: 0.010 * n) == 1
    # In between: brute force over the candidates.
    cost = {2: 0.012, 4: 0.016, 8: 0.030}
    rates = {1: 1 / 0.010, **{n: profile.tokens_per_pass[n] / cost[n] for n in cost}}
    assert best_size_for_batch(profile, 0.010, cost.__getitem__) == max(rates, key=rates.get)


def test_batch_sizer_uses_the_nearest_measured_batch_below():
    from dyntree.trees.latency import BatchLatency, LatencyModel
    from dyntree.trees.sizing import TreeProfile, batch_sizer, best_size_for_batch

    profile = TreeProfile({2: 1.6, 4: 2.0, 8: 2.3}, {"tree": "dynamic"})
    tree = {1: LatencyModel([1, 2, 4, 8], [0.010, 0.0105, 0.011, 0.012]),
            4: LatencyModel([1, 2, 4, 8], [0.012, 0.020, 0.036, 0.070])}
    latency = BatchLatency(tree, {1: 0.010, 4: 0.012})
    sizer = batch_sizer(lambda b: best_size_for_batch(profile, latency.plain_cost(b), lambda n: latency.cost(b, n)),
                        [1, 4])
    assert sizer(1) == 8 and sizer(3) == 8  # batch 3 reads batch 1's choice
    assert sizer(4) == 1 and sizer(16) == 1  # wide batches: plain decoding
    assert sizer.choices == {1: 8, 4: 1}


def test_frozen_batch_latency_reads_the_nearest_measured_batch_below():
    from dyntree.trees.latency import BatchLatency

    calls = []

    def measure(batch):
        calls.append(batch)
        return LatencyModel([1, 8], [0.01 * batch, 0.02 * batch]), 0.009 * batch

    latency = BatchLatency({}, measure=measure)
    assert latency.cost(2, 1) == pytest.approx(0.02) and latency.cost(4, 8) == pytest.approx(0.08)
    latency.freeze()
    assert latency.cost(3, 1) == latency.cost(2, 1) and latency.plain_cost(7) == latency.plain_cost(4)
    assert latency.model(1) is None and latency.plain_cost(1) is None  # nothing measured below batch 2
    assert calls == [2, 4]  # frozen: nothing more was measured


def test_a_frozen_sizer_measures_nothing_and_answers_from_what_it_measured(tiny_model_dir, heads_dir_with_profile,
                                                                          monkeypatch):
    """A server prepares its batch sizes, then freezes: a later batch size, or a request's own tree (even an
    auto-sized one), is answered from the measurements already made, never by timing on the serving thread."""
    import dyntree.trees.latency as latency_module

    timed = []
    real = latency_module.measure_latency
    monkeypatch.setattr(latency_module, "measure_latency", lambda *a, **k: timed.append(k.get("batch")) or real(
        *a, **{**k, "repeats": 1}))
    monkeypatch.setenv("DYNTREE_CACHE", str(heads_dir_with_profile.parent / "cache"))
    dt = DynTree.from_pretrained(str(tiny_model_dir), heads=str(heads_dir_with_profile), dtype="float32")
    choices = dt.sizer.prepare(dt.config, [1, 2, 4])
    assert set(choices) == {1, 2, 4} and all(1 <= n <= dt.config.size for n in choices.values())
    dt.sizer.freeze()
    before = len(timed)
    assert dt.nodes_for_batch(3) == choices[2] and dt.nodes_for_batch(16) == choices[4]
    auto = dt.with_tree(tree_size="auto:12")  # a request's auto-sized tree: no latency of its own measured
    assert auto.proposer.latency is not None and auto.proposer.latency.frozen
    nothing = TreeSizer(dt.model.backbone, dt.heads)  # frozen before anything was measured
    nothing.freeze()
    with pytest.raises(DynTreeError, match="none was measured before serving"):
        DynTree._build(dt.model, dt.heads, "", TreeConfig.parse("dynamic", "auto"), None, sizer=nothing)
    assert len(timed) == before


def test_the_engine_freezes_the_sizing_of_what_it_serves(tiny_model_dir):
    from dyntree.engine import BatchEngine

    dt = DynTree.from_pretrained(str(tiny_model_dir), heads="random", dtype="float32")
    assert not dt.sizer.frozen
    BatchEngine(dt, max_batch=2)
    assert dt.sizer.frozen and dt.with_tree(tree_size=4).sizer.frozen  # its per-request trees too


def test_step_record_corrects_towards_what_real_steps_measure():
    from dyntree.trees.sizing import StepRecord

    record = StepRecord(horizon=64, prior=4.0)
    assert record.time_factor(2, True) == 1.0 and record.gain_factor() == 1.0  # nothing seen: the model's own
    record.add(2, True, 0.02, 0.01, gained=0.5, predicted_gain=1.0)
    assert 1.0 < record.time_factor(2, True) < 1.5  # one step moves it little
    for _ in range(300):
        record.add(2, True, 0.02, 0.01, gained=0.5, predicted_gain=1.0)
        record.add(2, False, 0.01, 0.01)
    assert record.time_factor(2, True) == pytest.approx(2.0, rel=0.1)
    assert record.time_factor(2, False) == pytest.approx(1.0)
    assert record.time_factor(4, True) == 1.0  # another batch size keeps its own
    sizes = StepRecord(prior=4.0)
    for _ in range(100):  # deep trees cost more than the model says, shallow ones as it says
        sizes.add(1, True, 0.02, 0.01, nodes=12)
        sizes.add(1, True, 0.01, 0.01, nodes=3)
    assert sizes.time_factor(1, True, 12) > sizes.time_factor(1, True) > sizes.time_factor(1, True, 3)
    assert sizes.time_factor(1, True, 12) == pytest.approx(2.0, rel=0.1)
    assert sizes.time_factor(1, True, 6) == sizes.time_factor(1, True)  # an unseen size: all tree steps'
    odd = StepRecord(prior=4.0, clip=3.0)
    odd.add(1, True, 1.0, 0.01)  # a first step's one-off work counts as 3x its prediction, not 100x
    assert odd.time_factor(1, True) == pytest.approx((3 + 4) / (1 + 4))
    assert record.gain_factor() == pytest.approx(0.5, rel=0.1)
    for _ in range(300):  # recent steps count most: the factor follows a change
        record.add(2, True, 0.01, 0.01)
    assert record.time_factor(2, True) == pytest.approx(1.0, rel=0.1)


def test_sizing_turns_trees_off_where_real_steps_measure_slower(tiny_model_dir, heads_dir_with_profile,
                                                                 monkeypatch):
    """The prior (latency model x profile) says trees pay at batch 2; steps that take 3x the model and accept
    half the profile's tokens make plain decoding the choice there, batch 1 keeps its tree, and steps that
    measure as predicted again bring trees back. Brute force over the corrected figures agrees."""
    from dyntree.trees.latency import BatchLatency
    from dyntree.trees.sizing import best_size_for_batch

    tree = {b: LatencyModel([1, 3, 6, 12], [0.010 * b, 0.011 * b, 0.012 * b, 0.015 * b]) for b in (1, 2)}
    latency = BatchLatency(tree, {1: 0.0095, 2: 0.019})
    monkeypatch.setattr("dyntree.trees.sizing.machine_latency", lambda *a, **k: tree[1])
    monkeypatch.setattr("dyntree.trees.sizing.machine_batch_latency", lambda *a, **k: latency)
    dt = DynTree.from_pretrained(str(tiny_model_dir), heads=str(heads_dir_with_profile), dtype="float32")
    size = dt.config.size
    assert dt.machine_sized and dt.nodes_for_batch(2) == size and dt.nodes_for_batch(1) == size
    profile = dt.sizer.profile.tokens_per_pass
    for _ in range(40):
        dt.observe_step(2, size, 3 * latency.cost(2, size), 1 + 0.5 * (profile[size] - 1))
        dt.observe_step(2, 1, latency.plain_cost(2), 1.0)
    record = dt.sizer.measured.record
    corrected = TreeProfile({s: 1 + (t - 1) * record.gain_factor() for s, t in profile.items() if s <= size}, {})
    expected = best_size_for_batch(corrected, latency.plain_cost(2) * record.time_factor(2, False),
                                   lambda n: latency.cost(2, n) * record.time_factor(2, True, n))
    assert dt.nodes_for_batch(2) == expected == 1
    assert dt.proposer_for_batch(2).max_nodes == 1
    for _ in range(record.explore):  # plain steps in a row: a few tree steps are measured again
        dt.observe_step(2, 1, latency.plain_cost(2), 1.0)
    for _ in range(record.burst):
        assert dt.nodes_for_batch(2) > 1
        dt.observe_step(2, size, 3 * latency.cost(2, size), 1 + 0.5 * (profile[size] - 1))
    assert dt.nodes_for_batch(2) == 1
    for _ in range(record.explore):  # that try was no better: the next one waits twice as long
        dt.observe_step(2, 1, latency.plain_cost(2), 1.0)
    assert dt.nodes_for_batch(2) == 1
    for _ in range(record.explore):
        dt.observe_step(2, 1, latency.plain_cost(2), 1.0)
    assert dt.nodes_for_batch(2) > 1
    for _ in range(400):
        dt.observe_step(2, size, latency.cost(2, size), profile[size])
    assert dt.nodes_for_batch(2) == size
    # The library's batched decoding reports its steps: the record grows with every pass.
    before = record.count
    runs = dt.generate(["one", "two"], max_new_tokens=4, chat=False)
    assert record.count == before + runs[0].stats.decode_passes


def test_trees_close_to_paying_are_tried_often_and_far_ones_ever_less():
    from dyntree.trees.sizing import StepRecord

    record = StepRecord(explore=16, burst=4, max_wait=256)

    def plain_steps_until_a_try(margin):
        steps = 0
        while not record.exploring(1, margin):
            record.add(1, False, 0.01, 0.01)
            steps += 1
        for _ in range(record.burst):
            assert record.exploring(1, margin)
            record.add(1, True, 0.02, 0.01)
        return steps

    assert [plain_steps_until_a_try(0.5) for _ in range(6)] == [16, 32, 64, 128, 256, 256]
    assert plain_steps_until_a_try(0.95) == 16  # within 10% of paying: tried every 16 steps
