"""Head training on a self-distilled dataset: backbone frozen, only the heads learn (Medusa-1 recipe; hydra
heads are trained teacher-forced: head k reads the true continuation's first k+1 tokens as its path).

Row j of a sequence is the backbone's normed last hidden state at position `prompt_len - 1 + j` (from which the
lm_head predicted response token j); head k (0-based) is trained to predict response token j + k + 1, i.e.
the token k + 2 positions after the state's own. Loss: sum_k lambda^k * L_k over response tokens only, where
L_k = (1 - a) * CE(argmax target) + a * CE(backbone's distribution) with a = `soft_targets`: the backbone's
distribution of that token is recomputed from the stored state that predicted it (one projection onto the
heads' vocabulary subset), so distilling it costs no extra data. `hidden_noise` and `dropout` perturb the
state the heads read, against over-fitting a small data set.

Runs under Hugging Face `accelerate`: the same code is one process, or N processes with
`accelerate launch --num_processes N` (gradients all-reduced by DDP; each process takes its slice of every
global batch). Batches come from a seeded permutation per epoch, so a resumed run continues exactly where the
checkpoint left off.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DynTreeError
from ..heads import HeadsConfig, HydraHeads, MedusaHeads, heads_class
from ..interop import load_heads
from .dataset import DistillDataset, dataset_sequences, is_validation, model_fingerprint, most_frequent
from .eagle import train_eagle

IGNORE = -1
STATE_FILE = "train_state.json"
REPORT_FILE = "training_report.json"


@dataclass
class TrainConfig:
    num_heads: int = 4
    num_layers: int = 1
    shared_projection: bool = True
    vocab_subset: int = 8192  # 0 = the whole vocabulary
    epochs: float = 2.0
    batch_size: int = 256  # rows (tokens) per optimiser step, summed over processes
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    decay: float = 0.8  # lambda_k = decay ** k
    grad_clip: float = 1.0
    val_fraction: float = 0.05
    seed: int = 0
    checkpoint_every: int = 500  # optimiser steps
    eval_every: int = 0  # optimiser steps; 0 = at the end of each epoch only
    use_stored_hidden: bool = True
    init_heads: str | None = None  # continue from trained heads of the same shape (the subset is re-chosen)
    head_type: str = "medusa"  # or "hydra" (path-conditional; --init-heads may then be Medusa heads)
    soft_targets: float = 0.0  # weight a of the backbone's distribution in the loss (0 = argmax targets only)
    hidden_noise: float = 0.0  # Gaussian noise on the heads' input state, relative to its RMS
    dropout: float = 0.0  # dropout on the heads' input state
    feature_loss: float = 0.0  # eagle heads: weight of smooth L1 towards the backbone's next feature (EAGLE: 10)
    unroll: int = 1  # eagle heads: draft steps trained at once on the drafter's own features (1 = EAGLE-1)


# -- data ----------------------------------------------------------------------------------------------
@dataclass
class Examples:
    hidden: torch.Tensor  # [N, H] fp16
    targets: torch.Tensor  # [N, K] int64 (IGNORE beyond the response)
    paths: torch.Tensor | None = None  # [N, K] the root and next tokens of the true continuation (hydra input)
    teacher_rows: torch.Tensor | None = None  # [N, K] row of `hidden` that predicted target (n, k); -1 = none


def head_paths(response: torch.Tensor, num_heads: int) -> torch.Tensor:
    """`[R, K]`: row j, column i -> response[j + i] (0 past the end): the root (the token row j's state
    predicted) and the tokens after it, the path hydra head k reads (its first k+1 columns)."""
    r = response.numel()
    idx = torch.arange(r)[:, None] + torch.arange(num_heads)[None, :]
    out = torch.zeros((r, num_heads), dtype=torch.long)
    valid = idx < r
    out[valid] = response.long()[idx[valid]]
    return out


def teacher_rows(count: int, num_heads: int, offset: int) -> torch.Tensor:
    """`[R, K]`: the row (offset + j + k + 1) whose state predicted target (j, k), or -1 past the end."""
    idx = torch.arange(count)[:, None] + torch.arange(num_heads)[None, :] + 1
    return torch.where(idx < count, idx + offset, torch.full_like(idx, -1))


def head_targets(response: torch.Tensor, num_heads: int) -> torch.Tensor:
    """`[R, K]`: row j, head k -> response[j + k + 1], or IGNORE past the end."""
    r = response.numel()
    idx = torch.arange(r)[:, None] + torch.arange(num_heads)[None, :] + 1
    out = torch.full((r, num_heads), IGNORE, dtype=torch.long)
    valid = idx < r
    out[valid] = response.long()[idx[valid]]
    return out


@torch.inference_mode()
def load_examples(ds: DistillDataset, num_heads: int, val_fraction: float, backbone=None,
                  progress: bool = False) -> tuple[Examples, Examples, dict]:
    """Training and validation rows from every shard; states from the shards, or recomputed by `backbone`."""
    parts = {False: ([], [], [], []), True: ([], [], [], [])}
    rows_in = {False: 0, True: 0}
    counts = {"sequences": 0, "response_tokens": 0, "val_sequences": 0}
    datasets = ds if isinstance(ds, (list, tuple)) else [ds]  # several datasets train as one (mixed data)
    for key, response, hidden in dataset_sequences(datasets, backbone, min_response=2, progress=progress):
        targets = head_targets(response, num_heads)
        val = is_validation(key, val_fraction)
        # Every row is kept (the last has no target) so that row j + k + 1 is the teacher of (j, k).
        parts[val][0].append(hidden)
        parts[val][1].append(targets)
        parts[val][2].append(head_paths(response, num_heads))
        parts[val][3].append(teacher_rows(response.numel(), num_heads, rows_in[val]))
        rows_in[val] += response.numel()
        counts["sequences"] += 1
        counts["response_tokens"] += response.numel()
        counts["val_sequences"] += int(val)
    if not parts[False][0]:
        names = ", ".join(str(d.directory) for d in datasets)
        raise DynTreeError(f"dataset {names} holds no usable sequences")

    def stack(val: bool) -> Examples:
        hs, ts, ps, rs = parts[val]
        if not hs:
            empty = torch.zeros(0, num_heads, dtype=torch.long)
            return Examples(torch.zeros(0, 1, dtype=torch.float16), empty, empty, empty)
        return Examples(torch.cat(hs), torch.cat(ts), torch.cat(ps), torch.cat(rs))

    train, val = stack(False), stack(True)
    counts.update(train_rows=int(train.targets.shape[0]), val_rows=int(val.targets.shape[0]))
    return train, val, counts


def frequent_tokens(targets: torch.Tensor, vocab_size: int, count: int) -> torch.Tensor:
    """The `count` most frequent target ids (sorted), the vocabulary a subset projection covers."""
    flat = targets[:, 0]
    return most_frequent(flat[flat != IGNORE], vocab_size, count)


# -- the model being trained ---------------------------------------------------------------------------
class HeadsObjective(nn.Module):
    """Heads + the frozen projection: `forward(hidden, targets, ...)` -> weighted loss and per-head hit counts."""

    def __init__(self, heads: MedusaHeads, lm_head_weight_t: torch.Tensor, decay: float,
                 embed: torch.Tensor | None = None, soft_targets: float = 0.0, hidden_noise: float = 0.0,
                 dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.lm_head_weight_t = lm_head_weight_t  # frozen and not a buffer: DDP must not broadcast it
        self.embed = embed  # [V, H] fp32, frozen: the path embeddings of hydra heads
        self.soft_targets, self.hidden_noise, self.dropout = soft_targets, hidden_noise, dropout
        # The teacher's projection onto the heads' vocabulary (the subset's lm_head columns).
        ids = heads.vocab_ids
        self.teacher_weight_t = lm_head_weight_t if ids is None else lm_head_weight_t[:, ids].contiguous()
        self.lambdas = [decay**k for k in range(heads.num_heads)]
        vocab = heads.config.vocab_size
        remap = torch.full((vocab,), IGNORE, dtype=torch.long)  # full id -> column of the subset projection
        if heads.vocab_ids is None:
            remap = torch.arange(vocab)
        else:
            remap[heads.vocab_ids] = torch.arange(heads.vocab_ids.numel())
        self.remap = remap

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor, paths: torch.Tensor | None = None,
                teacher_states: torch.Tensor | None = None):
        """`teacher_states` `[N, K, H]`: the states that predicted each target (needed when soft_targets > 0)."""
        state = hidden.float()
        if self.training and self.hidden_noise > 0:
            rms = state.pow(2).mean(-1, keepdim=True).sqrt()
            state = state + self.hidden_noise * rms * torch.randn_like(state)
        if self.training and self.dropout > 0:
            state = F.dropout(state, self.dropout)
        if self.heads.conditional:
            logits = self.heads.path_logits(state, paths, self.embed, self.lm_head_weight_t)  # [N, K, V']
        else:
            logits = self.heads.logits(state, self.lm_head_weight_t)  # [N, K, V']
        valid = targets != IGNORE
        cols = torch.where(valid, self.remap[targets.clamp(min=0)], torch.full_like(targets, IGNORE))
        soft = self.soft_targets
        teacher = None
        if soft > 0:
            with torch.no_grad():
                teacher = torch.softmax(teacher_states.float() @ self.teacher_weight_t, dim=-1)  # [N, K, V']
        loss = logits.new_zeros(())
        for k, lam in enumerate(self.lambdas):
            if soft > 0 and bool(valid[:, k].any()):
                log_q = torch.log_softmax(logits[valid[:, k], k], dim=-1)
                loss = loss + lam * soft * -(teacher[valid[:, k], k] * log_q).sum(-1).mean()
            if (cols[:, k] != IGNORE).any() and soft < 1:  # targets outside the subset are left out
                loss = loss + lam * (1 - soft) * F.cross_entropy(logits[:, k], cols[:, k], ignore_index=IGNORE)
        with torch.no_grad():
            top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # [N, K, 5]
            hit = top5 == cols[..., None]
            stats = torch.stack([valid.sum(0), hit[..., 0].sum(0), hit.any(-1).sum(0)]).float()  # [3, K]
        return loss, stats


def batch_inputs(rows: Examples, idx, device, soft: bool) -> tuple:
    """The objective's inputs for rows `idx`: states, targets, hydra paths and (for soft targets) the states
    that predicted each target."""
    teacher = None
    if soft:
        teacher = rows.hidden[rows.teacher_rows[idx].clamp(min=0)].to(device)  # [n, K, H]; -1 rows are masked
    paths = None if rows.paths is None else rows.paths[idx].to(device)
    return rows.hidden[idx].to(device), rows.targets[idx].to(device), paths, teacher


# -- the loop ------------------------------------------------------------------------------------------
def _latest_checkpoint(out_dir: Path) -> Path | None:
    ckpts = sorted((out_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    ckpts = [c for c in ckpts if (c / STATE_FILE).is_file()]
    return ckpts[-1] if ckpts else None


def evaluate(accelerator, objective: HeadsObjective, val: Examples, batch_size: int = 1024) -> dict | None:
    """Per-head top-1/top-5 accuracy against the base model's own next tokens on the held-out split."""
    if val.targets.shape[0] == 0:
        return None
    module = accelerator.unwrap_model(objective)
    rank, world = accelerator.process_index, accelerator.num_processes
    totals = torch.zeros(3, module.heads.num_heads)
    module.eval()
    with torch.no_grad():
        for start in range(rank * batch_size, val.targets.shape[0], world * batch_size):
            sl = slice(start, start + batch_size)
            idx = torch.arange(start, min(start + batch_size, val.targets.shape[0]))
            totals += module(*batch_inputs(val, idx, accelerator.device, module.soft_targets > 0))[1]
    module.train()
    totals = accelerator.reduce(totals.to(accelerator.device), "sum").cpu()
    n = totals[0].clamp(min=1)
    return {"top1": (totals[1] / n).tolist(), "top5": (totals[2] / n).tolist(), "rows": int(totals[0, 0])}


def _initial_heads(config: TrainConfig, backbone_config) -> MedusaHeads:
    """Heads to continue training from; their shape must be the one `config` asks for."""

    heads = load_heads(config.init_heads, backbone_config)
    want = {"num_heads": config.num_heads, "num_layers": config.num_layers,
            "shared_projection": config.shared_projection}
    have = {"num_heads": heads.config.num_heads, "num_layers": heads.config.num_layers,
            "shared_projection": heads.config.shared_projection}
    if want != have:
        diff = ", ".join(f"{k} {have[k]} (asked {want[k]})" for k in want if want[k] != have[k])
        raise DynTreeError(f"--init-heads {config.init_heads} do not match the training options: {diff}")
    if heads.config.head_type != config.head_type and config.head_type != "hydra":
        # Medusa heads are hydra heads with zero path weights; the converse drops what the path taught.
        raise DynTreeError(f"--init-heads {config.init_heads} are {heads.config.head_type} heads; "
                           f"{config.head_type} heads can only start from {config.head_type} heads")
    return heads


@torch.no_grad()
def _carry_over(source: MedusaHeads, target: MedusaHeads) -> None:
    """Start `target` from `source`: the blocks as they are; own projection rows by token id.

    The vocabulary subset is chosen anew from the (grown) data, so a token's row moves with the token;
    tokens new to the subset keep their lm_head initialisation.
    """
    target.block_weight.copy_(source.block_weight)
    target.block_bias.copy_(source.block_bias)
    if source.conditional and target.conditional:
        for src, tgt in zip(source.path_weights, target.path_weights):
            tgt.copy_(src)
    if source.projection is None or target.projection is None:
        return
    src_ids = source.vocab_ids if source.vocab_ids is not None else torch.arange(source.projection.shape[1])
    tgt_ids = target.vocab_ids if target.vocab_ids is not None else torch.arange(target.projection.shape[1])
    row_of = torch.full((source.config.vocab_size,), -1, dtype=torch.long)  # token id -> source row
    row_of[src_ids] = torch.arange(src_ids.numel())
    src_rows = row_of[tgt_ids]
    shared = src_rows >= 0
    target.projection[:, shared] = source.projection[:, src_rows[shared]]


def train(loaded, dataset_dir, out_dir, config: TrainConfig, resume: bool = True, progress: bool = True,
          accelerator=None, stop_after: int | None = None, block_dtype: torch.dtype = torch.float32,
          int8_projection: bool = False) -> dict:
    """Train heads for `loaded`'s backbone on the dataset; write heads + a report to `out_dir`.

    `stop_after`: checkpoint and return after this many optimiser steps in total (to spread a long training
    over several runs; the next call resumes). `block_dtype`: how the saved heads store their blocks.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    accelerator = accelerator or Accelerator(cpu=loaded.backbone.device.type == "cpu")
    started = time.perf_counter()
    out_dir = Path(out_dir).expanduser()
    dirs = dataset_dir if isinstance(dataset_dir, (list, tuple)) else [dataset_dir]
    ds = [DistillDataset.open(d) for d in dirs]
    fingerprint = model_fingerprint(loaded)
    for one in ds:
        one.check_fingerprint(fingerprint, need_hidden=config.use_stored_hidden)
    if config.num_heads < 1 or config.num_layers < 0 or config.batch_size < 1 or config.epochs <= 0:
        raise DynTreeError("num_heads >= 1, num_layers >= 0, batch_size >= 1 and epochs > 0 are required")
    if config.head_type not in ("medusa", "hydra", "eagle"):
        raise DynTreeError(f"unknown head type {config.head_type!r}: medusa, hydra or eagle")
    if not 0 <= config.soft_targets <= 1 or config.hidden_noise < 0 or not 0 <= config.dropout < 1:
        raise DynTreeError("soft_targets must be in [0, 1], hidden_noise >= 0 and dropout in [0, 1)")
    if config.head_type == "hydra" and config.num_layers < 1:
        raise DynTreeError("hydra heads need at least one block (--num-layers >= 1)")
    if config.num_layers == 0 and config.shared_projection:
        raise DynTreeError("heads with a shared projection need at least one residual block to learn anything")
    if config.feature_loss < 0:
        raise DynTreeError("feature_loss must be >= 0")
    world = accelerator.num_processes
    if config.head_type == "eagle":  # trains on whole sequences: a loop of its own (`training.eagle`)
        if world > 1:
            raise DynTreeError("eagle heads train in one process: run without accelerate launch")
        return train_eagle(loaded, ds, out_dir, config, progress=progress, block_dtype=block_dtype)
    per_process = max(1, config.batch_size // world)

    checkpoint = _latest_checkpoint(out_dir) if resume else None
    state = None
    if checkpoint is not None:
        state = json.loads((checkpoint / STATE_FILE).read_text())
        if state.get("fingerprint", {}).get("weights_hash") != fingerprint["weights_hash"]:
            raise DynTreeError(f"checkpoint {checkpoint} was trained for another model ({state['fingerprint'].get('model')!r})")
        # Options added since a checkpoint was written count as their defaults.
        saved = {**asdict(TrainConfig()), **state.get("config", {})}
        if saved != asdict(config):
            changed = sorted(k for k, v in asdict(config).items() if saved.get(k) != v)
            raise DynTreeError(f"checkpoint {checkpoint} used other settings ({', '.join(changed)}); "
                               "pass the same options, or --no-resume to start over")

    backbone = None if config.use_stored_hidden else loaded.backbone
    train_rows, val_rows, counts = load_examples(ds, config.num_heads, config.val_fraction, backbone,
                                                 progress and accelerator.is_main_process)
    cfg = loaded.config
    vocab_ids = None
    coverage = 1.0
    start_heads = _initial_heads(config, cfg) if config.init_heads else None
    if config.vocab_subset and config.vocab_subset < cfg.vocab_size:
        vocab_ids = frequent_tokens(train_rows.targets, cfg.vocab_size, config.vocab_subset)
        covered = torch.zeros(cfg.vocab_size, dtype=torch.bool)
        covered[vocab_ids] = True
        t = train_rows.targets[:, 0]
        coverage = float(covered[t[t != IGNORE]].float().mean())
    heads_config = HeadsConfig(config.num_heads, config.num_layers, cfg.hidden_size, cfg.vocab_size,
                               shared_projection=config.shared_projection, model_type=cfg.model_type)
    torch.manual_seed(config.seed)
    lm_weight = loaded.backbone.lm_head.weight_t.detach().float().cpu()  # [H, V]
    heads = heads_class(config.head_type)(heads_config, vocab_ids)
    heads.init_projection_from(lm_weight.t())
    if start_heads is not None:
        _carry_over(start_heads, heads)
    embed = loaded.backbone.embed_tokens.detach().float().to(accelerator.device) if heads.conditional else None
    objective = HeadsObjective(heads, lm_weight.to(accelerator.device), config.decay, embed=embed,
                               soft_targets=config.soft_targets, hidden_noise=config.hidden_noise,
                               dropout=config.dropout)
    objective.remap = objective.remap.to(accelerator.device)

    n_train = train_rows.targets.shape[0]
    steps_per_epoch = n_train // (per_process * world)
    if steps_per_epoch < 1:
        raise DynTreeError(f"only {n_train} training rows: fewer than one batch of {per_process * world}")
    total_steps = max(1, math.ceil(config.epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), total_steps)
    objective, optimizer = accelerator.prepare(objective, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    step = 0
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        step = int(state["step"])
        if accelerator.is_main_process:
            print(f"resumed from {checkpoint} at step {step}/{total_steps}")

    def save_checkpoint() -> None:
        path = out_dir / "checkpoints" / f"step-{step}"
        accelerator.save_state(str(path))
        if accelerator.is_main_process:
            meta = {"step": step, "fingerprint": fingerprint, "config": asdict(config)}
            (path / STATE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            # Keep only the newest two checkpoints.
            for old in sorted((out_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-2]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    rank = accelerator.process_index
    history = []
    bar = tqdm(total=total_steps, initial=step, desc="train heads", disable=not (progress and accelerator.is_main_process),
               dynamic_ncols=True)
    window = torch.zeros(3, config.num_heads)
    rows_seen = 0
    t0 = time.perf_counter()
    objective.train()
    while step < total_steps:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        order = torch.randperm(n_train, generator=torch.Generator().manual_seed(config.seed * 1000 + epoch))
        for s in range(in_epoch, steps_per_epoch):
            if step >= total_steps:
                break
            base = s * per_process * world + rank * per_process
            idx = order[base : base + per_process]
            loss, stats = objective(*batch_inputs(train_rows, idx, accelerator.device, config.soft_targets > 0))
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if config.grad_clip:
                accelerator.clip_grad_norm_(objective.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            window += stats.cpu()
            rows_seen += idx.numel() * world
            bar.update(1)
            if step % 20 == 0 or step == total_steps:
                acc = (window[1] / window[0].clamp(min=1)).tolist()
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}",
                                h1=f"{acc[0]:.2f}", h2=f"{acc[1] if len(acc) > 1 else 0:.2f}",
                                rows_s=f"{rows_seen / (time.perf_counter() - t0):.0f}")
                window.zero_()
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < total_steps:
                save_checkpoint()
            if stop_after is not None and step >= stop_after and step < total_steps:
                save_checkpoint()
                bar.close()
                return {"stopped_at": step, "total_steps": total_steps}
            end_of_epoch = s == steps_per_epoch - 1
            if (config.eval_every and step % config.eval_every == 0) or end_of_epoch:
                result = evaluate(accelerator, objective, val_rows)
                if result is not None:
                    history.append({"step": step, **result})
                    if accelerator.is_main_process:
                        bar.write(f"step {step}: val top-1 " + " ".join(f"{a:.3f}" for a in result["top1"])
                                  + " | top-5 " + " ".join(f"{a:.3f}" for a in result["top5"]))
    bar.close()
    accelerator.unwrap_model(objective).heads.round_to_storage(block_dtype, int8_projection)
    final = evaluate(accelerator, objective, val_rows)  # of the heads as saved
    report = {
        "dataset": [str(d.directory) for d in ds] if len(ds) > 1 else str(ds[0].directory), "model": loaded.name, "config": asdict(config), "data": counts,
        "vocab_subset_coverage": coverage, "steps": step, "processes": world,
        "wall_seconds": time.perf_counter() - started, "validation": final, "history": history,
    }
    if accelerator.is_main_process:
        heads_out = accelerator.unwrap_model(objective).heads
        heads_out.save(out_dir, block_dtype, int8_projection=int8_projection)
        (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return report
