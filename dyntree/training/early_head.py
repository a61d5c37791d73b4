"""A trained early head for ProPD pruning: a residual adapter on the backbone's layer-l state, read through the
backbone's own final norm and lm_head (both frozen).

Why: the logit lens (no adapter) is a poor guess on small models: on SmolLM2-135M its top-1 agrees with the
full model's next token about 8% of the time after 8 of 30 layers and 41% after 29 (docs/dynamic-trees.md),
so pruning with it throws away accepted tokens. One block `x + SiLU(W x + b)` (W, b zero at the start: the
adapter starts as the lens) is trained to predict what the full model chose next, on the token ids of a
`dyntree distill` dataset, whose responses are the model's own outputs. The layer-l states are recomputed by
running the backbone's first l layers over those ids (the dataset stores final states only).

Files, in the heads directory by convention (the API looks there): `early_head.json` (layer, shapes, model)
and `early_head.safetensors` (weight `[H, H]`, bias `[H]`).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# The files are read where pruning uses them (`early.load_early_head`, re-exported here).
from ..early import EARLY_HEAD_CONFIG as CONFIG_FILE, EARLY_HEAD_FORMAT as FORMAT, EARLY_HEAD_WEIGHTS as WEIGHTS_FILE
from ..early import load_early_head  # noqa: F401
from ..errors import DynTreeError
from ..heads import HEADS_CONFIG
from ..interop import load_heads
from ..model import attention_mask, causal_block
from .dataset import DistillDataset, is_validation


@torch.inference_mode()
def layer_states(backbone, tokens: torch.Tensor, prompt_len: int, layer: int) -> torch.Tensor:
    """`[R, H]` the residual stream after `layer` layers at the positions that predicted each response token."""
    n = tokens.numel()
    cache = backbone.new_cache(1, n + 1)
    slots = torch.arange(n, device=backbone.device)[None]
    mask = attention_mask(cache.lengths, slots, causal_block(1, n, device=backbone.device))
    hidden = backbone.run_layers(backbone.embed(tokens.long()[None].to(backbone.device)), slots, cache, slots,
                                 mask, 0, layer)[0]
    return hidden[prompt_len - 1 : n - 1].to(torch.bfloat16).cpu()  # bf16: the residual stream's range, half size


def early_examples(ds: DistillDataset, backbone, layer: int, val_fraction: float):
    """(train states, train targets, val states, val targets) from every shard of a distilled dataset."""
    parts = {False: ([], []), True: ([], [])}
    for path in ds.shard_paths():
        shard = ds.read_shard(path, with_hidden=False)
        for i, key in enumerate(shard.keys):
            start, end = int(shard.offsets[i]), int(shard.offsets[i + 1])
            plen = int(shard.prompt_lens[i])
            tokens = shard.tokens[start:end]
            if end - start - plen < 1 or plen < 1:
                continue
            states = layer_states(backbone, tokens, plen, layer)
            val = is_validation(key, val_fraction)
            parts[val][0].append(states)
            parts[val][1].append(tokens[plen:].long())
    if not parts[False][0]:
        raise DynTreeError(f"dataset {ds.directory} holds no usable sequences")

    def stack(val: bool):
        states, targets = parts[val]
        if not states:
            return torch.zeros(0, backbone.config.hidden_size), torch.zeros(0, dtype=torch.long)
        return torch.cat(states), torch.cat(targets)

    return (*stack(False), *stack(True))


class EarlyObjective(torch.nn.Module):
    """Logits of the adapted layer-l state through the frozen final norm and lm_head (fp32), over the whole
    vocabulary or the rows of `vocab_ids` (the subset the heads, and so the pruner, rank over)."""

    def __init__(self, backbone, vocab_ids: torch.Tensor | None = None):
        super().__init__()
        size = backbone.config.hidden_size
        self.weight = torch.nn.Parameter(torch.zeros(size, size))
        self.bias = torch.nn.Parameter(torch.zeros(size))
        self.norm = backbone.norm.float().cpu()
        self.eps = backbone.config.rms_norm_eps
        rows = backbone.lm_head.weight if vocab_ids is None else backbone.lm_head.weight[vocab_ids.to(
            backbone.lm_head.weight.device)]
        self.lm_head = rows.float().cpu()

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        states = states.float()
        adapted = states + F.silu(F.linear(states, self.weight, self.bias))
        normed = F.rms_norm(adapted, (adapted.shape[-1],), self.norm, self.eps)
        return normed @ self.lm_head.T


@torch.no_grad()
def agreement(objective: EarlyObjective, states: torch.Tensor, targets: torch.Tensor, ks=(1, 4, 8, 32)) -> dict:
    """Share of rows whose target ranks within the early top-k (ties kept), for each k."""
    if targets.numel() == 0:
        return {}
    hits = {k: 0 for k in ks}
    for start in range(0, targets.numel(), 1024):
        logits = objective(states[start : start + 1024])
        target = logits.gather(1, targets[start : start + 1024, None])
        rank = (logits > target).sum(1)
        for k in ks:
            hits[k] += int((rank < k).sum())
    return {f"top{k}": hits[k] / targets.numel() for k in ks}


def subset_targets(targets: torch.Tensor, vocab_ids: torch.Tensor | None, vocab_size: int):
    """Targets as column indices of the objective's vocabulary, and which rows have one (a token outside the
    subset cannot be a class of a subset's softmax; the pruner scores such a child by itself anyway)."""
    if vocab_ids is None:
        return targets, torch.ones_like(targets, dtype=torch.bool)
    column = torch.full((vocab_size,), -1, dtype=torch.long)
    column[vocab_ids.cpu()] = torch.arange(vocab_ids.numel())
    mapped = column[targets]
    return mapped.clamp(min=0), mapped >= 0


def train_early_head(loaded, dataset_dir, out_dir, layer: int, epochs: float = 2.0, lr: float = 1e-3,
                     batch_size: int = 256, val_fraction: float = 0.05, seed: int = 0,
                     vocab_ids: torch.Tensor | None = None) -> dict:
    """Train the adapter for `layer` and save it in `out_dir`; returns a report (lens vs adapter agreement).

    `vocab_ids`: rank over this vocabulary subset, as the pruner does with heads that have one (None: the
    heads saved in `out_dir` decide; the whole vocabulary when they have no subset). A tenth of the
    vocabulary makes training about ten times cheaper."""
    backbone = loaded.backbone
    num_layers = backbone.config.num_layers
    if not 0 < layer < num_layers:
        raise DynTreeError(f"--early-layer must be between 1 and {num_layers - 1} for this model, got {layer}")
    if epochs <= 0 or batch_size < 1 or lr <= 0:
        raise DynTreeError("epochs, batch size and learning rate must be positive")
    ds = DistillDataset.open(dataset_dir)
    if vocab_ids is None:
        vocab_ids = _heads_vocab(out_dir, loaded.config)
    started = time.perf_counter()
    train_x, train_y, val_x, val_y = early_examples(ds, backbone, layer, val_fraction)
    vocab_size = backbone.config.vocab_size
    train_y, inside = subset_targets(train_y, vocab_ids, vocab_size)
    train_x, train_y = train_x[inside], train_y[inside]
    val_y, inside = subset_targets(val_y, vocab_ids, vocab_size)
    val_x, val_y = val_x[inside], val_y[inside]
    if train_y.numel() == 0:
        raise DynTreeError("no training row has its target inside the heads' vocabulary subset")
    torch.manual_seed(seed)
    objective = EarlyObjective(backbone, vocab_ids)
    before = agreement(objective, val_x, val_y)  # the adapter starts as the plain logit lens
    optimizer = torch.optim.AdamW([objective.weight, objective.bias], lr=lr, weight_decay=0.0)
    steps = max(1, math.ceil(epochs * train_y.numel() / batch_size))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(train_y.numel(), generator=generator)
    position, losses = 0, []
    for _ in range(steps):
        if position + batch_size > order.numel():
            order, position = torch.randperm(train_y.numel(), generator=generator), 0
        rows = order[position : position + batch_size]
        position += batch_size
        loss = F.cross_entropy(objective(train_x[rows]), train_y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    after = agreement(objective, val_x, val_y)
    save_early_head(out_dir, layer, objective.weight.detach(), objective.bias.detach(), backbone.config)
    return {"layer": layer, "vocab": objective.lm_head.shape[0], "train_rows": int(train_y.numel()),
            "val_rows": int(val_y.numel()), "steps": steps,
            "final_loss": sum(losses[-20:]) / len(losses[-20:]), "val_lens": before, "val_adapter": after,
            "wall_seconds": time.perf_counter() - started}


def _heads_vocab(directory, backbone_config) -> torch.Tensor | None:
    """The vocabulary subset of the heads saved in `directory`, if any."""

    path = Path(directory)
    if not (path / HEADS_CONFIG).is_file():
        return None
    return load_heads(path, backbone_config).vocab_ids


def save_early_head(out_dir, layer: int, weight: torch.Tensor, bias: torch.Tensor, config) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"weight": weight.float().contiguous(), "bias": bias.float().contiguous()}, str(out / WEIGHTS_FILE))
    meta = {"format": FORMAT, "version": 1, "layer": layer, **config.fingerprint()}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return out
