"""Medusa heads: K small residual MLPs on the backbone's last (normed) hidden state.

Head k (0-based) guesses the token k+2 positions after the hidden state's own position (the backbone's
lm_head guesses k=+1). Each head is L blocks `x + SiLU(W x + b)` and a vocabulary projection, which is either
its own matrix or the backbone's lm_head ("shared"), optionally restricted to a subset of the vocabulary
(`vocab_ids`): on a CPU the projection dominates the heads' cost, and a 8k-token subset is ~7x cheaper than
49k while the heads are rarely right about rare tokens anyway. Losslessness never depends on the heads.

On disk: ours is `heads.safetensors` + `heads.json` (shape and the backbone fingerprint it was trained for);
`load_heads` also reads FasterDecoding's Medusa v0.1 and vLLM's Medusa layouts, which `dyntree.interop`
reads and writes.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DynTreeError
from .kernels import Dense

FORMAT_VERSION = 1
HEADS_FILE = "heads.safetensors"
HEADS_CONFIG = "heads.json"
MEDUSA_FILE = "medusa_lm_head.pt"


@dataclass
class HeadsConfig:
    num_heads: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    shared_projection: bool = True
    model_type: str | None = None  # backbone fingerprint; None = unknown (Medusa files)
    vocab_subset: int | None = None  # size of `vocab_ids` when the projection covers only part of the vocabulary
    head_type: str = "medusa"  # "medusa": each head reads the hidden state only; "hydra": also the drafted path

    def check_fits(self, backbone_config) -> None:
        fp = backbone_config.fingerprint()
        if self.hidden_size != fp["hidden_size"] or self.vocab_size != fp["vocab_size"]:
            raise DynTreeError(
                f"heads do not fit this model: heads expect hidden size {self.hidden_size} and vocabulary "
                f"{self.vocab_size}, the model has {fp['hidden_size']} and {fp['vocab_size']}"
            )
        if self.model_type is not None and self.model_type != fp["model_type"]:
            raise DynTreeError(
                f"heads do not fit this model: trained for a {self.model_type!r} backbone, this is {fp['model_type']!r}"
            )


class MedusaHeads(nn.Module):
    """All K heads as stacked tensors, so a step runs them with a few batched matmuls."""

    def __init__(self, config: HeadsConfig, vocab_ids: torch.Tensor | None = None):
        super().__init__()
        k, layers, h = config.num_heads, config.num_layers, config.hidden_size
        self.config = config
        # Medusa initialises the blocks at zero so that an untrained head equals the lm_head.
        self.block_weight = nn.Parameter(torch.zeros(k, layers, h, h))  # [K, L, out, in]
        self.block_bias = nn.Parameter(torch.zeros(k, layers, h))
        if vocab_ids is not None:
            vocab_ids = vocab_ids.to(torch.long)
            config.vocab_subset = int(vocab_ids.numel())
        self.register_buffer("vocab_ids", vocab_ids, persistent=False)
        width = config.vocab_subset or config.vocab_size
        self.projection = None if config.shared_projection else nn.Parameter(torch.zeros(k, width, h))
        self._shared_cache: tuple[tuple, torch.Tensor] | None = None
        self._projection_t_cache: tuple[tuple[int, int], torch.Tensor] | None = None

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def random(cls, backbone_config, num_heads: int = 4, num_layers: int = 1, seed: int = 0, scale: float = 0.05):
        """Untrained heads with random blocks: useful to test losslessness, useless for speed."""
        cfg = HeadsConfig(num_heads, num_layers, backbone_config.hidden_size, backbone_config.vocab_size,
                          shared_projection=True, model_type=backbone_config.model_type)
        heads = cls(cfg)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            heads.block_weight.copy_(torch.randn(heads.block_weight.shape, generator=gen) * scale)
            heads.block_bias.copy_(torch.randn(heads.block_bias.shape, generator=gen) * scale)
        return heads

    def init_projection_from(self, lm_head_weight: torch.Tensor) -> None:
        """Start an own projection from the backbone's lm_head rows (Medusa's initialisation)."""
        if self.projection is None:
            return
        rows = lm_head_weight if self.vocab_ids is None else lm_head_weight[self.vocab_ids]
        with torch.no_grad():
            self.projection.copy_(rows[None].expand_as(self.projection))

    # -- forward ---------------------------------------------------------------------------------------
    def head_states(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[N, H]` normed backbone states -> `[N, K, H]` per-head states after the residual blocks.

        The heads keep their own dtype (fp32 as trained and stored) whatever the backbone's: a bf16 state is
        cast up here, which costs a [N, H] conversion, while bf16 heads would guess differently than trained.
        """
        hidden = hidden.to(self.block_weight.dtype)
        x = hidden[None].expand(self.num_heads, *hidden.shape)  # [K, N, H]
        for layer in range(self.config.num_layers):
            w = self.block_weight[:, layer]  # [K, H, H]
            x = x + F.silu(torch.baddbmm(self.block_bias[:, layer, None, :], x, w.transpose(1, 2)))
        return x.transpose(0, 1)

    def logits(self, hidden: torch.Tensor, lm_head_weight_t: torch.Tensor) -> torch.Tensor:
        """Per-head logits `[N, K, V']` over the projection's vocabulary (all of it, or `vocab_ids`).

        `lm_head_weight_t` is the backbone's lm_head as `[H, V]` (used when the projection is shared).
        """
        states = self.head_states(hidden)  # [N, K, H]
        n, k, h = states.shape
        if self.projection is None:
            return (states.reshape(n * k, h) @ self._shared_weight_t(lm_head_weight_t)).view(n, k, -1)
        # Training needs the gradient through the parameter; otherwise the contiguous copy is faster.
        projection_t = self.projection.transpose(1, 2) if torch.is_grad_enabled() else self._projection_t()
        return torch.bmm(states.transpose(0, 1), projection_t).transpose(0, 1)

    def _shared_weight_t(self, lm_head_weight_t: torch.Tensor) -> torch.Tensor:
        """The backbone's lm_head as `[H, V']` in the heads' dtype: its vocabulary subset and/or an fp32 copy
        of a bf16 backbone's, made once (keyed by the weight's storage: callers may pass a fresh view)."""
        dtype = self.block_weight.dtype
        if self.vocab_ids is None and lm_head_weight_t.dtype == dtype:
            return lm_head_weight_t
        key = (lm_head_weight_t.data_ptr(), lm_head_weight_t.dtype, dtype)
        if self._shared_cache is None or self._shared_cache[0] != key:
            rows = lm_head_weight_t if self.vocab_ids is None else lm_head_weight_t[:, self.vocab_ids]
            self._shared_cache = (key, rows.to(dtype).contiguous())
        return self._shared_cache[1]

    def _projection_t(self) -> torch.Tensor:
        """The own projections as a contiguous `[K, H, V']` copy: bmm through the transposed view of the
        `[K, V', H]` parameter takes a slow path on CPU (about 2x slower for one row). Re-made when the
        parameter changes (training bumps its version)."""
        key = (self.projection.data_ptr(), self.projection._version)
        if self._projection_t_cache is None or self._projection_t_cache[0] != key:
            self._projection_t_cache = (key, self.projection.detach().transpose(1, 2).contiguous())
        return self._projection_t_cache[1]

    @torch.inference_mode()
    def topk(self, hidden: torch.Tensor, lm_head: Dense, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k guesses of every head: token ids and probabilities, each `[N, K, k]`."""
        logits = self.logits(hidden, lm_head.weight_t)
        probs, idx = torch.softmax(logits.float(), dim=-1).topk(k, dim=-1)
        if self.vocab_ids is not None:
            idx = self.vocab_ids[idx]
        return idx, probs

    # -- persistence -----------------------------------------------------------------------------------
    @torch.no_grad()
    def round_to_storage(self, block_dtype: torch.dtype = torch.float32, int8_projection: bool = False) -> None:
        """Round the weights in place to what `save` will store, so that an evaluation before saving
        measures the heads users will load."""
        for p in (self.block_weight, self.block_bias):
            p.copy_(p.to(block_dtype).float())
        if self.projection is not None:
            if int8_projection:
                q, scale = quantize_rows_int8(self.projection)
                self.projection.copy_(q.float() * scale)
            else:
                self.projection.copy_(self.projection.to(torch.float16).float())

    def save(self, directory: str | os.PathLike, block_dtype: torch.dtype = torch.float32,
             int8_projection: bool = False) -> Path:
        """`block_dtype=torch.float16` halves the blocks; `int8_projection` halves the projection again
        (one scale per row), which buys twice the vocabulary subset in the same file size. Loading always
        converts back to float32."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {"block_weight": self.block_weight.detach().to(block_dtype).contiguous(),
                   "block_bias": self.block_bias.detach().to(block_dtype).contiguous()}
        if self.projection is not None and int8_projection:
            tensors["projection_int8"], tensors["projection_scale"] = quantize_rows_int8(self.projection.detach())
        elif self.projection is not None:
            tensors["projection"] = self.projection.detach().to(torch.float16).contiguous()
        if self.vocab_ids is not None:
            tensors["vocab_ids"] = self.vocab_ids.to(torch.int32).contiguous()
        tmp = out / (HEADS_FILE + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, out / HEADS_FILE)
        meta = {"format": "dyntree-heads", "version": FORMAT_VERSION, **asdict(self.config)}
        (out / HEADS_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        return out


def quantize_rows_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: `weight ~= q * scale`, with `scale` shaped `[..., rows, 1]` (float32)."""
    scale = weight.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0
    q = torch.round(weight.float() / scale).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def load_heads(path: str | os.PathLike, backbone_config=None) -> MedusaHeads:
    """Load heads saved by `MedusaHeads.save`, or in FasterDecoding's Medusa v0.1 or vLLM's Medusa layout;
    check they fit the backbone."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DynTreeError(f"no heads at {path}")
    if path.is_file():
        path = path.parent
    if (path / HEADS_CONFIG).is_file():
        heads = _load_ours(path)
    else:
        from .interop import load_foreign_heads

        heads = load_foreign_heads(path, backbone_config)
    if backbone_config is not None:
        heads.config.check_fits(backbone_config)
    return heads.eval()


def _load_ours(path: Path) -> MedusaHeads:
    from safetensors.torch import load_file

    try:
        meta = json.loads((path / HEADS_CONFIG).read_text())
        if meta.get("format") != "dyntree-heads":
            raise ValueError("not a dyntree heads config")
        fields = {k: meta[k] for k in HeadsConfig.__dataclass_fields__ if k in meta}
        config = HeadsConfig(**fields)
        tensors = load_file(str(path / HEADS_FILE))
    except Exception as exc:
        raise DynTreeError(f"corrupt heads checkpoint in {path}: {exc}".splitlines()[0]) from exc
    vocab_ids = tensors.get("vocab_ids")
    heads = MedusaHeads(config, None if vocab_ids is None else vocab_ids.long())
    expected = {"block_weight": tuple(heads.block_weight.shape), "block_bias": tuple(heads.block_bias.shape)}
    if heads.projection is not None and "projection_int8" in tensors:
        q, scale = tensors["projection_int8"], tensors.get("projection_scale")
        shape = tuple(heads.projection.shape)
        if tuple(q.shape) != shape or scale is None or tuple(scale.shape) != shape[:-1] + (1,):
            raise DynTreeError(f"corrupt heads checkpoint in {path}: int8 projection is {tuple(q.shape)} with scale "
                               f"{'missing' if scale is None else tuple(scale.shape)}, expected {shape}")
        heads.projection.data.copy_(q.float() * scale.float())
    elif heads.projection is not None:
        expected["projection"] = tuple(heads.projection.shape)
    for name, shape in expected.items():
        if name not in tensors or tuple(tensors[name].shape) != shape:
            got = tuple(tensors[name].shape) if name in tensors else "missing"
            raise DynTreeError(f"corrupt heads checkpoint in {path}: {name} is {got}, expected {shape}")
        getattr(heads, name).data.copy_(tensors[name].float())
    return heads


def save_medusa(heads: MedusaHeads, directory: str | os.PathLike, base_model: str = "") -> Path:
    """Write heads with own projections as FasterDecoding's Medusa v0.1 `medusa_lm_head.pt` (the file its
    loader reads); `dyntree.interop` writes the other layouts."""
    if heads.projection is None:
        raise DynTreeError("Medusa v0.1 format needs heads with an own projection (or the backbone's lm_head: "
                           "see dyntree.interop)")
    from .interop import save_fasterdecoding_medusa

    return save_fasterdecoding_medusa(heads, directory, base_model=base_model, safetensors=False, torch_file=True)
