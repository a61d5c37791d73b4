"""Training the EAGLE-style drafter (`dyntree train --head-type eagle`), teacher-forced at the feature level.

Each distilled sequence gives the backbone's states f_t (row j: position prompt_len - 1 + j) and the tokens
after them (response token j). The drafter reads the pairs (f_t, token t+1) causally, as it will at decoding,
and its output feature g_t is trained two ways: its lm_head guess against the backbone's own choice of token
t+2 (the argmax of lm_head(f_{t+1}), mixed with that whole distribution by `soft_targets`), and, with weight
`feature_loss`, smooth L1 towards f_{t+1} itself (EAGLE weighs the regression 10x the classification). Only
the first depth is teacher-forced; deeper drafts feed the drafter its own features, as in EAGLE-1.

The backbone's choices are read once, at load: in greedy self-distilled data they are the answers' own tokens
(chosen by the weights that wrote them); otherwise the argmax of the lm_head over each state. With
`vocab_subset`, the drafter guesses among the most frequent of those choices only (a choice outside it is a
miss, left out of the loss): on a CPU each depth of a draft pays for its projection.

Why a loop of its own: the drafter attends over whole sequences, so it trains on sequences (padded into
batches of about `batch_size` tokens), not on the shuffled rows the Medusa/Hydra trainer uses. One process,
no checkpoints: the drafter is one layer and a tiny dataset trains in minutes.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..eagle import EagleHeads
from ..precision import auto_dtype
from ..errors import DynTreeError
from .dataset import dataset_sequences, is_validation, most_frequent

REPORT_FILE = "training_report.json"


class EagleObjective(nn.Module):
    """The drafter + the frozen lm_head and embeddings: `forward(features, next_ids, lengths, choices)` -> loss
    and counts `[steps, 2]` (per draft step: positions scored, top-1 hits against the backbone's choice).

    `steps` > 1 unrolls the drafter on its own features as decoding does (`EagleHeads.unrolled_features`),
    step k weighted `decay ** (k - 1)`: deeper drafts then learn from the inputs they will see."""

    def __init__(self, heads: EagleHeads, lm_head_weight_t: torch.Tensor, embed: torch.Tensor,
                 feature_loss: float = 0.0, soft_targets: float = 0.0, hidden_noise: float = 0.0,
                 steps: int = 1, decay: float = 0.8):
        super().__init__()
        self.heads = heads
        self.lm_head_weight_t, self.embed = lm_head_weight_t, embed  # frozen, not parameters
        self.feature_loss, self.soft_targets, self.hidden_noise = feature_loss, soft_targets, hidden_noise
        self.steps, self.decay = steps, decay

    def forward(self, features: torch.Tensor, next_ids: torch.Tensor, lengths: torch.Tensor,
                choices: torch.Tensor | None = None):
        """`features` `[B, T, H]` (f_t, right-padded), `next_ids` `[B, T]` (token t+1), `lengths` `[B]`,
        `choices` `[B, T]` the backbone's choice after f_t (None: the argmax of the lm_head, computed here)."""
        features = features.float()
        inputs = features
        if self.training and self.hidden_noise > 0:
            rms = inputs.pow(2).mean(-1, keepdim=True).sqrt()
            inputs = inputs + self.hidden_noise * rms * torch.randn_like(inputs)
        outs = self.heads.unrolled_features(inputs, next_ids, self.embed, self.steps)
        target_features = features[:, 1:]
        positions = torch.arange(target_features.shape[1], device=features.device)
        in_sequence = positions[None] < (lengths[:, None] - 1)  # t + 1 must be a real position
        projection = self.heads.projection_rows(self.lm_head_weight_t)  # [H, V']
        with torch.no_grad():
            if choices is None:
                all_targets = (target_features @ self.lm_head_weight_t).argmax(-1)
            else:
                all_targets = choices[:, 1:]
        loss, stats = features.new_zeros(()), []
        for step, out in enumerate(outs, start=1):
            valid = in_sequence & (positions[None] >= step - 1)  # step k needs a chain: t >= k - 1
            g, f_next = out[:, :-1][valid], target_features[valid]  # g_t imitates f_{t+1}: [N, H]
            logits = g @ projection
            local = self.heads.local_ids(all_targets[valid])  # index in the drafter's vocabulary, -1 outside
            inside = local >= 0
            part = g.sum() * 0.0
            if bool(inside.any()):
                part = part + (1 - self.soft_targets) * F.cross_entropy(logits[inside], local[inside])
            if self.soft_targets > 0:
                with torch.no_grad():
                    teacher = torch.softmax(f_next @ projection, -1)
                part = part + self.soft_targets * -(teacher * torch.log_softmax(logits, -1)).sum(-1).mean()
            if self.feature_loss > 0:
                part = part + self.feature_loss * F.smooth_l1_loss(g, f_next)
            loss = loss + self.decay ** (step - 1) * part
            with torch.no_grad():
                stats.append(torch.stack([valid.sum(), ((logits.argmax(-1) == local) & inside).sum()]).float())
        return loss, torch.stack(stats)


def greedy_self_distilled(dataset) -> bool:
    """Whether a dataset's answers are the backbone's own greedy choices (then they are its targets as well)."""
    manifest = dataset.manifest
    return not manifest.get("teacher_forced") and manifest.get("sampling", {}).get("temperature", 0.0) == 0.0


@torch.no_grad()
def backbone_choices(hidden: torch.Tensor, lm_head_weight_t: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """The lm_head's argmax over each state `[R, H]` -> `[R]` (for data whose tokens are not the model's)."""
    return torch.cat([(part.float() @ lm_head_weight_t).argmax(-1) for part in hidden.split(chunk)])


def load_sequences(datasets, val_fraction: float, backbone=None, lm_head_weight_t: torch.Tensor | None = None
                   ) -> tuple[list, list, dict]:
    """Per sequence (states `[R, H]` fp16, the tokens after them `[R]`, the backbone's choices after them `[R]`),
    split by content into training and validation; states from the shards, or recomputed by `backbone`."""
    parts: dict[bool, list] = {False: [], True: []}
    counts = {"sequences": 0, "response_tokens": 0, "val_sequences": 0}
    # One scored position needs f_t, f_{t+1} and the two tokens after f_t.
    for dataset in datasets:
        own = greedy_self_distilled(dataset)
        if not own and lm_head_weight_t is None:
            raise DynTreeError(f"{dataset.directory} is not greedy self-distilled: the lm_head must score it")
        for key, response, hidden in dataset_sequences([dataset], backbone, min_response=3):
            response = response.long()
            val = is_validation(key, val_fraction)
            choices = response if own else backbone_choices(hidden, lm_head_weight_t)
            parts[val].append((hidden, response, choices))
            counts["sequences"] += 1
            counts["response_tokens"] += response.numel()
            counts["val_sequences"] += int(val)
    if not parts[False]:
        raise DynTreeError("the dataset holds no usable sequences for eagle heads")
    return parts[False], parts[True], counts


def batches(sequences: list, tokens_per_batch: int, order: list[int]) -> list[list[int]]:
    """Consecutive sequences of `order` grouped until a group holds about `tokens_per_batch` tokens."""
    out, group, size = [], [], 0
    for i in order:
        group.append(i)
        size += sequences[i][1].numel()
        if size >= tokens_per_batch:
            out.append(group)
            group, size = [], 0
    if group:
        out.append(group)
    return out


def pad(sequences: list, index: list[int], device) -> tuple[torch.Tensor, ...]:
    """Sequences `index` right-padded: features `[B, T, H]`, next ids `[B, T]`, lengths `[B]`, choices `[B, T]`."""
    lengths = [sequences[i][1].numel() for i in index]
    h = sequences[index[0]][0].shape[1]
    features = torch.zeros(len(index), max(lengths), h)
    next_ids = torch.zeros(len(index), max(lengths), dtype=torch.long)
    choices = torch.zeros(len(index), max(lengths), dtype=torch.long)
    for row, i in enumerate(index):
        features[row, : lengths[row]] = sequences[i][0].float()
        next_ids[row, : lengths[row]] = sequences[i][1]
        choices[row, : lengths[row]] = sequences[i][2]
    return (features.to(device), next_ids.to(device), torch.tensor(lengths, device=device), choices.to(device))


def evaluate(objective: EagleObjective, sequences: list, device, tokens_per_batch: int = 4096) -> dict | None:
    """Top-1 agreement with the backbone's own choices per draft step, and the mean loss, over `sequences`."""
    if not sequences:
        return None
    objective.eval()
    totals, loss_sum = torch.zeros(objective.steps, 2), 0.0
    with torch.no_grad():
        for group in batches(sequences, tokens_per_batch, list(range(len(sequences)))):
            loss, stats = objective(*pad(sequences, group, device))
            totals += stats.cpu()
            loss_sum += float(loss) * float(stats[0, 0])
    objective.train()
    n = totals[:, 0].clamp_min(1.0)
    return {"top1": (totals[:, 1] / n).tolist(), "loss": loss_sum / float(n[0]), "positions": int(totals[0, 0])}


def subset_of_choices(sequences: list, vocab_size: int, count: int) -> tuple[torch.Tensor | None, float]:
    """The `count` most frequent backbone choices of the training sequences (sorted ids), and the share of all
    choices they cover; (None, 1.0) for the whole vocabulary."""
    if not count or count >= vocab_size:
        return None, 1.0
    choices = torch.cat([s[2] for s in sequences])
    ids = most_frequent(choices, vocab_size, count)
    return ids, float(torch.isin(choices, ids).float().mean()) if choices.numel() else 1.0


def train_eagle(loaded, datasets, out_dir, config, progress: bool = True,
                block_dtype: torch.dtype = torch.float32) -> dict:
    """Train an EAGLE-style drafter for `loaded`'s backbone (`config`: a `TrainConfig`; its num_heads is the
    draft depth); write the heads and a report to `out_dir`."""
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from ..interop import load_heads

    started = time.perf_counter()
    if not config.shared_projection:
        raise DynTreeError("eagle heads project through the backbone's lm_head: no --own-projection")
    if config.num_layers != 1:
        raise DynTreeError("eagle heads are one decoder layer: --num-layers 1")
    device = loaded.backbone.device
    backbone = None if config.use_stored_hidden else loaded.backbone
    lm_head_t = loaded.backbone.lm_head.weight_t.detach().float()
    train_seqs, val_seqs, counts = load_sequences(datasets, config.val_fraction, backbone, lm_head_t)
    vocab_ids, coverage = subset_of_choices(train_seqs, loaded.config.vocab_size, config.vocab_subset)
    torch.manual_seed(config.seed)
    heads = EagleHeads.for_backbone(loaded.config, depth=config.num_heads).init_weights(seed=config.seed)
    if config.init_heads:
        start = load_heads(config.init_heads, loaded.config)
        if not isinstance(start, EagleHeads) or start.config.drafter != heads.config.drafter:
            raise DynTreeError(f"--init-heads {config.init_heads} are not eagle heads of this drafter's shape")
        heads.load_state_dict(start.state_dict())
    if vocab_ids is not None:  # the same weights, guessing among the subset
        weights = heads.state_dict()
        heads = EagleHeads(heads.config, vocab_ids)
        heads.load_state_dict(weights)
    heads.to(device)
    objective = EagleObjective(heads, lm_head_t,
                               loaded.backbone.embed_tokens.detach().float(), config.feature_loss,
                               config.soft_targets, config.hidden_noise, config.unroll, config.decay)
    per_epoch = len(batches(train_seqs, config.batch_size, list(range(len(train_seqs)))))
    total_steps = max(1, math.ceil(config.epochs * per_epoch))
    optimizer = torch.optim.AdamW(heads.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), total_steps)
    # The products in bf16 where this machine multiplies faster in it (measured once, as `--dtype auto`):
    # the weights, the optimiser and every validation figure stay fp32.
    mixed = auto_dtype(device) == torch.bfloat16
    history, step, epoch = [], 0, 0
    untrained = evaluate(objective, val_seqs, device)  # the baseline the history is read against
    if untrained is not None:
        history.append({"step": 0, **untrained})
    bar = tqdm(total=total_steps, desc="train eagle", disable=not progress, dynamic_ncols=True)
    objective.train()
    while step < total_steps:
        order = list(range(len(train_seqs)))
        random.Random(config.seed * 1000 + epoch).shuffle(order)
        for group in batches(train_seqs, config.batch_size, order):
            if step >= total_steps:
                break
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed):
                loss, _ = objective(*pad(train_seqs, group, device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                nn.utils.clip_grad_norm_(heads.parameters(), config.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        epoch += 1
        result = evaluate(objective, val_seqs, device)
        if result is not None:
            history.append({"step": step, **result})
    bar.close()
    heads.round_to_storage(block_dtype)
    report = {"dataset": [str(d.directory) for d in datasets], "model": loaded.name, "config": asdict(config),
              "data": counts, "vocab_subset_coverage": coverage, "steps": step, "processes": 1,
              "bf16_products": mixed, "wall_seconds": time.perf_counter() - started,
              "validation": evaluate(objective, val_seqs, device), "history": history}
    out = Path(out_dir).expanduser()
    heads.cpu().save(out, block_dtype)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report
