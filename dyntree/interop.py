"""Heads on disk in every layout: `load_heads` reads ours (`heads.py`), vLLM's Medusa drafter's and
FasterDecoding's Medusa v0.1; the exports write the other two.

Both describe the same network as ours (head h: L blocks `x + SiLU(W x + b)`, then a bias-free projection,
on the backbone's last normed hidden state), so converting is renaming plus filling in what a layout cannot
say. What each layout holds was checked against the projects' own source (cited in docs/interop.md):

- vLLM (`vllm/model_executor/models/medusa.py`, `Medusa.load_weights`; `vllm/transformers_utils/configs/
  medusa.py`, `MedusaConfig`): `config.json` with `model_type: "medusa"`, `architectures: ["MedusaModel"]`,
  `hidden_size`, `vocab_size`, `num_heads`, `num_hidden_layers`, optional `truncated_vocab_size` (< vocab_size
  only with a `token_map`), `medusa_fc_bias` (default false, and then bias tensors are silently dropped),
  `original_lm_head` (one projection `lm_heads.0.weight` shared by every head), `logit_scale`; and
  `model.safetensors` with `blocks.{h}.layers.{l}.weight|bias`, `lm_heads.{h}.weight` (`[truncated or full
  vocabulary, H]`; full rows are cut down to `token_map`) and `token_map` (the truncated vocabulary's ids);
  keys may carry a `medusa_heads.` prefix. vLLM renames every config key holding "num" and "heads" (or
  "layers") to `num_heads` (`num_hidden_layers`), so no other key of ours may contain those words.
- FasterDecoding (`medusa/model/medusa_model.py`): `config.json` with `medusa_num_heads`, `medusa_num_layers`,
  `base_model_name_or_path`; head h is `nn.Sequential(ResBlock x L, nn.Linear(H, V, bias=False))`, hence keys
  `{h}.{l}.linear.weight|bias` and `{h}.{L}.weight` over the full vocabulary, stored as `medusa_lm_head.pt`
  (what its `MedusaModel.from_pretrained` reads) or `medusa_lm_head.safetensors` (newer training scripts).
  Its loader builds the L blocks as `[ResBlock(H)] * L` (one module repeated) and always 5 heads, loaded with
  `strict=False`: blocks of 2+ block heads load without error but wrongly, so such exports warn
  (`loader_caveats`).

dyntree-only facts (the backbone's model type, a vocabulary subset expanded for FasterDecoding) travel in a
`dyntree` object inside `config.json`, which the other projects ignore, so a round trip gives back the same
heads.

Eagle heads (`eagle.EagleHeads`) go out in EAGLE-1's checkpoint layout (`--format eagle`), the one SGLang's
`LlamaForCausalLMEagle` (`python/sglang/srt/models/llama_eagle.py`) and vLLM's EAGLE drafter
(`vllm/model_executor/models/llama_eagle.py`) load: a Llama `config.json` with `num_hidden_layers: 1`, and
`model.safetensors` with `fc.weight|bias` (`[H, 2H]` over `[token embedding; feature]`), the one decoder
layer's `layers.0.self_attn.{q,k,v,o}_proj.weight`, `layers.0.post_attention_layernorm.weight` and
`layers.0.mlp.{gate,up,down}_proj.weight` (no `input_layernorm`: both engines drop it from EAGLE's first
layer), and `embed_tokens.weight` (the backbone's; the engines may share the target's instead). Both load it
by prefixing `model.` to every name but the lm_head's, and draft with the target's lm_head over the whole
vocabulary (a vocabulary subset of ours is a CPU economy that does not travel).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch

from .errors import DynTreeError
from .heads import HEADS_CONFIG, HeadsConfig, MedusaHeads, load_own_layout

FORMATS = ("vllm-medusa", "medusa", "eagle")
VLLM_WEIGHTS = "model.safetensors"
MEDUSA_PT = "medusa_lm_head.pt"
MEDUSA_SAFETENSORS = "medusa_lm_head.safetensors"
CONFIG = "config.json"
# Every file an export writes: `--force` removes these (and only these) from the output directory first.
EXPORT_FILES = (CONFIG, VLLM_WEIGHTS, MEDUSA_PT, MEDUSA_SAFETENSORS, "heads.json", "heads.safetensors")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ExportWarning(UserWarning):
    """An export that is right by its format, which the format's reference loader would still read wrongly."""


# -- export ----------------------------------------------------------------------------------------------
def loader_caveats(heads: MedusaHeads, fmt: str) -> list[str]:
    """One line per way the format's own loader would misread these heads (none for vLLM's, which builds
    every block and head from the config). FasterDecoding's `MedusaModel.from_pretrained` builds each head's
    blocks as `[ResBlock(H)] * L`, one module repeated, so a strict load of L >= 2 blocks leaves every block
    equal to the last one; its 5 heads and `strict=False` are documented in docs/interop.md."""
    layers = heads.config.num_layers
    if fmt != "medusa" or layers < 2:
        return []
    return [f"FasterDecoding's Medusa loader builds a head's blocks as one module repeated ([ResBlock(H)] * L), "
            f"so these {layers}-block heads load there without an error but run their last block {layers} times; "
            "dyntree and vLLM (--format vllm-medusa) read them right"]


def check_expressible(heads: MedusaHeads, fmt: str) -> None:
    """Refuse heads the format has no words for (path-conditional heads read more than the hidden state)."""
    if fmt not in FORMATS:
        raise DynTreeError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    head_type = getattr(heads.config, "head_type", "medusa")
    if fmt == "eagle":
        if head_type != "eagle":
            raise DynTreeError(f"{head_type!r} heads cannot be exported as eagle: that layout holds an EAGLE-style "
                               "feature drafter (train one with --head-type eagle)")
        return
    if head_type != "medusa":
        raise DynTreeError(f"{head_type!r} heads cannot be exported as {fmt}: that format holds only Medusa heads, "
                           "which read the hidden state alone")


def projection_rows(heads: MedusaHeads, lm_head_weight: torch.Tensor | None) -> torch.Tensor:
    """Each head's projection over its vocabulary (all of it, or `vocab_ids`), `[K, V', H]` float32.

    Heads that share the backbone's lm_head have no matrix of their own, so the backbone's `[V, H]` lm_head
    weight is needed to write one; int8 projections were de-quantised at load and are written as floats.
    """
    cfg = heads.config
    if heads.projection is not None:
        return heads.projection.detach().float()
    if lm_head_weight is None:
        raise DynTreeError("these heads use the backbone's lm_head as their projection: exporting them needs the "
                           "backbone (--model)")
    if tuple(lm_head_weight.shape) != (cfg.vocab_size, cfg.hidden_size):
        raise DynTreeError(f"the backbone's lm_head is {tuple(lm_head_weight.shape)}, the heads expect "
                           f"{(cfg.vocab_size, cfg.hidden_size)}")
    rows = lm_head_weight if heads.vocab_ids is None else lm_head_weight[heads.vocab_ids]
    return rows.detach().float()[None].expand(cfg.num_heads, -1, -1)


def _subset(heads: MedusaHeads) -> torch.Tensor | None:
    """The vocabulary subset, or None when the projection covers the whole vocabulary (a subset of every id,
    in any order, is written as a full matrix: vLLM ignores a `token_map` unless it truncates)."""
    if heads.vocab_ids is None or heads.vocab_ids.numel() == heads.config.vocab_size:
        return None
    return heads.vocab_ids


def _full_order(heads: MedusaHeads, rows: torch.Tensor) -> torch.Tensor:
    """`rows` `[K, V', H]` over `vocab_ids` put back in token-id order when the subset is the whole vocabulary."""
    if heads.vocab_ids is None:
        return rows
    full = torch.empty(rows.shape[0], heads.config.vocab_size, rows.shape[2], dtype=rows.dtype)
    full[:, heads.vocab_ids] = rows
    return full


def _dyntree_meta(heads: MedusaHeads, **extra) -> dict:
    meta = {"format": "dyntree-export", **extra}
    if heads.config.model_type is not None:
        meta["backbone_model_type"] = heads.config.model_type
    return meta


def save_vllm_medusa(heads: MedusaHeads, directory: str | os.PathLike, lm_head_weight: torch.Tensor | None = None,
                     dtype: torch.dtype = torch.float32, share_lm_head: bool = False) -> Path:
    """Write vLLM's Medusa drafter layout (`config.json` + `model.safetensors`).

    A vocabulary subset becomes `truncated_vocab_size` + `token_map` (vLLM scores the subset and gives every
    other token -inf, exactly our subset semantics). Heads that share the backbone's lm_head get a copy of it
    per head, or, with `share_lm_head`, one copy and `original_lm_head: true` (vLLM since PR #10454, late
    2024; older versions ignore that field and would leave heads 1.. without a projection).
    """
    from safetensors.torch import save_file

    check_expressible(heads, "vllm-medusa")
    cfg = heads.config
    if share_lm_head and heads.projection is not None:
        raise DynTreeError("--share-lm-head needs heads that use the backbone's lm_head; these have their own "
                           "projections")
    subset = _subset(heads)
    rows = projection_rows(heads, lm_head_weight)
    if subset is None:
        rows = _full_order(heads, rows)
    tensors = {}
    for h in range(cfg.num_heads):
        for layer in range(cfg.num_layers):
            tensors[f"blocks.{h}.layers.{layer}.weight"] = heads.block_weight[h, layer].detach().to(dtype).contiguous()
            tensors[f"blocks.{h}.layers.{layer}.bias"] = heads.block_bias[h, layer].detach().to(dtype).contiguous()
        if not share_lm_head or h == 0:
            tensors[f"lm_heads.{h}.weight"] = rows[h].to(dtype, copy=True).contiguous()
    config = {
        "model_type": "medusa",
        "architectures": ["MedusaModel"],
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "num_heads": cfg.num_heads,
        "num_hidden_layers": cfg.num_layers,
        "medusa_fc_bias": True,  # our blocks always have biases; vLLM's default (false) would drop them
    }
    if subset is not None:
        tensors["token_map"] = subset.to(torch.int64).contiguous()
        config["truncated_vocab_size"] = int(subset.numel())
    if share_lm_head:
        config["original_lm_head"] = True
    config["dyntree"] = _dyntree_meta(heads)
    out = _prepare_out(directory)
    save_file(tensors, str(out / VLLM_WEIGHTS), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def expand_to_vocabulary(rows: torch.Tensor, vocab_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Full-vocabulary projections `[K, V, H]` from projections over a subset `rows` `[K, S, H]`.

    FasterDecoding ranks each head's raw logits with `torch.topk(medusa_logits, TOPK)` (no softmax, no
    mask), and its projection is `nn.Linear(H, V, bias=False)`: without a bias no row can give a constant
    "minus infinity" logit, and a huge negative row is no answer either (its logit is +huge whenever the
    head state points the other way; inf weights give NaN or +inf; fp16, the backbone dtype Medusa usually
    casts heads to, overflows at 65504). The rows outside the subset are therefore each head's *mean* subset
    row: its logit is the mean of the subset's logits, which can never exceed the best one (equal only when
    every subset logit is equal), so an outside token is never a head's top guess, and with thousands of
    subset tokens it ranks far below the top 10 Medusa's trees take. Never being right, such a guess only
    wastes a tree node; verification keeps the output exact either way.
    """
    k, _, h = rows.shape
    filler = rows.mean(dim=1, keepdim=True)  # [K, 1, H]
    full = filler.expand(k, vocab_size, h).clone()
    full[:, vocab_ids] = rows
    return full


def save_fasterdecoding_medusa(heads: MedusaHeads, directory: str | os.PathLike,
                               lm_head_weight: torch.Tensor | None = None, base_model: str = "",
                               dtype: torch.dtype = torch.float32, safetensors: bool = True,
                               torch_file: bool = False) -> Path:
    """Write FasterDecoding's Medusa v0.1 layout: `config.json` + `medusa_lm_head.safetensors` and/or
    `medusa_lm_head.pt` (FasterDecoding's own `MedusaModel.from_pretrained` reads only the `.pt`).

    Projections become full-vocabulary matrices: shared ones copy the backbone's lm_head, subsets are
    expanded by `expand_to_vocabulary` and their ids kept in `config.json` so that dyntree loads the
    subset back.
    """
    check_expressible(heads, "medusa")
    if not (safetensors or torch_file):
        raise DynTreeError("write at least one of medusa_lm_head.safetensors and medusa_lm_head.pt")
    cfg = heads.config
    subset = _subset(heads)
    rows = projection_rows(heads, lm_head_weight).to(dtype).float()  # round first: the filler is their mean
    full = _full_order(heads, rows) if subset is None else expand_to_vocabulary(rows, subset, cfg.vocab_size)
    state = {}
    for h in range(cfg.num_heads):
        for layer in range(cfg.num_layers):
            state[f"{h}.{layer}.linear.weight"] = heads.block_weight[h, layer].detach().to(dtype).contiguous()
            state[f"{h}.{layer}.linear.bias"] = heads.block_bias[h, layer].detach().to(dtype).contiguous()
        state[f"{h}.{cfg.num_layers}.weight"] = full[h].to(dtype, copy=True).contiguous()
    meta = _dyntree_meta(heads)
    if subset is not None:
        meta["vocab_ids"] = subset.tolist()
    config = {"medusa_num_heads": cfg.num_heads, "medusa_num_layers": cfg.num_layers,
              "base_model_name_or_path": base_model, "dyntree": meta}
    out = _prepare_out(directory)
    if safetensors:
        from safetensors.torch import save_file

        save_file(state, str(out / MEDUSA_SAFETENSORS), metadata={"format": "pt"})
    if torch_file:
        torch.save(state, out / MEDUSA_PT)
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def save_medusa(heads: MedusaHeads, directory: str | os.PathLike, base_model: str = "") -> Path:
    """Write heads with own projections as FasterDecoding's Medusa v0.1 `medusa_lm_head.pt` (the file its
    loader reads); `export_heads` writes the other layouts."""
    if heads.conditional:
        raise DynTreeError(f"Medusa v0.1 cannot express {heads.config.head_type} heads (their guesses read the path)")
    if heads.projection is None:
        raise DynTreeError("Medusa v0.1 format needs heads with an own projection (or the backbone's lm_head: "
                           "see export_heads)")
    return save_fasterdecoding_medusa(heads, directory, base_model=base_model, safetensors=False, torch_file=True)


def save_eagle(heads, directory: str | os.PathLike, backbone_config, embed_tokens: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> Path:
    """Eagle heads in EAGLE-1's checkpoint layout (the module docstring names the keys), for SGLang and vLLM."""
    out = _prepare_out(directory)
    shape = heads.config.drafter
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": heads.config.hidden_size, "intermediate_size": shape["intermediate_size"],
        "num_attention_heads": shape["num_attention_heads"], "num_key_value_heads": shape["num_kv_heads"],
        "head_dim": shape["head_dim"], "num_hidden_layers": 1, "vocab_size": heads.config.vocab_size,
        "rms_norm_eps": shape["rms_norm_eps"], "rope_theta": shape["rope_theta"],
        "max_position_embeddings": backbone_config.max_position_embeddings, "bias": True,
        "tie_word_embeddings": False, "torch_dtype": str(dtype).removeprefix("torch."),
        "dyntree": {"head_type": "eagle", "draft_depth": heads.config.num_heads,
                    "base_model_type": heads.config.model_type, "vocab_subset": heads.config.vocab_subset},
    }
    layer = "layers.0."
    tensors = {"fc.weight": heads.fuse_weight, "fc.bias": heads.fuse_bias,
               layer + "self_attn.q_proj.weight": heads.q_weight, layer + "self_attn.k_proj.weight": heads.k_weight,
               layer + "self_attn.v_proj.weight": heads.v_weight, layer + "self_attn.o_proj.weight": heads.o_weight,
               layer + "post_attention_layernorm.weight": heads.mlp_norm,
               layer + "mlp.gate_proj.weight": heads.gate_weight, layer + "mlp.up_proj.weight": heads.up_weight,
               layer + "mlp.down_proj.weight": heads.down_weight, "embed_tokens.weight": embed_tokens}
    from safetensors.torch import save_file

    save_file({k: v.detach().to(dtype).contiguous() for k, v in tensors.items()}, str(out / VLLM_WEIGHTS),
              metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def export_heads(heads: MedusaHeads, directory: str | os.PathLike, fmt: str,
                 lm_head_weight: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                 base_model: str = "", share_lm_head: bool = False, torch_file: bool = False,
                 backbone=None) -> Path:
    """Write `heads` in format `fmt` ("vllm-medusa", "medusa" or "eagle": that one needs the `backbone`, for
    its embeddings and context length) under `directory`."""
    check_expressible(heads, fmt)
    if fmt == "eagle":
        if backbone is None:
            raise DynTreeError("the eagle layout needs the backbone (its embeddings): pass --model")
        if share_lm_head or torch_file:
            raise DynTreeError("--share-lm-head and --pt apply to the Medusa formats only")
        return save_eagle(heads, directory, backbone.config, backbone.embed_tokens, dtype)
    for line in loader_caveats(heads, fmt):
        warnings.warn(line, ExportWarning, stacklevel=2)
    if fmt == "vllm-medusa":
        if torch_file:
            raise DynTreeError("--pt applies to the medusa format only")
        return save_vllm_medusa(heads, directory, lm_head_weight, dtype, share_lm_head)
    if share_lm_head:
        raise DynTreeError("--share-lm-head applies to the vllm-medusa format only")
    return save_fasterdecoding_medusa(heads, directory, lm_head_weight, base_model, dtype, torch_file=torch_file)


def _prepare_out(directory: str | os.PathLike) -> Path:
    out = Path(directory).expanduser()
    if out.exists() and not out.is_dir():
        raise DynTreeError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


# -- import ----------------------------------------------------------------------------------------------
def load_heads(path: str | os.PathLike, backbone_config=None) -> MedusaHeads:
    """Load heads saved by `MedusaHeads.save`, or in FasterDecoding's Medusa v0.1 or vLLM's Medusa layout;
    check they fit the backbone."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DynTreeError(f"no heads at {path}")
    if path.is_file():
        path = path.parent
    if (path / HEADS_CONFIG).is_file():
        heads = load_own_layout(path)
    else:
        heads = load_foreign_heads(path, backbone_config)
    if backbone_config is not None:
        heads.config.check_fits(backbone_config)
    return heads.eval()


def detect_foreign(path: Path) -> str | None:
    """"medusa" (FasterDecoding files), "vllm-medusa" (vLLM config + weights) or None."""
    if (path / MEDUSA_SAFETENSORS).is_file() or (path / MEDUSA_PT).is_file():
        return "medusa"
    if (path / CONFIG).is_file() and (path / VLLM_WEIGHTS).is_file():
        try:
            if json.loads((path / CONFIG).read_text()).get("model_type") == "medusa":
                return "vllm-medusa"
        except (ValueError, AttributeError):
            return None
    return None


def load_foreign_heads(path: Path, backbone_config=None) -> MedusaHeads:
    """Heads from a FasterDecoding or vLLM Medusa directory (see the module docstring for the layouts)."""
    kind = detect_foreign(path)
    if kind == "medusa":
        return _load_fasterdecoding(path, backbone_config)
    if kind == "vllm-medusa":
        return _load_vllm(path, backbone_config)
    raise DynTreeError(f"{path} holds no heads (heads.json, {MEDUSA_SAFETENSORS} / {MEDUSA_PT}, or a vLLM "
                       f"Medusa {CONFIG} with {VLLM_WEIGHTS})")


def _read_config(path: Path, what: str) -> dict:
    cfg_file = path / CONFIG
    if not cfg_file.is_file():
        return {}
    try:
        config = json.loads(cfg_file.read_text())
    except ValueError as exc:
        raise DynTreeError(f"corrupt {what} config {cfg_file}: {exc}") from exc
    if not isinstance(config, dict):
        raise DynTreeError(f"corrupt {what} config {cfg_file}: not a JSON object")
    return config


def _read_tensors(file: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DynTreeError(f"corrupt {what} checkpoint {file}: {exc}".splitlines()[0]) from exc
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DynTreeError(f"corrupt {what} checkpoint {file}: not a state dict of tensors")
    return state


def _assemble(block_weight, block_bias, rows, vocab_ids, vocab_size, model_type, backbone_config) -> MedusaHeads:
    """MedusaHeads with own projections `rows` `[K, V', H]` (over `vocab_ids` when given)."""
    k, layers, hidden = block_weight.shape[0], block_weight.shape[1], rows.shape[2]
    config = HeadsConfig(k, layers, hidden, vocab_size, shared_projection=False, model_type=model_type)
    if backbone_config is not None:
        config.check_fits(backbone_config)
    heads = MedusaHeads(config, vocab_ids)
    with torch.no_grad():
        heads.block_weight.copy_(block_weight)
        heads.block_bias.copy_(block_bias)
        heads.projection.copy_(rows)
    return heads


def _model_type(config: dict) -> str | None:
    meta = config.get("dyntree")
    return meta.get("backbone_model_type") if isinstance(meta, dict) else None


_MEDUSA_KEY = re.compile(r"^(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)$")


def _load_fasterdecoding(path: Path, backbone_config) -> MedusaHeads:
    """FasterDecoding's files. Published configs often state a wrong head count, so the weights decide."""
    file = path / MEDUSA_SAFETENSORS if (path / MEDUSA_SAFETENSORS).is_file() else path / MEDUSA_PT
    state = _read_tensors(file, "Medusa")
    config = _read_config(path, "Medusa")
    blocks: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    projections: dict[int, tuple[int, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = _MEDUSA_KEY.match(key)
        if not m:
            raise DynTreeError(f"unexpected key {key!r} in {file}")
        h, idx, kind = int(m[1]), int(m[2]), m[3]
        if kind == "weight":
            projections[h] = (idx, tensor)
        else:
            blocks.setdefault((h, idx), {})[kind.split(".")[1]] = tensor
    num_heads = max(h for h, _ in blocks) + 1 if blocks else max(projections) + 1
    num_layers = max(i for _, i in blocks) + 1 if blocks else 0
    if set(projections) != set(range(num_heads)):
        raise DynTreeError(f"Medusa checkpoint {file} lacks a projection for some heads")
    vocab, hidden = next(iter(projections.values()))[1].shape
    block_weight = torch.zeros(num_heads, num_layers, hidden, hidden)
    block_bias = torch.zeros(num_heads, num_layers, hidden)
    rows = torch.zeros(num_heads, vocab, hidden)
    for h in range(num_heads):
        idx, weight = projections[h]
        if idx != num_layers or tuple(weight.shape) != (vocab, hidden):
            raise DynTreeError(f"Medusa checkpoint: head {h} projection is {tuple(weight.shape)} at index {idx}")
        rows[h] = weight.float()
        for layer in range(num_layers):
            block = blocks.get((h, layer))
            if block is None or set(block) != {"weight", "bias"}:
                raise DynTreeError(f"Medusa checkpoint: head {h} block {layer} is incomplete")
            if tuple(block["weight"].shape) != (hidden, hidden) or tuple(block["bias"].shape) != (hidden,):
                raise DynTreeError(f"Medusa checkpoint: head {h} block {layer} is {tuple(block['weight'].shape)}, "
                                   f"expected {(hidden, hidden)}")
            block_weight[h, layer] = block["weight"].float()
            block_bias[h, layer] = block["bias"].float()
    vocab_ids = _exported_subset(config, rows)
    if vocab_ids is not None:
        rows = rows[:, vocab_ids]
    return _assemble(block_weight, block_bias, rows, vocab_ids, vocab, _model_type(config), backbone_config)


def _exported_subset(config: dict, rows: torch.Tensor) -> torch.Tensor | None:
    """The vocabulary subset a dyntree export expanded, if its filler rows are still intact (heads trained
    further over the full vocabulary keep all their rows)."""
    meta = config.get("dyntree")
    ids = meta.get("vocab_ids") if isinstance(meta, dict) else None
    if not isinstance(ids, list) or not ids:
        return None
    vocab = rows.shape[1]
    try:
        vocab_ids = torch.tensor(ids, dtype=torch.long)
    except (TypeError, ValueError):
        return None
    if vocab_ids.dim() != 1 or int(vocab_ids.min()) < 0 or int(vocab_ids.max()) >= vocab \
            or vocab_ids.unique().numel() != vocab_ids.numel():
        return None
    outside = torch.ones(vocab, dtype=torch.bool)
    outside[vocab_ids] = False
    rest = rows[:, outside]  # [K, V - S, H]
    if rest.shape[1] and not bool((rest == rest[:, :1]).all()):
        return None
    return vocab_ids


def _vllm_counts(config: dict) -> tuple[int | None, int | None]:
    """num_heads / num_hidden_layers the way vLLM's MedusaConfig.from_pretrained reads them: any key with
    "num" and "heads" (or "layers") in its name."""
    heads = layers = None
    for key, value in config.items():
        if "num" in key and "heads" in key:
            heads = value
        elif "num" in key and "layers" in key:
            layers = value
    return heads, layers


def _load_vllm(path: Path, backbone_config) -> MedusaHeads:
    config = _read_config(path, "vLLM Medusa")
    file = path / VLLM_WEIGHTS
    state = {k.removeprefix("medusa_heads."): v for k, v in _read_tensors(file, "vLLM Medusa").items()}
    num_heads, num_layers = _vllm_counts(config)
    hidden, vocab = config.get("hidden_size"), config.get("vocab_size")
    for name, value in (("num_heads", num_heads), ("num_hidden_layers", num_layers), ("hidden_size", hidden),
                        ("vocab_size", vocab)):
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "num_hidden_layers" else 1):
            raise DynTreeError(f"corrupt vLLM Medusa config {path / CONFIG}: {name} is {value!r}")
    first = state.get("lm_heads.0.weight")
    if first is None or first.dim() != 2 or first.shape[1] != hidden:
        got = tuple(first.shape) if first is not None else "missing"
        raise DynTreeError(f"vLLM Medusa checkpoint {file}: lm_heads.0.weight is {got}, expected [*, {hidden}]")
    truncated = config.get("truncated_vocab_size") or vocab
    if not isinstance(truncated, int) or not 0 < truncated <= vocab:
        raise DynTreeError(f"corrupt vLLM Medusa config {path / CONFIG}: truncated_vocab_size is {truncated!r}")
    fc_bias = bool(config.get("medusa_fc_bias", False))
    shared = bool(config.get("original_lm_head", False))
    scale = float(config.get("logit_scale", 1.0))
    token_map = state.pop("token_map", None)
    if truncated < vocab:
        if token_map is None or token_map.dim() != 1 or token_map.numel() != truncated:
            raise DynTreeError(f"vLLM Medusa checkpoint {file}: truncated_vocab_size {truncated} needs a token_map "
                               f"of that many ids")
        token_map = token_map.long()
        if int(token_map.min()) < 0 or int(token_map.max()) >= vocab:
            raise DynTreeError(f"vLLM Medusa checkpoint {file}: token_map holds ids outside the vocabulary")
    else:
        token_map = None  # vLLM ignores it too
    expected = set()
    block_weight = torch.zeros(num_heads, num_layers, hidden, hidden)
    block_bias = torch.zeros(num_heads, num_layers, hidden)
    rows = torch.zeros(num_heads, truncated, hidden)
    for h in range(num_heads):
        for layer in range(num_layers):
            for kind, shape, target in (("weight", (hidden, hidden), block_weight), ("bias", (hidden,), block_bias)):
                key = f"blocks.{h}.layers.{layer}.{kind}"
                if kind == "bias" and not fc_bias:
                    if key in state:
                        raise DynTreeError(f"vLLM Medusa checkpoint {file} has block biases but its config lacks "
                                           "medusa_fc_bias: true, so vLLM would silently drop them")
                    continue
                expected.add(key)
                if key not in state or tuple(state[key].shape) != shape:
                    got = tuple(state[key].shape) if key in state else "missing"
                    raise DynTreeError(f"vLLM Medusa checkpoint {file}: {key} is {got}, expected {shape}")
                target[h, layer] = state[key].float()
        key = "lm_heads.0.weight" if shared else f"lm_heads.{h}.weight"
        expected.add(key)
        weight = state.get(key)
        if weight is None or weight.dim() != 2 or weight.shape[1] != hidden:
            got = tuple(weight.shape) if weight is not None else "missing"
            raise DynTreeError(f"vLLM Medusa checkpoint {file}: {key} is {got}, expected [*, {hidden}]")
        if token_map is not None and weight.shape[0] > truncated:
            weight = weight[token_map]  # vLLM cuts full rows down to the token map the same way
        if weight.shape[0] != truncated:
            raise DynTreeError(f"vLLM Medusa checkpoint {file}: {key} has {weight.shape[0]} rows, expected {truncated}")
        rows[h] = weight.float() * scale
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise DynTreeError(f"unexpected key {unexpected[0]!r} in {file}")
    return _assemble(block_weight, block_bias, rows, token_map, vocab, _model_type(config), backbone_config)
