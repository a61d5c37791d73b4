"""benchmarks/reproduce.py at tiny size: each paper's reproduction runs end to end on a tiny model with
random heads (hydra ones as the default set) and writes its report, tables and plots."""

from __future__ import annotations

import json

import pytest

from dyntree.heads import HydraHeads
from dyntree.model import ModelConfig

from conftest import load_benchmark
from test_bench import prompts_file, tiny_model_dir  # noqa: F401 - a tiny model with a tokenizer; MT-Bench-like rows


@pytest.fixture(scope="module")
def reproduce():
    return load_benchmark("reproduce")


@pytest.fixture(scope="module")
def hydra_dir(tiny_model_dir, tmp_path_factory):  # noqa: F811
    """Random path-conditional heads for the tiny model, 4 deep as Medusa's static tree."""
    from transformers import AutoConfig

    config = ModelConfig.from_hf(AutoConfig.from_pretrained(tiny_model_dir))
    return HydraHeads.random(config, num_heads=4, scale=0.2).save(tmp_path_factory.mktemp("hydra"))


def test_dynamic_tree_reproduction_at_tiny_size(reproduce, tiny_model_dir, prompts_file, hydra_dir,  # noqa: F811
                                                tmp_path):
    out = tmp_path / "dt"
    code = reproduce.main(["dynamic-tree", "--model", str(tiny_model_dir), "--prompts", str(prompts_file),
                           "--medusa-heads", "random", "--default-heads", str(hydra_dir), "--per-category", "1",
                           "--max-new-tokens", "6", "--static-sizes", "4,8", "--kl-samples", "20",
                           "--weights", "float32", "--out", str(out)])
    assert code == 0
    report = (out / "REPORT.md").read_text()
    assert "arXiv [2502.05947]" in report and "1.8-2.3x" in report
    assert "## Greedy, Medusa heads" in report and "## Greedy, default heads" in report and "KL floor" in report
    results = json.loads((out / "bench" / "results.json").read_text())
    methods = results["methods"]
    greedy = [name for name, m in methods.items() if m["greedy"]]
    assert "static" in greedy and "static:heads=random" in greedy and "dynamic:lookup=0:recycle=0" in greedy
    assert all(methods[name]["exact_match_rate"] == 1.0 for name in greedy if name != "ar")  # every tree exact
    assert methods["static"]["settings"]["proposer"].endswith(":hydra")  # the static tree over hydra heads
    assert methods["dynamic:lookup=0:recycle=0:temperature=0.7"]["kl_floor"] is not None
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["sets"]) == {"Medusa heads", "default heads"}
    assert summary["sets"]["Medusa heads"]["best_static"] in ("static:heads=random", "static:n=4:heads=random",
                                                              "static:n=8:heads=random")
    assert (out / "tokens_per_second.png").is_file() and (out / "tokens_per_pass.png").is_file()
    assert "CPU: " in report and "commit: " in report and "heads: " in report


def test_propd_reproduction_at_tiny_size(reproduce, tiny_model_dir, prompts_file, hydra_dir, tmp_path):  # noqa: F811
    out = tmp_path / "propd"
    code = reproduce.main(["propd", "--model", str(tiny_model_dir), "--prompts", str(prompts_file),
                           "--medusa-heads", "random", "--default-heads", str(hydra_dir), "--per-category", "2",
                           "--prune-per-category", "1", "--max-new-tokens", "6", "--prune-max-new-tokens", "6",
                           "--prune", "1:1,1:1000", "--dynamic-size", "8", "--batch-sizes", "1,2",
                           "--weights", "float32", "--out", str(out)])
    assert code == 0
    report = (out / "REPORT.md").read_text()
    assert "arXiv [2402.13485]" in report and "1.1-3.2x" in report
    grid = json.loads((out / "early_prune.json").read_text())["rows"]
    assert {(r["tree"].split(",")[0], r["layer"], r["k"]) for r in grid} == {
        (tree, 1, k) for tree in ("Medusa static 63", "dynamic 8") for k in (1, 1000)}
    for r in grid:  # a top-1000 of a tiny vocabulary prunes nothing, so it loses nothing
        assert r["passes"] > 0 and r["exact_share"] == 1.0
        if r["k"] == 1000:
            assert r["pruned_per_pass"] == 0 and r["lost_tokens_per_pass"] == 0
    sweep = json.loads((out / "sweep" / "batch_sweep.json").read_text())
    assert [row["batch_size"] for row in sweep["rows"]] == [1, 2]
    for row in sweep["rows"]:
        assert set(row["methods"]) >= {"ar", "static:heads=random", "propd"}
        assert all(m["exact_match_rate"] in (None, 1.0) for m in row["methods"].values())
    assert "| 2 |" in report and "ProPD sizing vs ar" in report
    assert (out / "early_prune.png").is_file() and (out / "sweep" / "batch_sweep.png").is_file()


def test_bad_input_is_one_line(reproduce, capsys):
    assert reproduce.main(["propd", "--prune", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert reproduce.main(["dynamic-tree", "--static-sizes", "99"]) == 2
    assert "63 nodes" in capsys.readouterr().err
