"""Early pruning (ProPD): pure pruning decisions against brute force, survivors' states bit-identical to the
unpruned pass, decoding token-exact, and the option's validation at every front door."""

from __future__ import annotations

import json
import random

import pytest
import torch
from test_decoding import OracleProposer, plain

from dyntree.config import TreeConfig
from dyntree.decoding import Decoder
from dyntree.early import EarlyPruner, LensHead, build_pruner, summarize_prune
from dyntree.errors import DynTreeError
from dyntree.heads import MedusaHeads
from dyntree.proposers import DynamicTreeProposer, Proposal
from dyntree.trees import buffers_from_parents
from dyntree.trees.pruning import (ancestor_closed, equal_counts, pruned_children_hit, subset_buffers,
                                   survivor_index, within_topk)


def random_parents(rng: random.Random, batch: int, n: int) -> torch.Tensor:
    return torch.tensor([[-1] + [rng.randrange(i) for i in range(1, n)] for _ in range(batch)])


def brute_survivors(parents: list[int], ok: list[bool]) -> list[bool]:
    def alive(i: int) -> bool:
        return i == 0 or (ok[i] and alive(parents[i]))

    return [alive(i) for i in range(len(parents))]


# -- pure decisions ------------------------------------------------------------------------------------------
def test_survivors_are_the_nodes_whose_whole_path_passed():
    rng = random.Random(0)
    for trial in range(40):
        n = rng.randint(1, 14)
        parents = random_parents(rng, 3, n)
        buffers = buffers_from_parents(parents, n)
        ok = torch.rand(3, n, generator=torch.Generator().manual_seed(trial)) < 0.6
        keep = ancestor_closed(buffers.tree_mask, ok)
        for b in range(3):
            assert keep[b].tolist() == brute_survivors(parents[b].tolist(), ok[b].tolist())


def test_equal_counts_pads_rows_with_earliest_dropped_nodes_and_stays_a_tree():
    rng = random.Random(1)
    for trial in range(40):
        n = rng.randint(2, 14)
        parents = random_parents(rng, 4, n)
        buffers = buffers_from_parents(parents, n)
        ok = torch.rand(4, n, generator=torch.Generator().manual_seed(trial)) < 0.5
        keep = ancestor_closed(buffers.tree_mask, ok)
        equal = equal_counts(keep)
        counts = equal.sum(1)
        assert int(counts.min()) == int(counts.max()) == int(keep.sum(1).max())
        assert bool((equal | ~keep).all())  # survivors stay survivors
        for b in range(4):
            kept = equal[b].tolist()
            for i in range(1, n):
                if kept[i]:
                    assert kept[int(parents[b, i])], "ancestor-closed"
            extra = [i for i in range(n) if kept[i] and not bool(keep[b, i])]
            dropped = [i for i in range(n) if not bool(keep[b, i])]
            assert extra == dropped[: len(extra)]  # the earliest dropped nodes come back first


def test_subset_buffers_are_the_original_buffers_reindexed():
    rng = random.Random(2)
    for trial in range(30):
        n = rng.randint(2, 12)
        parents = random_parents(rng, 2, n)
        buffers = buffers_from_parents(parents, n)
        ok = torch.rand(2, n, generator=torch.Generator().manual_seed(trial)) < 0.6
        index = survivor_index(equal_counts(ancestor_closed(buffers.tree_mask, ok)))
        sub = subset_buffers(buffers, index)
        rows = torch.arange(2)[:, None]
        assert torch.equal(sub.depths, buffers.depths.gather(1, index))
        assert torch.equal(sub.tree_mask, buffers.tree_mask[rows[:, :, None], index[:, :, None], index[:, None, :]])
        for b in range(2):
            for new, old in enumerate(index[b].tolist()):
                p = int(sub.parents[b, new])
                assert (p == -1) == (old == 0)
                if p >= 0:
                    assert int(index[b, p]) == int(parents[b, old])


def test_within_topk_is_a_rank_test_and_a_vocabulary_subset_keeps_more():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(50, 40, generator=gen).round(decimals=1)  # rounding makes ties
    child_tok = torch.randint(0, 40, (50,), generator=gen)
    child = logits[torch.arange(50), child_tok]
    for k in (1, 3, 8, 40, 41):
        rank = torch.tensor([int(((logits[i] > child[i]) & (torch.arange(40) != child_tok[i])).sum())
                             for i in range(50)])
        assert torch.equal(within_topk(logits, child, k), rank < k)
        subset = torch.arange(0, 40, 3)
        assert bool((within_topk(logits[:, subset], child, k) | ~within_topk(logits, child, k)).all())


def test_a_pruned_child_holding_the_next_token_counts_as_a_miss():
    parents = torch.tensor([[-1, 0, 0, 1]])
    tokens = torch.tensor([[5, 6, 7, 8]])
    keep = torch.tensor([[True, True, False, False]])
    assert pruned_children_hit(parents, tokens, keep, torch.tensor([0]), torch.tensor([7])).tolist() == [True]
    assert pruned_children_hit(parents, tokens, keep, torch.tensor([0]), torch.tensor([6])).tolist() == [False]
    assert pruned_children_hit(parents, tokens, keep, torch.tensor([1]), torch.tensor([8])).tolist() == [True]


# -- the pass ------------------------------------------------------------------------------------------------
def prefilled(backbone, prompt):
    cache = backbone.new_cache(1, len(prompt) + 40)
    backbone.forward(torch.tensor([prompt]), cache)
    cache.lengths.fill_(len(prompt))
    return cache


@pytest.mark.parametrize("layer,k", [(1, 1), (2, 2), (1, 6)])
def test_survivors_hidden_states_equal_the_unpruned_pass(tiny_backbone, layer, k):
    bb = tiny_backbone
    rng = random.Random(layer * 10 + k)
    pruned_any = False
    for trial in range(6):
        n = rng.randint(6, 20)
        prompt = [rng.randrange(3, 128) for _ in range(rng.randint(3, 70))]
        parents = random_parents(rng, 1, n)
        proposal = Proposal(tokens=torch.tensor([[rng.randrange(128) for _ in range(n)]]),
                            buffers=buffers_from_parents(parents, n))
        full = bb.forward(proposal.tokens, prefilled(bb, prompt), block_mask=proposal.buffers.tree_mask,
                          depths=proposal.buffers.depths)
        pruner = EarlyPruner(bb, layer, k)
        stats = pruner.new_stats()
        out = pruner.forward(bb, proposal, prefilled(bb, prompt), stats)
        assert out.hidden.shape[1] == out.index.shape[1] == int(out.keep.sum())
        assert torch.equal(out.hidden[0], full[0, out.index[0]]), "bit-identical survivors"
        assert torch.equal(out.proposal.tokens, proposal.tokens.gather(1, out.index))
        assert stats.pruned == n - out.index.shape[1]
        pruned_any |= stats.pruned > 0
    assert pruned_any  # k this small on a random model really prunes


def test_lens_on_a_vocabulary_subset_keeps_a_superset(tiny_backbone):
    bb = tiny_backbone
    rng = random.Random(4)
    n = 16
    proposal = Proposal(tokens=torch.tensor([[rng.randrange(128) for _ in range(n)]]),
                        buffers=buffers_from_parents(random_parents(rng, 1, n), n))
    cache = prefilled(bb, [5, 6, 7, 8])
    hidden = torch.randn(1, n, bb.config.hidden_size, generator=torch.Generator().manual_seed(0))
    full = LensHead(bb).children_ok(hidden, proposal, 4)
    sub = LensHead(bb, torch.arange(0, 128, 4)).children_ok(hidden, proposal, 4)
    assert bool((sub | ~full).all()) and not bool(full.all())
    del cache


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("layer,k", [(1, 1), (2, 3)])
def test_greedy_decoding_with_early_pruning_is_token_exact(tiny_backbone, seed, layer, k):
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, 128, (int(torch.randint(2, 20, (1,), generator=gen)),), generator=gen).tolist()
    ref = plain(tiny_backbone, prompt, 30)
    pruner = EarlyPruner(tiny_backbone, layer, k, measure=True)
    proposer = OracleProposer(ref.tokens[0], 128, seed)
    run = Decoder(tiny_backbone, proposer=proposer, eos_token_ids=(), pruner=pruner).run([prompt], 30).consume()
    assert run.tokens[0] == ref.tokens[0]
    s = run.stats.early_prune
    assert s.passes == run.stats.decode_passes == s.measured_passes == s.lost_counted
    assert s.lost_tokens >= s.misses >= 0  # a miss loses at least one token
    assert run.stats.method.endswith(f":prune{layer}:{k}")
    figures = run.stats.as_dict()["early_prune"]
    assert figures["pruned_nodes_per_pass"] == s.pruned / s.passes and figures["saved_ms_per_pass"] is not None


def test_pruning_the_true_path_loses_tokens_and_says_so(tiny_backbone):
    # k=1 on a random 3-layer model: the lens rarely agrees with the full model, so the oracle's true
    # continuation is often pruned: fewer tokens per pass, each loss seen by measure mode, output unchanged.
    prompt = [7, 8, 9, 10]
    ref = plain(tiny_backbone, prompt, 40)
    runs = {}
    for pruner in (None, EarlyPruner(tiny_backbone, 1, 1, measure=True)):
        proposer = OracleProposer(ref.tokens[0], 128, 0)
        runs[pruner is None] = Decoder(tiny_backbone, proposer=proposer, eos_token_ids=(),
                                       pruner=pruner).run([prompt], 40).consume()
    assert runs[False].tokens[0] == runs[True].tokens[0] == ref.tokens[0]
    s = runs[False].stats.early_prune
    assert s.lost_tokens > 0 and s.misses > 0
    assert runs[False].stats.mean_accepted_per_pass < runs[True].stats.mean_accepted_per_pass


def test_a_lens_after_the_last_layer_is_the_model_itself_and_loses_nothing(tiny_backbone):
    # Pruning "after" all layers ranks with the final logits: top-1 keeps exactly the greedy children, so the
    # accepted path survives whole while everything else is pruned. Checks the lens reads the right node.
    prompt = [11, 12, 13]
    ref = plain(tiny_backbone, prompt, 30)
    pruner = EarlyPruner(tiny_backbone, 1, 1, measure=True)
    pruner.layer = tiny_backbone.config.num_layers  # past the check on purpose: layers [L, L) are no layers
    run = Decoder(tiny_backbone, proposer=OracleProposer(ref.tokens[0], 128, 1), eos_token_ids=(),
                  pruner=pruner).run([prompt], 30).consume()
    s = run.stats.early_prune
    assert run.tokens[0] == ref.tokens[0] and run.stats.mean_accepted_per_pass > 1.2
    assert s.pruned > 0 and s.lost_tokens == 0 and s.misses == 0


def test_batched_decoding_with_pruning_equals_single_runs(tiny_backbone):
    heads = MedusaHeads.random(tiny_backbone.config, num_heads=3, scale=0.5)
    prompts = [torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 11, 6)]
    pruner = EarlyPruner(tiny_backbone, 1, 2)
    proposer = DynamicTreeProposer(3, size=12, lookup=0)
    batch = Decoder(tiny_backbone, heads, proposer, eos_token_ids=(), pruner=pruner).run(prompts, 20).consume()
    assert batch.stats.early_prune.pruned > 0
    for b, prompt in enumerate(prompts):
        assert batch.tokens[b] == plain(tiny_backbone, prompt, 20).tokens[0]


def test_sampling_with_pruning_runs_and_is_reproducible(tiny_backbone):
    from dyntree.sampling import SamplingConfig

    heads = MedusaHeads.random(tiny_backbone.config, num_heads=3, scale=0.5)
    sampling = SamplingConfig.from_options(temperature=0.8, seed=3)
    outs = []
    for _ in range(2):
        dec = Decoder(tiny_backbone, heads, DynamicTreeProposer(3, size=10, lookup=0), eos_token_ids=(),
                      pruner=EarlyPruner(tiny_backbone, 2, 2))
        outs.append(dec.run([[4, 5, 6]], 15, sampling=sampling).consume().tokens[0])
    assert outs[0] == outs[1] and len(outs[0]) == 15


def test_summaries_add_up_across_runs():
    totals = {"passes": 4, "nodes": 40, "pruned": 10, "misses": 1, "overhead_seconds": 0.004,
              "late_seconds": 0.02, "measured_passes": 0, "full_late_seconds": 0.0, "lost_tokens": 0,
              "lost_counted": 0}
    figures = summarize_prune(totals)
    assert figures["pruned_nodes_per_pass"] == 2.5 and figures["pruned_share"] == 0.25
    assert figures["saved_ms_per_pass"] is None and figures["lost_tokens_per_pass"] is None
    measured = summarize_prune(dict(totals, measured_passes=4, full_late_seconds=0.032, lost_tokens=2,
                                    lost_counted=4))
    assert measured["saved_ms_per_pass"] == pytest.approx(1000 * (0.032 - 0.02 - 0.004) / 4)
    assert measured["lost_tokens_per_pass"] == 0.5


# -- the option ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value,expected", [("8:4", (8, 4)), ((3, 1), (3, 1)), ("off", None), (None, None),
                                            (" 2:16 ", (2, 16))])
def test_early_prune_option_parses(value, expected):
    assert TreeConfig.parse("dynamic", early_prune=value).early_prune == expected


@pytest.mark.parametrize("value", ["8", "8:0", "0:4", "a:b", "8:4:2", "-1:3", (8,), 8, "8:4.5", True])
def test_bad_early_prune_values_are_one_line_errors(value):
    with pytest.raises(DynTreeError) as info:
        TreeConfig.parse("dynamic", early_prune=value)
    assert "\n" not in str(info.value) and "early" in str(info.value)


def test_early_prune_does_not_apply_to_plain_decoding():
    with pytest.raises(DynTreeError, match="plain decoding"):
        TreeConfig.parse("ar", early_prune="2:4")
    assert TreeConfig.parse("ar", early_prune="off").early_prune is None


def test_layer_is_checked_against_the_model(tiny_backbone):
    for layer in (3, 9):  # the tiny model has 3 layers: 1 and 2 are the only valid ones
        with pytest.raises(DynTreeError, match="between 1 and 2"):
            build_pruner((layer, 4), tiny_backbone)
    assert build_pruner(None, tiny_backbone) is None
    assert build_pruner((2, 4), tiny_backbone).label == "prune2:4"


def test_one_node_trees_skip_the_pruner(tiny_backbone):
    pruner = EarlyPruner(tiny_backbone, 1, 1)
    assert Decoder(tiny_backbone, pruner=pruner).pruner is None
    heads = MedusaHeads.random(tiny_backbone.config, num_heads=2)
    assert Decoder(tiny_backbone, heads, DynamicTreeProposer(2, size=4), pruner=pruner).pruner is pruner


# -- front doors: CLI, API, server, bench (the tiny 2-layer bench model: layer 1 is the only valid one) ------
from test_bench import prompts_file, tiny_model_dir  # noqa: E402,F401 - fixtures: tiny model with a tokenizer


def test_api_takes_early_prune_and_stays_exact(tiny_model_dir):  # noqa: F811
    from dyntree.api import DynTree

    dt = DynTree.from_pretrained(str(tiny_model_dir), heads="random", tree="dynamic", tree_size=10,
                                 early_prune="1:1")
    assert dt.pruner is not None and dt.config.settings()["early_prune"] == "1:1"
    result = dt.generate("write a short story about the cat .", 16)
    assert result.token_ids == dt.with_tree("ar").generate("write a short story about the cat .", 16).token_ids
    assert result.stats.early_prune.passes == result.stats.decode_passes
    assert dt.with_tree(early_prune="off").pruner is None
    with pytest.raises(DynTreeError, match="between 1 and 1"):
        dt.with_tree(early_prune="2:4")


def test_cli_generate_with_early_pruning(tiny_model_dir, capsys):  # noqa: F811
    from dyntree.cli import main

    code = main(["generate", "--model", str(tiny_model_dir), "--heads", "random", "--prompt", "the cat sat",
                 "--max-new-tokens", "10", "--early-prune", "1:2", "--compare"])
    err = capsys.readouterr().err
    assert code == 0 and "identical output: yes" in err and "early pruning after layer 1" in err


@pytest.mark.parametrize("value,words", [("x", "early prune must be LAYER:K"), ("1:0", "early prune must be"),
                                         ("4:2", "between 1 and 1")])
def test_cli_bad_early_prune_is_one_line(tiny_model_dir, capsys, value, words):  # noqa: F811
    from dyntree.cli import main

    code = main(["generate", "--model", str(tiny_model_dir), "--heads", "random", "--prompt", "the cat",
                 "--early-prune", value])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and words in err and "\n" not in err


def test_bench_methods_with_early_pruning_and_propd(tiny_model_dir, prompts_file, tmp_path):  # noqa: F811
    from dyntree.cli import main

    out = tmp_path / "out"
    methods = "ar,dynamic:n=8:early_prune=1:1,propd,propd:early_prune=1:2:max=6"
    code = main(["bench", "--methods", methods, "--model", str(tiny_model_dir), "--heads", "random", "--prompts",
                 str(prompts_file), "--limit", "2", "--max-new-tokens", "10", "--warmup", "0", "--no-plots",
                 "--kl-samples", "0", "--out", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    pruned = results["methods"]["dynamic:n=8:early_prune=1:1"]
    assert pruned["exact_match_rate"] == 1.0 and pruned["settings"]["early_prune"] == "1:1"
    figures = pruned["early_prune"]
    assert figures["passes"] == pruned["decode_passes"] and figures["layer"] == 1 and figures["k"] == 1
    assert figures["pruned_nodes_per_pass"] == figures["pruned"] / figures["passes"]
    runs = [r for r in results["runs"] if r["method"] == "dynamic:n=8:early_prune=1:1"]
    assert sum(r["early_prune"]["pruned"] for r in runs) == figures["pruned"]
    # On a CPU propd leaves pruning off unless told, and sizes its tree once per machine (no profile for random
    # heads: the default size); max= asks for per-step sizing.
    assert "early_prune" not in results["methods"]["propd"]["settings"]
    assert results["methods"]["propd"]["settings"]["size"] == 8
    forced = results["methods"]["propd:early_prune=1:2:max=6"]
    assert forced["settings"]["early_prune"] == "1:2" and forced["settings"]["max_size"] == 6
    assert forced["exact_match_rate"] == 1.0 and forced["early_prune"]["k"] == 2


def test_bench_measure_mode_reports_exact_savings_and_losses(tiny_model_dir, prompts_file):  # noqa: F811
    from dyntree.bench import BenchContext, BenchSettings, build_methods, collect_results, load_prompts, \
        parse_method_list, run_benchmark
    from dyntree.bench.report import notes

    context = BenchContext(model=str(tiny_model_dir), heads="random")
    methods = build_methods(parse_method_list("ar,dynamic:n=8:early_prune=1:1:measure_prune=true"), context)
    bench = run_benchmark(methods, load_prompts(prompts_file)[:2], context,
                          BenchSettings(max_new_tokens=10, turns=1, seed=0, warmup=0, repeats=1, kl_samples=0))
    results = collect_results(bench, context, "dyntree bench (test)", str(prompts_file))
    method = results["methods"]["dynamic:n=8:early_prune=1:1:measure_prune=true"]
    figures = method["early_prune"]
    assert method["exact_match_rate"] == 1.0 and method["settings"]["measure_prune"] is True
    assert figures["measured_passes"] == figures["passes"] == figures["lost_counted"] > 0
    assert figures["saved_ms_per_pass"] is not None and figures["lost_tokens_per_pass"] >= 0
    assert any("measured against the unpruned pass" in line for line in notes(results))
    with pytest.raises(DynTreeError, match="measure_prune needs early_prune"):
        build_methods(parse_method_list("dynamic:measure_prune=true"), context)


@pytest.mark.parametrize("methods,words", [("dynamic:early_prune=1", "early prune must be LAYER:K"),
                                           ("dynamic:early_prune=3:2", "between 1 and 1"),
                                           ("dynamic:early_prune=1:2:3", "bad option '3'"),
                                           ("ar:early_prune=1:2", "has no option 'early_prune'")])
def test_bench_bad_early_prune_is_one_line(tiny_model_dir, prompts_file, tmp_path, capsys, methods,
                                           words):  # noqa: F811
    from dyntree.cli import main

    code = main(["bench", "--methods", methods, "--model", str(tiny_model_dir), "--heads", "random",
                 "--prompts", str(prompts_file), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and words in err and "\n" not in err


def test_bench_global_early_prune_flag_is_checked_before_loading(tmp_path, capsys):
    from dyntree.cli import main

    assert main(["bench", "--early-prune", "0:4", "--out", str(tmp_path / "o")]) == 2
    assert "early prune must be" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_server_requests_can_prune_and_bad_values_are_400s(tiny_model_dir):  # noqa: F811
    from fastapi.testclient import TestClient

    from dyntree.api import DynTree
    from dyntree.server import create_app

    dt = DynTree.from_pretrained(str(tiny_model_dir), heads="random", tree="dynamic", tree_size=8)
    body = {"prompt": "write a short story about the cat .", "max_tokens": 12}
    with TestClient(create_app(dt, default_max_tokens=8)) as client:
        plain_text = client.post("/v1/completions", json=dict(body, tree="ar")).json()["choices"][0]["text"]
        r = client.post("/v1/completions", json=dict(body, early_prune="1:1"))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == plain_text
        assert r.json()["dyntree"]["early_prune"]["layer"] == 1
        for value, words in (("5:2", "between 1 and 1"), ("nope", "early prune must be")):
            r = client.post("/v1/completions", json=dict(body, early_prune=value))
            assert r.status_code == 400 and words in r.json()["error"]["message"], r.text


def test_sweep_script_measures_every_configuration_on_the_same_trees(tiny_model_dir, prompts_file,
                                                                     tmp_path):  # noqa: F811
    from conftest import load_benchmark

    sweep = load_benchmark("early_prune_sweep")
    out = tmp_path / "sweep.json"
    code = sweep.main(["--model", str(tiny_model_dir), "--heads", "random", "--prompts", str(prompts_file),
                       "--per-category", "1", "--max-new-tokens", "10", "--sizes", "4,8", "--prune", "1:1,1:1000",
                       "--dtype", "float32", "--out", str(out)])
    assert code == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["size"], r["layer"], r["k"]) for r in rows] == [(4, 1, 1), (4, 1, 1000), (8, 1, 1), (8, 1, 1000)]
    for r in rows:
        assert r["passes"] > 0 and r["exact_share"] == 1.0
        assert r["lost_tokens_per_pass"] >= 0  # a subtree's greedy path is a prefix of the whole tree's
        assert r["nodes_per_pass"] <= r["size"]
    by = {(r["size"], r["k"]): r for r in rows}
    for size in (4, 8):  # the same trees for both configurations; top-1000 of a small vocabulary prunes nothing
        assert by[(size, 1)]["passes"] == by[(size, 1000)]["passes"]
        assert by[(size, 1000)]["pruned_per_pass"] == 0 and by[(size, 1000)]["lost_tokens_per_pass"] == 0
        assert by[(size, 1)]["pruned_per_pass"] > 0
    assert sweep.main(["--prune", "0:3"]) == 2


# -- a trained early head ------------------------------------------------------------------------------------
def test_trained_early_head_learns_the_models_next_token_and_is_used_for_pruning(tmp_path):
    from training_support import write_model_dir, write_prompt_file

    from dyntree.api import DynTree
    from dyntree.cli import main
    from dyntree.loading import load_model
    from dyntree.training.dataset import DistillDataset
    from dyntree.training.early_head import EarlyObjective, agreement, early_examples, load_early_head

    model_dir = write_model_dir(tmp_path / "model")
    prompts = write_prompt_file(tmp_path / "prompts.jsonl", 16)
    data = tmp_path / "data"
    assert main(["distill", "--model", str(model_dir), "--out", str(data), "--prompts", str(prompts),
                 "--max-new-tokens", "12", "--batch-size", "8", "--shard-size", "8"]) == 0
    loaded = load_model(model_dir)
    heads_dir = tmp_path / "heads"
    MedusaHeads.random(loaded.config, num_heads=3).save(heads_dir)
    assert main(["train", "--early-layer", "1", "--data", str(data), "--out", str(heads_dir), "--model",
                 str(model_dir), "--epochs", "30", "--lr", "3e-3", "--batch-size", "32", "--val-fraction", "0"]) == 0
    layer, weight, bias = load_early_head(heads_dir, loaded.config)
    assert layer == 1 and weight.abs().sum() > 0
    # It fits what the model chose next better than the lens it started from.
    x, y, _, _ = early_examples(DistillDataset.open(data), loaded.backbone, 1, 0.0)
    lens, trained = EarlyObjective(loaded.backbone), EarlyObjective(loaded.backbone)
    trained.weight.data.copy_(weight)
    trained.bias.data.copy_(bias)
    assert y.numel() > 50 and agreement(trained, x, y)["top1"] > agreement(lens, x, y)["top1"]
    # Found beside the heads and used by pruning at its layer; decoding stays exact.
    dt = DynTree.from_pretrained(str(model_dir), heads=str(heads_dir), tree="dynamic", tree_size=8,
                                 early_prune="1:2")
    assert dt.pruner.head.kind == "trained"
    result = dt.generate("w9 w10 w11", 12, chat=False)
    assert result.token_ids == dt.with_tree("ar").generate("w9 w10 w11", 12, chat=False).token_ids
    assert result.stats.as_dict()["early_prune"]["head"] == "trained"
    # A bad layer is one line.
    assert main(["train", "--early-layer", "5", "--data", str(data), "--out", str(tmp_path / "x"),
                 "--model", str(model_dir)]) == 2


def test_early_head_targets_map_onto_a_vocabulary_subset():
    from dyntree.training.early_head import subset_targets

    targets = torch.tensor([5, 7, 9, 2])
    mapped, inside = subset_targets(targets, torch.tensor([9, 2, 5]), 12)
    assert inside.tolist() == [True, False, True, True] and mapped[inside].tolist() == [2, 0, 1]
    same, everywhere = subset_targets(targets, None, 12)
    assert torch.equal(same, targets) and bool(everywhere.all())


def test_early_head_trains_over_a_vocabulary_subset(tmp_path):
    from training_support import write_model_dir, write_prompt_file

    from dyntree.cli import main
    from dyntree.loading import load_model
    from dyntree.training.early_head import load_early_head, train_early_head

    model_dir = write_model_dir(tmp_path / "model")
    data = tmp_path / "data"
    assert main(["distill", "--model", str(model_dir), "--out", str(data), "--prompts",
                 str(write_prompt_file(tmp_path / "p.jsonl", 8)), "--max-new-tokens", "10"]) == 0
    loaded = load_model(model_dir)
    report = train_early_head(loaded, data, tmp_path / "out", 1, epochs=5, batch_size=16, val_fraction=0.0,
                              vocab_ids=torch.arange(0, 96, 2))
    assert report["vocab"] == 48 and 0 < report["train_rows"]
    assert load_early_head(tmp_path / "out", loaded.config)[0] == 1
