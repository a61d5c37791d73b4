"""Head training: label alignment, the loss against a brute-force reference, end to end, resume, 2 processes."""

import json
from dataclasses import replace
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dyntree.cli import main as cli_main
from dyntree.errors import DynTreeError
from dyntree.heads import HeadsConfig, HydraHeads, MedusaHeads
from dyntree.interop import load_heads
from dyntree.loading import load_model
from dyntree.training.train import (IGNORE, HeadsObjective, TrainConfig, head_paths, head_targets, load_examples,
                                    teacher_rows, train)
from dyntree.training.dataset import DistillDataset

from training_support import write_model_dir, write_prompt_file

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model and a small distilled dataset made through the CLI (with stored hidden states)."""
    root = tmp_path_factory.mktemp("train")
    model_dir = write_model_dir(root / "model")
    prompts = write_prompt_file(root / "prompts.jsonl", 24)
    rc = cli_main(["distill", "--model", str(model_dir), "--out", str(root / "data"), "--prompts", str(prompts),
                   "--max-new-tokens", "16", "--batch-size", "8", "--shard-size", "8", "--dtype", "float32"])
    assert rc == 0
    return root, model_dir, load_model(model_dir, weights="float32")


def test_head_targets_brute_force():
    response = torch.tensor([11, 12, 13, 14, 15])
    got = head_targets(response, 3)
    for j in range(5):
        for k in range(3):
            # head k at response row j (position prompt_len - 1 + j) predicts position prompt_len - 1 + j + k + 2
            want = response[j + k + 1].item() if j + k + 1 < 5 else IGNORE
            assert got[j, k].item() == want


@pytest.mark.parametrize("subset", [None, 20])
def test_loss_matches_brute_force(subset):
    torch.manual_seed(0)
    vocab, hidden, k = 40, 16, 3
    cfg = HeadsConfig(k, 1, hidden, vocab, shared_projection=True)
    vocab_ids = None if subset is None else torch.arange(0, 2 * subset, 2)
    heads = MedusaHeads(cfg, vocab_ids)
    with torch.no_grad():
        heads.block_weight.normal_(0, 0.3)
        heads.block_bias.normal_(0, 0.3)
    lm = torch.randn(hidden, vocab)
    states = torch.randn(6, hidden)
    targets = torch.randint(0, vocab, (6, k))
    targets[4:, 1:] = IGNORE
    loss, stats = HeadsObjective(heads, lm, decay=0.8)(states, targets)

    expected = 0.0
    for head in range(k):
        terms = []
        for row in range(6):
            t = int(targets[row, head])
            if t == IGNORE or (vocab_ids is not None and t not in vocab_ids.tolist()):
                continue
            x = states[row]
            x = x + F.silu(heads.block_weight[head, 0] @ x + heads.block_bias[head, 0])
            logits = x @ lm if vocab_ids is None else x @ lm[:, vocab_ids]
            col = t if vocab_ids is None else vocab_ids.tolist().index(t)
            terms.append(-torch.log_softmax(logits, -1)[col])
        if terms:
            expected = expected + 0.8**head * torch.stack(terms).mean()
    assert torch.allclose(loss, expected, atol=1e-5)
    assert stats[0].tolist() == [6, 4, 4]


def test_train_end_to_end_and_reload(setup, tmp_path):
    root, model_dir, loaded = setup
    config = TrainConfig(num_heads=3, num_layers=1, vocab_subset=40, epochs=4, batch_size=32, lr=3e-3,
                         val_fraction=0.2, checkpoint_every=0)
    report = train(loaded, root / "data", tmp_path / "heads", config, progress=False)
    assert report["data"]["sequences"] == 24 and report["data"]["val_rows"] > 0
    assert 0 < report["vocab_subset_coverage"] <= 1
    heads = load_heads(tmp_path / "heads", loaded.config)
    assert heads.num_heads == 3 and heads.config.vocab_subset == 40
    # Learning happened: validation top-1 of head 1 beats the untrained heads (zero blocks = the lm_head).
    untrained = MedusaHeads(HeadsConfig(3, 1, 32, loaded.config.vocab_size, model_type="llama"), heads.vocab_ids)
    _, val, _ = load_examples(DistillDataset.open(root / "data"), 3, 0.2)
    lm = loaded.backbone.lm_head.weight_t
    before = HeadsObjective(untrained, lm, 0.8)(val.hidden, val.targets)[1]
    after = HeadsObjective(heads, lm, 0.8)(val.hidden, val.targets)[1]
    assert after[1, 0] > before[1, 0]
    assert report["validation"]["top1"][0] == pytest.approx(float(after[1, 0] / after[0, 0]), abs=1e-6)


def test_reported_validation_is_of_the_heads_as_saved(setup, tmp_path):
    """fp16 blocks and an int8 projection round the weights; the report must describe the saved file."""
    root, _, loaded = setup
    config = TrainConfig(num_heads=2, num_layers=1, shared_projection=False, vocab_subset=40, epochs=1,
                         batch_size=32, lr=3e-3, val_fraction=0.2, checkpoint_every=0)
    report = train(loaded, root / "data", tmp_path / "q", config, progress=False, block_dtype=torch.float16,
                   int8_projection=True)
    heads = load_heads(tmp_path / "q", loaded.config)
    _, val, _ = load_examples(DistillDataset.open(root / "data"), 2, 0.2)
    stats = HeadsObjective(heads, loaded.backbone.lm_head.weight_t, 0.8)(val.hidden, val.targets)[1]
    assert report["validation"]["top1"] == pytest.approx((stats[1] / stats[0]).tolist(), abs=1e-6)
    assert report["validation"]["top5"] == pytest.approx((stats[2] / stats[0]).tolist(), abs=1e-6)


def test_resume_continues_exactly(setup, tmp_path):
    root, _, loaded = setup
    config = TrainConfig(num_heads=2, vocab_subset=0, epochs=3, batch_size=16, val_fraction=0.2,
                         checkpoint_every=0)
    train(loaded, root / "data", tmp_path / "full", config, progress=False)
    partial = train(loaded, root / "data", tmp_path / "split", config, progress=False, stop_after=7)
    assert partial["stopped_at"] == 7
    report = train(loaded, root / "data", tmp_path / "split", config, progress=False)
    assert report["steps"] == partial["total_steps"]
    a, b = load_heads(tmp_path / "full"), load_heads(tmp_path / "split")
    assert torch.allclose(a.block_weight, b.block_weight, atol=1e-6)
    # Other settings or another model's checkpoint: a clear error instead of a silent mix.
    train(loaded, root / "data", tmp_path / "other", config, progress=False, stop_after=2)
    with pytest.raises(DynTreeError, match="other settings"):
        train(loaded, root / "data", tmp_path / "other", TrainConfig(num_heads=3, vocab_subset=0, epochs=3,
              batch_size=16, val_fraction=0.2, checkpoint_every=0), progress=False)
    state_file = next((tmp_path / "other" / "checkpoints").glob("step-*")) / "train_state.json"
    state = json.loads(state_file.read_text())
    state["fingerprint"]["weights_hash"] = "0000"
    state_file.write_text(json.dumps(state))
    with pytest.raises(DynTreeError, match="another model"):
        train(loaded, root / "data", tmp_path / "other", config, progress=False)


def test_training_continues_from_init_heads(setup, tmp_path):
    root, _, loaded = setup
    config = TrainConfig(num_heads=2, num_layers=1, shared_projection=False, vocab_subset=30, epochs=2,
                         batch_size=16, lr=3e-3, val_fraction=0.2, checkpoint_every=0)
    train(loaded, root / "data", tmp_path / "first", config, progress=False)
    first = load_heads(tmp_path / "first")
    # A tiny learning rate: the continued heads must stay next to where they started, with the same subset.
    more = replace(config, init_heads=str(tmp_path / "first"), lr=1e-7, epochs=1)
    train(loaded, root / "data", tmp_path / "second", more, progress=False)
    second = load_heads(tmp_path / "second")
    assert torch.equal(second.vocab_ids, first.vocab_ids)
    assert torch.allclose(second.projection, first.projection, atol=1e-4)
    assert not torch.allclose(first.projection, torch.zeros_like(first.projection))
    # A scratch run with the same tiny learning rate stays near the lm_head init instead.
    scratch = replace(config, lr=1e-7, epochs=1)
    train(loaded, root / "data", tmp_path / "scratch", scratch, progress=False)
    assert not torch.allclose(load_heads(tmp_path / "scratch").block_weight, first.block_weight, atol=1e-4)
    # Another subset size: the subset is chosen anew and every kept token's row moves with it.
    train(loaded, root / "data", tmp_path / "third", replace(more, vocab_subset=20), progress=False)
    third = load_heads(tmp_path / "third")
    assert third.vocab_ids.numel() == 20
    for j, token in enumerate(third.vocab_ids.tolist()):
        i = first.vocab_ids.tolist().index(token)  # the 20 most frequent are among the 30 most frequent
        assert torch.allclose(third.projection[:, j], first.projection[:, i], atol=1e-4)
    for bad in (replace(more, num_heads=3), replace(more, num_layers=2),
                replace(more, init_heads=str(tmp_path / "missing"))):
        with pytest.raises(DynTreeError):
            train(loaded, root / "data", tmp_path / "bad", bad, progress=False)


def test_recomputed_hidden_matches_stored(setup, tmp_path):
    root, model_dir, loaded = setup
    ds = DistillDataset.open(root / "data")
    stored, _, _ = load_examples(ds, 2, 0.0)
    recomputed, _, _ = load_examples(ds, 2, 0.0, backbone=loaded.backbone)
    assert torch.equal(stored.targets, recomputed.targets)
    assert torch.allclose(stored.hidden.float(), recomputed.hidden.float(), atol=2e-2)


def test_cli_errors(setup, tmp_path, capsys):
    root, model_dir, _ = setup
    assert cli_main(["train", "--model", str(model_dir), "--data", str(tmp_path), "--out", str(tmp_path / "h")]) == 2
    assert "not a distilled dataset" in capsys.readouterr().err
    other = write_model_dir(tmp_path / "other", word_prefix="v")
    assert cli_main(["train", "--model", str(other), "--data", str(root / "data"), "--out", str(tmp_path / "h")]) == 2
    assert "another tokenizer" in capsys.readouterr().err
    assert cli_main(["train", "--model", str(model_dir), "--data", str(root / "data"), "--out", str(tmp_path / "h"),
                     "--int8-projection"]) == 2
    assert "add --own-projection" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "w9 w10"}\n{oops\n')
    assert cli_main(["distill", "--model", str(model_dir), "--out", str(tmp_path / "d"), "--prompts", str(bad)]) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_two_process_accelerate_run(setup, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2`: the same command, data-parallel over 2 processes.

    On a machine without GPUs accelerate's `--multi_gpu` launcher (torchrun) gives CPU processes talking over
    gloo; its `--cpu` flag would instead start a single process unless an MPI hostfile is configured.
    """
    root, model_dir, _ = setup
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "dyntree.cli", "train", "--model", str(model_dir), "--data", str(root / "data"),
           "--out", str(tmp_path / "heads"), "--num-heads", "2", "--epochs", "2", "--batch-size", "16",
           "--val-fraction", "0.2", "--checkpoint-every", "3", "--threads", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "heads" / "training_report.json").read_text())
    assert report["processes"] == 2 and report["validation"]["rows"] > 0
    assert load_heads(tmp_path / "heads").num_heads == 2


def test_paths_and_teacher_rows_brute_force():
    response = torch.tensor([11, 12, 13, 14, 15])
    paths, rows = head_paths(response, 3), teacher_rows(5, 3, offset=100)
    targets = head_targets(response, 3)
    for j in range(5):
        for k in range(3):
            assert paths[j, k].item() == (response[j + k].item() if j + k < 5 else 0)
            # the state that predicted target (j, k) is row j + k + 1 of the same sequence
            assert rows[j, k].item() == (100 + j + k + 1 if j + k + 1 < 5 else -1)
            assert (rows[j, k].item() == -1) == (targets[j, k].item() == IGNORE)


def test_soft_target_loss_matches_brute_force():
    torch.manual_seed(1)
    vocab, hidden, k = 30, 12, 2
    heads = HydraHeads(HeadsConfig(k, 1, hidden, vocab, shared_projection=True), torch.arange(0, 20))
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.3)
    lm, embed = torch.randn(hidden, vocab), torch.randn(vocab, hidden)
    states, teacher = torch.randn(5, hidden), torch.randn(5, k, hidden)
    targets = torch.randint(0, 20, (5, k))
    targets[3:, 1] = IGNORE
    paths = torch.randint(0, vocab, (5, k))
    loss, _ = HeadsObjective(heads, lm, decay=0.5, embed=embed, soft_targets=0.25)(states, targets, paths, teacher)
    expected = 0.0
    for head in range(k):
        hard, soft = [], []
        for row in range(5):
            if targets[row, head] == IGNORE:
                continue
            e = embed[paths[row, : head + 1]].flatten()
            x = states[row]
            x = x + F.silu(heads.block_weight[head, 0] @ x + heads.path_weights[head] @ e + heads.block_bias[head, 0])
            log_q = torch.log_softmax(x @ lm[:, :20], -1)
            p = torch.softmax(teacher[row, head] @ lm[:, :20], -1)
            hard.append(-log_q[targets[row, head]])
            soft.append(-(p * log_q).sum())
        expected = expected + 0.5**head * (0.75 * torch.stack(hard).mean() + 0.25 * torch.stack(soft).mean())
    assert torch.allclose(loss, expected, atol=1e-5)


def test_hydra_training_warm_start_resume_and_reload(setup, tmp_path):
    root, _, loaded = setup
    medusa_cfg = TrainConfig(num_heads=2, num_layers=1, vocab_subset=40, epochs=1, batch_size=32,
                             val_fraction=0.2, checkpoint_every=0)
    train(loaded, root / "data", tmp_path / "medusa", medusa_cfg, progress=False)
    config = replace(medusa_cfg, head_type="hydra", epochs=3, soft_targets=0.5, hidden_noise=0.1, dropout=0.1,
                     init_heads=str(tmp_path / "medusa"))
    report = train(loaded, root / "data", tmp_path / "full", config, progress=False)
    heads = load_heads(tmp_path / "full", loaded.config)
    assert isinstance(heads, HydraHeads) and any(p.abs().sum() > 0 for p in heads.path_weights)
    assert len(report["validation"]["top1"]) == 2
    # Resuming after a stop gives the same weights (noise and dropout draws included).
    assert train(loaded, root / "data", tmp_path / "split", config, progress=False, stop_after=3)["stopped_at"] == 3
    train(loaded, root / "data", tmp_path / "split", config, progress=False)
    a, b = load_heads(tmp_path / "full"), load_heads(tmp_path / "split")
    assert torch.allclose(a.path_weights[1], b.path_weights[1], atol=1e-6)
    with pytest.raises(DynTreeError, match="can only start from medusa"):
        train(loaded, root / "data", tmp_path / "back", replace(medusa_cfg, init_heads=str(tmp_path / "full")),
              progress=False)


def test_teacher_forced_text_matches_a_forward_pass_and_mixes(setup, tmp_path, capsys):
    """`distill --text`: the stored states are those of one forward pass over prompt + answer; the dataset
    trains mixed with a self-distilled one."""
    from dyntree.training.distill import chat_ids

    root, model_dir, loaded = setup
    text = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"w{10 + i} w{20 + i}", "response": " ".join(f"w{(7 * i + j) % 80 + 10}" for j in range(9))}
            for i in range(6)]
    text.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert cli_main(["distill", "--model", str(model_dir), "--out", str(tmp_path / "tf"), "--text", str(text),
                     "--batch-size", "4", "--dtype", "float32"]) == 0
    ds = DistillDataset.open(tmp_path / "tf")
    examples, _, counts = load_examples(ds, 2, 0.0)
    assert counts["sequences"] == 6
    stored, _, _ = load_examples(ds, 2, 0.0, backbone=loaded.backbone)  # recomputed one sequence at a time
    assert torch.allclose(examples.hidden.float(), stored.hidden.float(), atol=2e-2)
    ids = chat_ids(loaded.tokenizer, rows[0]["prompt"])
    assert len(ids) > 0
    config = TrainConfig(num_heads=2, vocab_subset=0, epochs=1, batch_size=16, val_fraction=0.0,
                         checkpoint_every=0, soft_targets=1.0)
    report = train(loaded, [root / "data", tmp_path / "tf"], tmp_path / "mixed", config, progress=False)
    assert report["data"]["sequences"] == 24 + 6
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "w9 w10"}\n')
    assert cli_main(["distill", "--model", str(model_dir), "--out", str(tmp_path / "b"), "--text", str(bad)]) == 2
    assert "no response text" in capsys.readouterr().err
