"""Batched generation, the sharded dataset and its resume/mismatch/disk-full behaviour (tiny models)."""

import shutil

import pytest
import torch

from dyntree.decoding import Decoder
from dyntree.errors import DynTreeError
from dyntree.loading import load_model
from dyntree.training.dataset import DistillDataset, Sequence, model_fingerprint
from dyntree.training.distill import Sampling, chat_ids, distill, generate_batched, self_prompts
from dyntree.training.prompts import Prompt

from training_support import write_model_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(write_model_dir(tmp_path_factory.mktemp("tiny")), weights="float32")


def prompts_of(count):
    return [Prompt(" ".join(f"w{7 + (i * 5 + j) % 80}" for j in range(1 + i % 6)), "test") for i in range(count)]


def test_batched_greedy_matches_plain_decoding(tiny):
    """Refilling rows and dropping finished ones must not change any sequence (batch 3, 7 prompts)."""
    encoded = [(i, chat_ids(tiny.tokenizer, p.text)) for i, p in enumerate(prompts_of(7))]
    out = {c.tag: c for c in generate_batched(tiny.backbone, encoded, max_new_tokens=12, batch_size=3)}
    assert sorted(out) == list(range(7))
    for tag, ids in encoded:
        ref = Decoder(tiny.backbone).run([ids], 12).consume().tokens[0]
        got = out[tag]
        assert got.prompt_ids == ids
        assert got.response_ids == ref
        # The stored state at row j is the one the backbone predicted response token j from.
        assert got.hidden.shape == (len(ref), tiny.config.hidden_size) and got.hidden.dtype == torch.float16
        assert tiny.backbone.logits(got.hidden.float()).argmax(-1).tolist() == ref


def test_sampling_is_seeded(tiny):
    encoded = [(i, chat_ids(tiny.tokenizer, p.text)) for i, p in enumerate(prompts_of(3))]
    runs = [{c.tag: c.response_ids for c in generate_batched(tiny.backbone, encoded, 10, 2, Sampling(1.0, 0.9, 7))}
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_self_prompts_are_clean_and_unique(tiny):
    got = self_prompts(tiny, 3, batch_size=4, max_tokens=12, seed=1, max_attempts_factor=50)
    assert len({p.text for p in got}) == len(got) <= 3
    assert all(p.source == "self" and "<|" not in p.text for p in got)


def test_distill_writes_shards_and_resumes(tiny, tmp_path):
    prompts = prompts_of(9)
    first = distill(tiny, tmp_path / "ds", prompts[:5], max_new_tokens=8, batch_size=2, shard_size=2,
                    progress=False)
    assert first["sequences"] == 5 and first["shards"] == 3
    # A later run with more prompts only answers the new ones; finished shards are kept.
    second = distill(tiny, tmp_path / "ds", prompts, max_new_tokens=8, batch_size=2, shard_size=2, progress=False)
    assert second["skipped_done"] == 5 and second["sequences"] == 4
    ds = DistillDataset.open(tmp_path / "ds")
    assert len(ds.shard_paths()) == 5
    assert ds.done_keys() == {p.key for p in prompts}
    shard = ds.read_shard(ds.shard_paths()[0])
    assert shard.num_sequences == 2 and shard.hidden is not None
    assert ds.stats()["sequences"] == 9


def test_shard_roundtrip_and_worker_prefixes(tiny, tmp_path):
    ds = DistillDataset.create_or_resume(tmp_path / "ds", model_fingerprint(tiny), {"store_hidden": True})
    seqs = [Sequence("k1", "s", [5, 6, 7], [8, 9], torch.randn(2, 32).half()),
            Sequence("k2", "s", [5], [10, 11, 12], torch.randn(3, 32).half())]
    a = ds.write_shard(seqs, "w1-")
    b = ds.write_shard(seqs[:1], "w1-")
    c = ds.write_shard(seqs[1:])
    assert [p.name for p in (a, b, c)] == ["shard-w1-00000.safetensors", "shard-w1-00001.safetensors",
                                           "shard-00000.safetensors"]
    data = ds.read_shard(a)
    assert data.tokens.tolist() == [5, 6, 7, 8, 9, 5, 10, 11, 12]
    assert data.offsets.tolist() == [0, 5, 9] and data.prompt_lens.tolist() == [3, 1]
    assert torch.equal(data.hidden, torch.cat([s.hidden for s in seqs]))
    assert data.keys == ["k1", "k2"] and data.response_tokens() == 5


def test_tokenizer_mismatch_is_refused(tiny, tmp_path):
    distill(tiny, tmp_path / "ds", prompts_of(2), max_new_tokens=4, batch_size=2, progress=False)
    other = load_model(write_model_dir(tmp_path / "other", seed=1, word_prefix="v"))
    with pytest.raises(DynTreeError, match="another tokenizer"):
        distill(other, tmp_path / "ds", prompts_of(2), max_new_tokens=4, progress=False)
    same_tok_other_weights = load_model(write_model_dir(tmp_path / "other2", seed=3))
    ds = DistillDataset.open(tmp_path / "ds")
    ds.check_fingerprint(model_fingerprint(same_tok_other_weights), need_hidden=False)  # token ids still fine
    with pytest.raises(DynTreeError, match="hidden states of another model"):
        ds.check_fingerprint(model_fingerprint(same_tok_other_weights), need_hidden=True)


def test_refuses_foreign_directory_and_full_disk(tiny, tmp_path, monkeypatch):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(DynTreeError, match="not empty"):
        distill(tiny, tmp_path / "busy", prompts_of(1), max_new_tokens=4, progress=False)
    distill(tiny, tmp_path / "ds", prompts_of(2), max_new_tokens=4, batch_size=2, shard_size=1, progress=False)
    full = shutil.disk_usage(tmp_path)._replace(free=10)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: full)
    with pytest.raises(DynTreeError, match="out of disk space"):
        distill(tiny, tmp_path / "ds", prompts_of(4), max_new_tokens=4, batch_size=2, shard_size=1, progress=False)
    monkeypatch.undo()
    ds = DistillDataset.open(tmp_path / "ds")
    assert len(ds.shard_paths()) == 2 and not list((tmp_path / "ds").glob("*.tmp"))


def test_interrupted_run_keeps_finished_sequences(tiny, tmp_path, monkeypatch):
    """Ctrl-C / SIGTERM mid-run: completed sequences are written, the rest is answered on resume."""
    import dyntree.training.distill as distill_module

    real = distill_module.generate_batched

    def interrupted(*args, **kwargs):
        for i, c in enumerate(real(*args, **kwargs)):
            if i == 3:
                raise KeyboardInterrupt
            yield c

    monkeypatch.setattr(distill_module, "generate_batched", interrupted)
    with pytest.raises(KeyboardInterrupt):
        distill(tiny, tmp_path / "ds", prompts_of(6), max_new_tokens=6, batch_size=2, shard_size=10, progress=False)
    monkeypatch.undo()
    ds = DistillDataset.open(tmp_path / "ds")
    assert len(ds.done_keys()) == 3
    again = distill(tiny, tmp_path / "ds", prompts_of(6), max_new_tokens=6, batch_size=2, progress=False)
    assert again["skipped_done"] == 3 and again["sequences"] == 3
