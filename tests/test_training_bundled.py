"""The heads shipped for the default model: present, small, loaded automatically, and better than chance."""

from pathlib import Path

import pytest

from dyntree.api import bundled_heads_dir

ASSETS = Path(__file__).resolve().parents[1] / "dyntree" / "assets" / "heads" / "smollm2-135m-instruct"


def test_bundled_heads_are_small_and_well_formed():
    from dyntree.interop import load_heads

    assert bundled_heads_dir() is not None
    size = sum(p.stat().st_size for p in ASSETS.iterdir() if p.is_file())
    assert size <= 20 * 2**20
    heads = load_heads(ASSETS)
    assert heads.num_heads >= 4  # the static tree is 4 deep
    assert heads.config.model_type == "llama" and heads.config.hidden_size == 576


@pytest.mark.slow
def test_default_model_loads_bundled_heads_and_they_guess():
    from dyntree.api import DynTree

    dt = DynTree.from_pretrained("default")  # heads="auto"
    assert dt.heads is not None and "bundled" in dt.heads_note
    result = dt.generate("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
                         "in May. How many clips did Natalia sell altogether in April and May?", max_new_tokens=48)
    plain = dt.with_tree("ar").generate("Natalia sold clips to 48 of her friends in April, and then she sold half "
                                        "as many clips in May. How many clips did Natalia sell altogether in April "
                                        "and May?", max_new_tokens=48)
    assert result.token_ids == plain.token_ids
    assert result.stats.mean_accepted_per_pass > 1.3  # untrained heads give ~1.0
