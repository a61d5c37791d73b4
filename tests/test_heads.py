"""Heads: our format and Medusa v0.1 round-trip, head count from weights, clear errors for misfits."""

from __future__ import annotations

import json

import pytest
import torch

from dyntree.errors import DynTreeError
from dyntree.heads import HeadsConfig, MedusaHeads
from dyntree.interop import load_heads, save_medusa


def own_projection_heads(cfg, num_heads=3, num_layers=2, seed=0):
    heads = MedusaHeads(HeadsConfig(num_heads, num_layers, cfg.hidden_size, cfg.vocab_size,
                                    shared_projection=False, model_type=cfg.model_type))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return heads


def test_our_format_round_trip(tmp_path, tiny_backbone):
    cfg = tiny_backbone.config
    heads = MedusaHeads.random(cfg, num_heads=3, num_layers=2, seed=4)
    heads.save(tmp_path / "h")
    loaded = load_heads(tmp_path / "h", cfg)
    h = torch.randn(5, cfg.hidden_size)
    ids_a, p_a = heads.topk(h, tiny_backbone.lm_head, 4)
    ids_b, p_b = loaded.topk(h, tiny_backbone.lm_head, 4)
    assert torch.equal(ids_a, ids_b) and torch.allclose(p_a, p_b)


def test_vocab_subset_projection_maps_back_to_full_ids(tmp_path, tiny_backbone):
    cfg = tiny_backbone.config
    subset = torch.tensor([5, 9, 17, 33, 70])
    heads = MedusaHeads(HeadsConfig(2, 1, cfg.hidden_size, cfg.vocab_size, model_type=cfg.model_type), subset)
    ids, _ = heads.topk(torch.randn(3, cfg.hidden_size), tiny_backbone.lm_head, 3)
    assert set(ids.flatten().tolist()) <= set(subset.tolist())
    heads.save(tmp_path / "sub")
    assert torch.equal(load_heads(tmp_path / "sub", cfg).vocab_ids, subset)


def test_int8_projection_round_trip(tmp_path, tiny_backbone):
    cfg = tiny_backbone.config
    heads = own_projection_heads(cfg, num_heads=2, num_layers=1)
    fp = heads.save(tmp_path / "fp")
    q = heads.save(tmp_path / "q", block_dtype=torch.float16, int8_projection=True)
    assert (q / "heads.safetensors").stat().st_size < 0.75 * (fp / "heads.safetensors").stat().st_size
    loaded = load_heads(q, cfg)
    # Per-row int8: every weight within half a step of its row's scale.
    step = heads.projection.abs().amax(-1, keepdim=True) / 127
    assert ((loaded.projection - heads.projection).abs() <= step / 2 + 1e-3).all()
    # Rounding in memory first gives exactly the weights a load returns.
    heads.round_to_storage(torch.float16, int8_projection=True)
    torch.testing.assert_close(loaded.projection, heads.projection, rtol=0, atol=1e-6)
    torch.testing.assert_close(loaded.block_weight, heads.block_weight, rtol=0, atol=0)
    # A scale of the wrong shape is a clear error.
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(q / "heads.safetensors"))
    tensors["projection_scale"] = tensors["projection_scale"][:, :-1].contiguous()
    save_file(tensors, str(q / "heads.safetensors"))
    with pytest.raises(DynTreeError, match="corrupt heads checkpoint.*int8 projection"):
        load_heads(q, cfg)


def test_topk_uses_current_projection_after_changes(tiny_backbone):
    """The inference copy of the projection follows in-place updates (training steps)."""
    cfg = tiny_backbone.config
    heads = own_projection_heads(cfg, num_heads=2, num_layers=1)
    h = torch.randn(3, cfg.hidden_size)

    def reference():  # with grad enabled, logits read the parameter itself, not the inference copy
        logits = heads.logits(h, tiny_backbone.lm_head.weight_t).detach()
        return torch.softmax(logits, -1).topk(4, dim=-1)

    ids, probs = heads.topk(h, tiny_backbone.lm_head, 4)
    ref = reference()
    assert torch.equal(ids, ref.indices) and torch.allclose(probs, ref.values, atol=1e-6)
    with torch.no_grad():
        heads.projection.mul_(-1.0)
    ids, probs = heads.topk(h, tiny_backbone.lm_head, 4)
    ref = reference()
    assert torch.equal(ids, ref.indices) and torch.allclose(probs, ref.values, atol=1e-6)


def test_medusa_v01_round_trip_and_lying_config(tmp_path, tiny_backbone):
    cfg = tiny_backbone.config
    heads = own_projection_heads(cfg, num_heads=3, num_layers=2)
    save_medusa(heads, tmp_path / "m", base_model="tiny")
    keys = set(torch.load(tmp_path / "m" / "medusa_lm_head.pt").keys())
    assert {"0.0.linear.weight", "0.1.linear.bias", "2.2.weight"} <= keys
    # Published configs state the wrong head count; the weights decide.
    conf = json.loads((tmp_path / "m" / "config.json").read_text())
    conf["medusa_num_heads"] = 5
    (tmp_path / "m" / "config.json").write_text(json.dumps(conf))
    loaded = load_heads(tmp_path / "m", cfg)
    assert loaded.num_heads == 3 and loaded.config.num_layers == 2
    h = torch.randn(4, cfg.hidden_size)
    torch.testing.assert_close(loaded.logits(h, tiny_backbone.lm_head.weight_t),
                               heads.logits(h, tiny_backbone.lm_head.weight_t))


def test_heads_for_another_model_are_rejected(tmp_path, tiny_backbone):
    from conftest import backbone_from_hf, tiny_hf_model

    other = backbone_from_hf(tiny_hf_model(hidden_size=32, num_attention_heads=2, num_key_value_heads=1))
    MedusaHeads.random(other.config).save(tmp_path / "h")
    with pytest.raises(DynTreeError, match="do not fit this model"):
        load_heads(tmp_path / "h", tiny_backbone.config)


@pytest.mark.parametrize("damage", ["truncate", "garbage_json", "wrong_shape"])
def test_corrupt_checkpoints_are_clear_errors(tmp_path, tiny_backbone, damage):
    cfg = tiny_backbone.config
    d = MedusaHeads.random(cfg, num_heads=2).save(tmp_path / "h")
    if damage == "truncate":
        data = (d / "heads.safetensors").read_bytes()
        (d / "heads.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "garbage_json":
        (d / "heads.json").write_text("{not json")
    else:
        meta = json.loads((d / "heads.json").read_text())
        meta["num_layers"] = 3
        (d / "heads.json").write_text(json.dumps(meta))
    with pytest.raises(DynTreeError, match="corrupt heads checkpoint"):
        load_heads(d, cfg)


def test_corrupt_medusa_file(tmp_path, tiny_backbone):
    (tmp_path / "medusa_lm_head.pt").write_bytes(b"\x00garbage")
    with pytest.raises(DynTreeError, match="corrupt Medusa checkpoint"):
        load_heads(tmp_path, tiny_backbone.config)
    with pytest.raises(DynTreeError, match="no heads"):
        load_heads(tmp_path / "nowhere", tiny_backbone.config)
