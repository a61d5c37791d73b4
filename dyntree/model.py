"""A compact Llama-family backbone (Llama, Mistral, Qwen2, SmolLM) with a preallocated, batched KV cache.

Why our own forward instead of transformers' module: tree decoding writes a *tree* of tokens into the cache,
attends with an arbitrary mask, then keeps only the accepted path; ProPD runs only a sub-range of layers
before pruning. Both are a few lines here and awkward through the generic `Cache` API. The maths is the same
as transformers' `LlamaForCausalLM` (tests compare logits on the same weights).

Layout: `embed` -> `run_layers(start, end)` -> `final_norm` -> `logits`; each is usable on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .errors import DynTreeError
from .kernels import ATTENTION_BLOCK, AttentionPlan, Dense, padded_key_count

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass
class ModelConfig:
    """The shape facts of a backbone, read from a Hugging Face `config.json`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    eos_token_ids: tuple[int, ...] = ()
    inv_freq: torch.Tensor | None = field(default=None, repr=False)
    rope_attention_scaling: float = 1.0

    @classmethod
    def from_hf(cls, hf_config) -> "ModelConfig":
        model_type = getattr(hf_config, "model_type", None)
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise DynTreeError(
                f"unsupported architecture {model_type!r}: dyntree supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        num_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        inv_freq, scaling = _rope_inv_freq(hf_config, head_dim)
        eos = hf_config.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        return cls(
            model_type=model_type,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf_config.rms_norm_eps,
            max_position_embeddings=hf_config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama/Mistral only when `attention_bias` says so.
            attention_bias=model_type == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
            # (the forward takes whichever biases the checkpoint holds; this flag is informational)
            eos_token_ids=eos_ids,
            inv_freq=inv_freq,
            rope_attention_scaling=scaling,
        )

    def fingerprint(self) -> dict:
        """What heads must match to be used on this backbone."""
        return {"model_type": self.model_type, "hidden_size": self.hidden_size, "vocab_size": self.vocab_size}


def _rope_inv_freq(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse RoPE frequencies, with any scaling the config declares (delegated to transformers)."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        return inv.float(), 1.0
    if rope_type == "dynamic":
        raise DynTreeError("dynamic NTK RoPE scaling is not supported (it changes with sequence length)")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise DynTreeError(f"unsupported RoPE scaling {rope_type!r}")
    inv, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    return inv.float(), float(scaling)


class KVCache:
    """Keys/values for every layer, `[layers, batch, kv_heads, max_len, head_dim]`, plus per-sequence lengths.

    Slots `[0, lengths[b])` of sequence b hold committed tokens. A step writes its new tokens at any slots
    at or after that (tree steps use `lengths[b] + node_index`), and `commit` moves the accepted ones into
    place. Allocated at its full size: a cache never grows (the serving engine, when it needs more room,
    allocates a larger one and copies its rows over). `rows` gives part of the batch as a cache of its own.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor):
        """A cache over existing tensors (no allocation, no copy): `zeros` makes a new one, `rows` a view of
        part of one."""
        self.keys, self.values, self.lengths = keys, values, lengths

    @classmethod
    def zeros(cls, config: ModelConfig, batch_size: int, max_len: int, device=None,
              dtype=torch.float32) -> "KVCache":
        """An empty cache of `batch_size` rows of `max_len` slots."""
        shape = (config.num_layers, batch_size, config.num_kv_heads, max_len, config.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                   torch.zeros(batch_size, dtype=torch.long, device=device))

    def rows(self, start: int, count: int = 1, fresh: bool = False) -> "KVCache":
        """Rows `[start, start + count)` as a cache of their own, for a step or a prefill on part of the batch:
        its keys, values and lengths are views, so what a forward writes and commits lands here. `fresh`: the
        rows are about to be filled from scratch (a prefill), so the view's lengths start at 0 and are its
        own; the caller sets this cache's lengths once the prefill is in."""
        lengths = self.lengths[start : start + count]
        if fresh:
            lengths = torch.zeros_like(lengths)
        return KVCache(self.keys[:, start : start + count], self.values[:, start : start + count], lengths)

    def select(self, rows: torch.Tensor) -> "KVCache":
        """A copy of the rows at indices `rows` (in that order) as a cache of their own."""
        return KVCache(self.keys.index_select(1, rows), self.values.index_select(1, rows),
                       self.lengths.index_select(0, rows))

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def commit(self, batch_index: int, src_slots: torch.Tensor) -> None:
        """Append the tokens held at `src_slots` (in order) to sequence `batch_index`'s committed prefix."""
        start = int(self.lengths[batch_index])
        count = src_slots.numel()
        if count == 0:
            return
        dst = slice(start, start + count)
        # Skip the copy when the accepted tokens already sit in place (always true for a linear chain).
        if int(src_slots[0]) != start or int(src_slots[-1]) != start + count - 1 or count != (
            int(src_slots[-1]) - int(src_slots[0]) + 1
        ):
            self.keys[:, batch_index, :, dst] = self.keys[:, batch_index, :, src_slots]
            self.values[:, batch_index, :, dst] = self.values[:, batch_index, :, src_slots]
        self.lengths[batch_index] += count


def attention_mask(lengths: torch.Tensor, slots: torch.Tensor, block_mask: torch.Tensor) -> torch.Tensor:
    """Boolean mask `[B, 1, n, T]` for n new tokens written at `slots` `[B, n]`.

    A new token sees every committed slot of its sequence (`< lengths[b]`) and those new tokens that
    `block_mask[b, i, j]` allows (`[B, n, n]`: causal for a prefill, ancestor-or-self for a tree). T covers the
    highest slot, rounded up to whole attention blocks.
    """
    batch, n = slots.shape
    total = padded_key_count(int(slots.max()) + 1)
    key_slots = torch.arange(total, device=slots.device)
    mask = (key_slots[None, None, :] < lengths[:, None, None]).expand(batch, n, total).clone()
    # Scatter each new token's visibility onto the slots where those tokens live.
    index = slots[:, None, :].expand(batch, n, n)
    mask.scatter_(2, index, block_mask)
    return mask[:, None]


def causal_block(batch: int, n: int, device=None) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool, device=device).tril().expand(batch, n, n)


class _Layer:
    __slots__ = ("attn_norm", "qkv", "o", "mlp_norm", "gate_up", "down")


class Transformer:
    """Weights and the forward pass of a Llama-family decoder (no autograd; inference only)."""

    def __init__(self, config: ModelConfig, state_dict: dict[str, torch.Tensor] | None, device=None,
                 dtype=torch.float32, quantized=None):
        """Float weights from `state_dict` (Hugging Face names) in `dtype`; or, with `quantized` (a
        `quantized.QuantizedParts`), weights kept in quantized blocks and layers run by the native kernels."""
        self.config = config
        self.device = torch.device(device or "cpu")
        self.dtype = dtype
        self.quant = None  # the native layer stack, when the weights are quantized blocks
        self.weights = str(dtype).removeprefix("torch.")
        if quantized is not None:
            self._init_quantized(quantized)
            return
        sd = {k.removeprefix("model."): v for k, v in state_dict.items()}

        def take(name: str) -> torch.Tensor:
            if name not in sd:
                raise DynTreeError(f"checkpoint is missing tensor {name!r}")
            return sd[name].to(device=self.device, dtype=dtype)

        self.embed_tokens = take("embed_tokens.weight")
        if self.embed_tokens.shape != (config.vocab_size, config.hidden_size):
            raise DynTreeError(
                f"embedding shape {tuple(self.embed_tokens.shape)} does not match the config "
                f"({config.vocab_size}, {config.hidden_size})"
            )
        def maybe(name: str) -> torch.Tensor | None:
            return take(name) if name in sd else None

        def dense(*names: str) -> Dense:
            # Biases are taken whenever the checkpoint has them (Qwen2 q/k/v; Llama `attention_bias`/`mlp_bias`).
            weight = torch.cat([take(n + ".weight") for n in names])
            biases = [maybe(n + ".bias") for n in names]
            if all(b is None for b in biases):
                return Dense(weight)
            if any(b is None for b in biases):
                raise DynTreeError(f"checkpoint has biases for only some of {', '.join(names)}")
            return Dense(weight, torch.cat(biases))

        self.layers: list[_Layer] = []
        for i in range(config.num_layers):
            p = f"layers.{i}."
            layer = _Layer()
            layer.attn_norm = take(p + "input_layernorm.weight")
            layer.qkv = dense(*(p + f"self_attn.{n}_proj" for n in "qkv"))  # one matmul instead of three
            layer.o = dense(p + "self_attn.o_proj")
            layer.mlp_norm = take(p + "post_attention_layernorm.weight")
            layer.gate_up = dense(p + "mlp.gate_proj", p + "mlp.up_proj")
            layer.down = dense(p + "mlp.down_proj")
            self.layers.append(layer)
        self.norm = take("norm.weight")
        if config.tie_word_embeddings or "lm_head.weight" not in state_dict:
            head = self.embed_tokens
        else:
            head = state_dict["lm_head.weight"].to(device=self.device, dtype=dtype)
        self.lm_head = Dense(head)
        self._init_rope()

    def _init_quantized(self, parts) -> None:
        if self.dtype != torch.float32 or self.device.type != "cpu":
            raise DynTreeError("quantized weights run in fp32 on the CPU")
        self.weights = parts.weights
        self.embed_tokens, self.norm, self.lm_head = parts.embed_tokens, parts.norm, parts.lm_head
        self.layers = []  # the stack holds them
        self._init_rope()
        self.quant = parts.stack(self.rope_cos, self.rope_sin)

    def _init_rope(self) -> None:
        config = self.config
        # Tables computed in fp32 and stored in the model's dtype, as transformers does.
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(positions, config.inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        scale = config.rope_attention_scaling
        self.rope_cos = (emb.cos() * scale).to(device=self.device, dtype=self.dtype)
        self.rope_sin = (emb.sin() * scale).to(device=self.device, dtype=self.dtype)

    # -- pieces of the forward -------------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """A cache for `max_len` tokens (at most the context window), rounded up to whole attention blocks:
        `attend` reads whole blocks, and the slots past the last token are read masked."""
        max_len = min(max_len, self.config.max_position_embeddings)
        return KVCache.zeros(self.config, batch_size, padded_key_count(max_len), device=self.device,
                             dtype=self.dtype)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.embed_tokens)

    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(hidden, (self.config.hidden_size,), self.norm, self.config.rms_norm_eps)

    def logits(self, normed_hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits whatever the model's dtype: sampling and verification compare them in fp32."""
        return self.lm_head(normed_hidden).float()

    def run_layers(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        slots: torch.Tensor,
        mask: torch.Tensor,
        start: int = 0,
        end: int | None = None,
    ) -> torch.Tensor:
        """Run layers `[start, end)` on `hidden` `[B, n, H]` whose tokens sit at absolute `positions` `[B, n]`.

        Each layer writes the tokens' keys/values at `slots` `[B, n]` of the cache and attends with `mask`
        (`[B, 1, n, T]`, see `attention_mask`). Later layers may be run on a subset of the tokens (ProPD) as
        long as their slots and mask rows are subset the same way.
        """
        end = self.config.num_layers if end is None else end
        if self.quant is not None:
            return self.quant.run(hidden, positions, cache.keys, cache.values, slots, mask, start, end)
        cfg = self.config
        batch, n, _ = hidden.shape
        nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        total = mask.shape[-1]
        moved = positions[positions != slots]  # tree nodes whose slot is not their position (off a chain)
        split = (int(moved.min()) if moved.numel() else total) // ATTENTION_BLOCK * ATTENTION_BLOCK
        cos = self.rope_cos[positions][:, :, None]  # [B, n, 1, hd]: broadcast over q and k heads at once
        sin = self.rope_sin[positions][:, :, None]
        contiguous = batch == 1 and n > 0 and int(slots[0, -1] - slots[0, 0]) == n - 1
        first_slot = int(slots[0, 0]) if contiguous else 0
        rows = torch.arange(batch, device=slots.device)[:, None]
        plan = AttentionPlan(mask, self._key_positions(cache, slots, positions, total), split, nh, nkv, hd)
        plan.prepare(batch, nh, n, hd, total, hidden.dtype, hidden.device)  # scratch shared by the layers
        padded = total > cache.max_len  # a cache not made by `new_cache` may end inside a block
        keys, values = (cache.keys, cache.values) if padded else (cache.keys[:, :, :, :total],
                                                                  cache.values[:, :, :, :total])
        if contiguous:  # where this step's keys and values go, per layer
            key_writes = cache.keys[:, :, :, first_slot : first_slot + n]
            value_writes = cache.values[:, :, :, first_slot : first_slot + n]
        for li in range(start, end):
            layer = self.layers[li]
            x = F.rms_norm(hidden, (cfg.hidden_size,), layer.attn_norm, cfg.rms_norm_eps)
            qkv = layer.qkv(x).view(batch, n, nh + 2 * nkv, hd)
            qk = _rope(qkv[:, :, : nh + nkv], cos, sin)  # q and k heads in one rotation
            q = qk[:, :, :nh].transpose(1, 2)
            k, v = qk[:, :, nh:], qkv[:, :, nh + nkv :]
            layer_keys, layer_values = keys[li], values[li]
            if contiguous:
                key_writes[li].copy_(k.transpose(1, 2))
                value_writes[li].copy_(v.transpose(1, 2))
            else:  # one scatter for the whole batch: [B, n] slots, one row index per sequence
                layer_keys[rows, :, slots] = k
                layer_values[rows, :, slots] = v
            if padded:
                layer_keys = F.pad(layer_keys, (0, 0, 0, total - cache.max_len))
                layer_values = F.pad(layer_values, (0, 0, 0, total - cache.max_len))
            attn = plan.run(q, layer_keys, layer_values)
            hidden = hidden + layer.o(attn.view(batch, n, nh * hd))
            x = F.rms_norm(hidden, (cfg.hidden_size,), layer.mlp_norm, cfg.rms_norm_eps)
            gate, up = layer.gate_up(x).chunk(2, dim=-1)
            hidden = hidden + layer.down(F.silu(gate) * up)
        return hidden

    @staticmethod
    def _key_positions(cache: KVCache, slots: torch.Tensor, positions: torch.Tensor, total: int) -> torch.Tensor:
        """`[B, T]` logical position of each of the first T cache slots: committed slots their own, new tokens
        their `positions`, slots no one sees 0 (their weights are zero anyway)."""
        slot_ids = torch.arange(total, device=slots.device)
        key_positions = torch.where(slot_ids[None] < cache.lengths[:, None], slot_ids[None], 0)
        return key_positions.scatter(1, slots, positions)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache,
        block_mask: torch.Tensor | None = None,
        depths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Normed last hidden states `[B, n, H]` for `input_ids` `[B, n]` appended after each sequence's cache.

        Without `block_mask` the new tokens are a causal run (prefill, plain decoding); with it they are a tree
        whose node i sits at depth `depths[b, i]`. Nothing is committed: call `cache.commit` (or bump
        `cache.lengths` for a prefill) afterwards.
        """
        batch, n = input_ids.shape
        offsets = torch.arange(n, device=input_ids.device)
        slots = cache.lengths[:, None] + offsets[None, :]
        if block_mask is None:
            block_mask = causal_block(batch, n, device=input_ids.device)
            positions = slots
        else:
            positions = cache.lengths[:, None] + depths
        if int(slots.max()) >= min(cache.max_len, self.config.max_position_embeddings):
            raise DynTreeError(f"context limit reached ({cache.max_len} tokens)")
        mask = attention_mask(cache.lengths, slots, block_mask)
        hidden = self.run_layers(self.embed(input_ids), positions, cache, slots, mask)
        return self.final_norm(hidden)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
