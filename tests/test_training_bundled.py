"""The heads shipped for the default model: present, small, loaded automatically, and better than chance."""

from pathlib import Path

import pytest

from dyntree.api import bundled_heads_dir

ASSETS = Path(__file__).resolve().parents[1] / "dyntree" / "assets" / "heads" / "smollm2-135m-instruct"


@pytest.mark.parametrize("name, head_type", [("auto", "hydra"), ("hydra", "hydra"), ("medusa", "medusa")])
def test_bundled_heads_are_small_and_well_formed(name, head_type):
    from dyntree.interop import load_heads

    directory = bundled_heads_dir(name)
    assert directory is not None and directory.parent == ASSETS.parent
    size = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
    assert size <= 20 * 2**20
    heads = load_heads(directory)
    assert heads.config.head_type == head_type
    assert heads.num_heads >= 4  # the static tree is 4 deep
    assert heads.config.model_type == "llama" and heads.config.hidden_size == 576
    assert bundled_heads_dir("auto") == ASSETS


def test_bundled_heads_by_name_only_for_the_default_model(tiny_model_dir):
    from dyntree.api import resolve_heads
    from dyntree.errors import DynTreeError
    from dyntree.loading import load_model

    with pytest.raises(DynTreeError, match="no bundled heads named 'eagle'"):
        bundled_heads_dir("eagle")
    loaded = load_model(str(tiny_model_dir))
    with pytest.raises(DynTreeError, match="bundled medusa heads are for the default model"):
        resolve_heads("medusa", loaded)
    assert resolve_heads("auto", loaded)[0] is None  # auto falls back to plain decoding instead


@pytest.mark.slow
def test_default_model_loads_bundled_heads_and_they_guess():
    from dyntree.api import DynTree

    dt = DynTree.from_pretrained("default")  # heads="auto"
    assert dt.heads is not None and "bundled" in dt.heads_note
    prompt = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How "
              "many clips did Natalia sell altogether in April and May?")
    result = dt.generate(prompt, max_new_tokens=48)
    plain = dt.with_tree("ar").generate(prompt, max_new_tokens=48)
    assert result.token_ids == plain.token_ids
    # The default's size follows this machine's timings step by step (plain steps where trees do not pay), so
    # whether the heads guess is read on a fixed tree: no timing decides what it accepts.
    fixed = dt.with_tree("dynamic", tree_size=8).generate(prompt, max_new_tokens=48)
    assert fixed.token_ids == plain.token_ids
    assert fixed.stats.mean_accepted_per_pass > 1.3  # untrained heads give ~1.0

