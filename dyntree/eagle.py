"""EAGLE-style feature drafter (arXiv 2401.15077), head_type "eagle": one small decoder layer that drafts at the
level of features instead of tokens.

Why: Medusa and Hydra heads guess from the last state alone (plus the drafted path, for Hydra); EAGLE's drafter
also reads the whole context, through its own attention over the backbone's features. At position t it reads
the backbone's feature f_t (the normed state whose lm_head guess is token t+1) and the embedding of the token
t+1 actually taken, fuses them (`[embedding; feature]`, `2H -> H`, with a bias), runs one Llama-style layer
(attention with RoPE, then RMSNorm and the MLP) and outputs a feature g_t that imitates f_{t+1}; the backbone's
own lm_head (shared, never stored) turns g_t into a guess of token t+2. The layout is EAGLE-1's, so that vLLM
and SGLang can load the drafter (`interop.save_eagle`): the one layer has no input norm (EAGLE drops it: the
fused input goes straight into attention) and no final norm. Deeper drafts feed the drafter its own output
feature and the drafted token's embedding.

State: the drafter's keys and values over the context's (feature, next token) pairs live in an `EagleState`
(per sequence, like the backbone's KV cache) that the decoding loop owns: `start` fills it after the prefill,
`advance` appends each step's accepted pairs. Heads that keep no state (Medusa, Hydra) implement these hooks as
no-ops, so callers never ask which kind of heads they hold.

Losslessness never depends on the drafter: the backbone verifies every tree as usual.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DynTreeError
from .heads_config import FORMAT_VERSION, HEADS_CONFIG, HEADS_FILE, HeadsConfig
from .trees.conditional import ExpandedChildren, select_by_depth

# The layer's shape, stored in heads.json under "drafter".
LAYER_FIELDS = ("num_attention_heads", "num_kv_heads", "head_dim", "intermediate_size", "rms_norm_eps",
                "rope_theta")


def layer_shape_for(backbone_config, rope_theta: float = 10000.0) -> dict:
    """The drafter layer's shape for a backbone: the backbone's own layer shape (EAGLE's choice)."""
    return {"num_attention_heads": backbone_config.num_heads, "num_kv_heads": backbone_config.num_kv_heads,
            "head_dim": backbone_config.head_dim, "intermediate_size": backbone_config.intermediate_size,
            "rms_norm_eps": backbone_config.rms_norm_eps, "rope_theta": rope_theta}


class EagleState:
    """The drafter's per-sequence cache: keys/values `[B, kv_heads, max_len, head_dim]` of the pairs held,
    `lengths` `[B]` (pairs held = the backbone's committed tokens) and `last` `[B, H]`, the output feature of
    each row's newest pair (the one whose next token is the root): its lm_head guess is depth 1 of a tree."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, last: torch.Tensor):
        self.keys, self.values, self.lengths, self.last = keys, values, lengths, last

    @classmethod
    def zeros(cls, heads: "EagleHeads", batch_size: int, max_len: int, device=None) -> "EagleState":
        shape = (batch_size, heads.num_kv_heads, max_len, heads.head_dim)
        dtype = heads.fuse_weight.dtype
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                   torch.zeros(batch_size, dtype=torch.long, device=device),
                   torch.zeros(batch_size, heads.config.hidden_size, device=device, dtype=dtype))

    @property
    def max_len(self) -> int:
        return self.keys.shape[2]

    def rows(self, start: int, count: int = 1) -> "EagleState":
        """Rows `[start, start + count)` as views: what a draft or an advance writes lands here."""
        end = start + count
        return EagleState(self.keys[start:end], self.values[start:end], self.lengths[start:end], self.last[start:end])

    def select(self, rows: list[int]) -> "EagleState":
        """A copy of rows `rows` (in that order), for drafting a group of them; appends to it are lost."""
        index = torch.tensor(rows, dtype=torch.long, device=self.lengths.device)
        return EagleState(self.keys[index], self.values[index], self.lengths[index], self.last[index])

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src` into row `dst` (the engine's compaction)."""
        n = int(self.lengths[src])
        self.keys[dst, :, :n] = self.keys[src, :, :n]
        self.values[dst, :, :n] = self.values[src, :, :n]
        self.lengths[dst] = n
        self.last[dst] = self.last[src]

    def grown(self, max_len: int) -> "EagleState":
        """A copy with room for `max_len` pairs per row."""
        if max_len <= self.max_len:
            return self
        b, kvh, old, hd = self.keys.shape
        keys = self.keys.new_zeros(b, kvh, max_len, hd)
        values = self.values.new_zeros(b, kvh, max_len, hd)
        keys[:, :, :old], values[:, :, :old] = self.keys, self.values
        return EagleState(keys, values, self.lengths.clone(), self.last.clone())


class EagleHeads(nn.Module):
    """The drafter's weights and its three uses: teacher-forced over whole sequences (training, brute force),
    appending committed pairs to an `EagleState`, and drafting tree nodes depth by depth (`EagleDraft`).

    `config.num_heads` is the draft depth (how many tokens past the root a tree may reach); `config.num_layers`
    is 1 (one decoder layer); `config.drafter` holds the layer's shape (`LAYER_FIELDS`).
    """

    conditional = True  # a node's guess depends on its path: trees are built depth by depth
    projection = None  # the backbone's lm_head is the projection, always

    def __init__(self, config, vocab_ids: torch.Tensor | None = None):
        super().__init__()
        shape = config.drafter or {}
        missing = [f for f in LAYER_FIELDS if f not in shape]
        if missing:
            raise DynTreeError(f"eagle heads config lacks the drafter layer's {', '.join(missing)}")
        if config.num_layers != 1 or config.num_heads < 1:
            raise DynTreeError("eagle heads are one decoder layer (num_layers 1) drafting at least one depth")
        if vocab_ids is not None:
            vocab_ids = vocab_ids.to(torch.long)
            if vocab_ids.numel() == 0 or int(vocab_ids.min()) < 0 or int(vocab_ids.max()) >= config.vocab_size:
                raise DynTreeError("eagle heads: vocabulary subset ids outside the vocabulary")
        config.head_type, config.shared_projection = "eagle", True
        config.vocab_subset = None if vocab_ids is None else int(vocab_ids.numel())
        self.config = config
        h = config.hidden_size
        self.num_attention_heads = int(shape["num_attention_heads"])
        self.num_kv_heads = int(shape["num_kv_heads"])
        self.head_dim = int(shape["head_dim"])
        inter = int(shape["intermediate_size"])
        self.eps = float(shape["rms_norm_eps"])
        if self.num_attention_heads % self.num_kv_heads:
            raise DynTreeError("eagle heads: attention heads must be a multiple of key/value heads")
        nh, nkv, hd = self.num_attention_heads, self.num_kv_heads, self.head_dim
        self.fuse_weight = nn.Parameter(torch.zeros(h, 2 * h))  # [token embedding; feature] -> H
        self.fuse_bias = nn.Parameter(torch.zeros(h))
        self.q_weight = nn.Parameter(torch.zeros(nh * hd, h))
        self.k_weight = nn.Parameter(torch.zeros(nkv * hd, h))
        self.v_weight = nn.Parameter(torch.zeros(nkv * hd, h))
        self.o_weight = nn.Parameter(torch.zeros(h, nh * hd))
        self.mlp_norm = nn.Parameter(torch.ones(h))
        self.gate_weight = nn.Parameter(torch.zeros(inter, h))
        self.up_weight = nn.Parameter(torch.zeros(inter, h))
        self.down_weight = nn.Parameter(torch.zeros(h, inter))
        theta = float(shape["rope_theta"])
        inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        # The lm_head rows drafts may guess (the most frequent tokens of the training answers), or None for all:
        # on a CPU the projection is most of a draft's cost, and each depth of a tree pays it.
        self.register_buffer("vocab_ids", vocab_ids, persistent=False)
        local = None  # token id -> index in the drafter's vocabulary, -1 outside it (training's targets)
        if vocab_ids is not None:
            local = torch.full((config.vocab_size,), -1, dtype=torch.long)
            local[vocab_ids] = torch.arange(vocab_ids.numel())
        self.register_buffer("_local_index", local, persistent=False)
        self._shared_cache: tuple[tuple, torch.Tensor] | None = None
        self._native_cache: tuple[tuple, dict] | None = None

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    # -- construction ----------------------------------------------------------------------------------
    @classmethod
    def for_backbone(cls, backbone_config, depth: int = 4) -> "EagleHeads":
        """An untrained drafter shaped after the backbone's layers."""
        config = HeadsConfig(depth, 1, backbone_config.hidden_size, backbone_config.vocab_size,
                             shared_projection=True, model_type=backbone_config.model_type, head_type="eagle",
                             drafter=layer_shape_for(backbone_config))
        return cls(config)

    @torch.no_grad()
    def init_weights(self, seed: int = 0, scale: float = 0.02) -> "EagleHeads":
        """Training's start: the fusion passes the feature through (so the untrained drafter guesses what the
        lm_head guesses from f_t), the layer's matrices small and random, the norms one."""
        gen = torch.Generator().manual_seed(seed)
        h = self.config.hidden_size
        for p in self.matrices():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
        self.fuse_weight[:, h:] += torch.eye(h)
        self.fuse_bias.zero_()
        return self

    @classmethod
    def random(cls, backbone_config, num_heads: int = 4, num_layers: int = 1, seed: int = 0, scale: float = 0.05):
        """Untrained random drafter: useful to test losslessness, useless for speed."""
        heads = cls.for_backbone(backbone_config, num_heads)
        heads.init_weights(seed, scale)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(seed + 1)
            for p in (heads.fuse_bias, heads.mlp_norm):
                p.add_(torch.randn(p.shape, generator=gen) * scale)
        return heads

    def matrices(self) -> list[nn.Parameter]:
        return [self.fuse_weight, self.q_weight, self.k_weight, self.v_weight, self.o_weight, self.gate_weight,
                self.up_weight, self.down_weight]

    def init_projection_from(self, lm_head_weight: torch.Tensor) -> None:
        """Nothing: the projection is the backbone's lm_head."""

    def prepare_for(self, backbone) -> None:
        """What drafting on `backbone` builds on first use (Q8_0 copies on a quantized backbone, else the fp32
        projection), made at load rather than in the first timed pass."""
        if self._native_lib(backbone) is not None:
            self._native(backbone)
        else:
            self._lm_head_t(backbone.lm_head.weight_t)

    @staticmethod
    def _native_lib(backbone):
        return getattr(backbone.lm_head, "lib", None)

    def _native(self, backbone) -> dict:
        """The layer's products and the projection as Q8_0 `NativeDense` for a quantized backbone (inference
        only: drafts may round, verification decides what is kept). Made again when a parameter changes."""
        from .quantized import q8_dense

        lib = self._native_lib(backbone)
        key = (id(lib), *((p.data_ptr(), p._version) for p in self.parameters()))
        if self._native_cache is None or self._native_cache[0] != key:
            rows = backbone.lm_head.weight if self.vocab_ids is None else backbone.lm_head.weight[self.vocab_ids]
            def q8(*weights, bias=None):
                return q8_dense(torch.cat(weights).detach().float().contiguous(), bias, lib)

            with torch.no_grad():
                ops = {"fuse": q8(self.fuse_weight, bias=self.fuse_bias.detach()),
                       "qkv": q8(self.q_weight, self.k_weight, self.v_weight), "o": q8(self.o_weight),
                       "gate_up": q8(self.gate_weight, self.up_weight), "down": q8(self.down_weight),
                       "projection": backbone.lm_head if self.vocab_ids is None else q8(rows)}
            self._native_cache = (key, ops)
        return self._native_cache[1]

    # -- the layer -------------------------------------------------------------------------------------
    def fuse(self, features: torch.Tensor, next_ids: torch.Tensor, embed: torch.Tensor, ops: dict | None = None
             ) -> torch.Tensor:
        """`[..., H]` features and `[...]` ids of the tokens after them -> the layer's input `[..., H]`
        (`ops`: the Q8_0 products of `_native`, else the fp32 parameters)."""
        dtype = self.fuse_weight.dtype
        pair = torch.cat([F.embedding(next_ids, embed).to(dtype), features.to(dtype)], dim=-1)
        if ops is not None:
            return ops["fuse"](pair)
        return F.linear(pair, self.fuse_weight, self.fuse_bias)

    def layer(self, x: torch.Tensor, positions: torch.Tensor, past_keys: torch.Tensor | None = None,
              past_values: torch.Tensor | None = None, past_visible: torch.Tensor | None = None,
              ops: dict | None = None, new_visible: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The decoder layer on `x` `[N, n, H]` at `positions` `[N, n]`, the n new pairs causal among
        themselves and seeing the `past_visible` `[N, P]` slots of `past_keys`/`past_values`
        `[N, kv_heads, P, head_dim]`. Returns the output features `[N, n, H]` and the new pairs' (rotated)
        keys and values `[N, kv_heads, n, head_dim]`."""
        batch, n, h = x.shape
        nh, nkv, hd = self.num_attention_heads, self.num_kv_heads, self.head_dim
        # No input norm: EAGLE's first layer feeds the fused pair straight into attention.
        if ops is not None:
            q, k, v = ops["qkv"](x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        else:
            q, k, v = F.linear(x, self.q_weight), F.linear(x, self.k_weight), F.linear(x, self.v_weight)
        q = q.reshape(batch, n, nh, hd).transpose(1, 2)
        k = k.reshape(batch, n, nkv, hd).transpose(1, 2)
        v = v.reshape(batch, n, nkv, hd).transpose(1, 2)
        angles = positions.to(self.inv_freq.dtype)[..., None] * self.inv_freq  # [N, n, hd/2]
        angles = torch.cat([angles, angles], dim=-1)[:, None]  # [N, 1, n, hd]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if new_visible is None:  # the new pairs see each other causally
            new_visible = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        visible = new_visible.expand(batch, n, n)
        keys, values = k, v
        if past_keys is not None:
            keys = torch.cat([past_keys, k], dim=2)
            values = torch.cat([past_values, v], dim=2)
            if past_visible.dim() == 2:  # the same past slots for every new pair
                past_visible = past_visible[:, None, :]
            visible = torch.cat([past_visible.expand(batch, n, past_visible.shape[-1]), visible], dim=2)
        # Grouped-query attention without copying each key/value head for its query heads.
        attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible[:, None], enable_gqa=nh != nkv)
        attn = attn.transpose(1, 2).reshape(batch, n, nh * hd)
        if ops is not None:
            x = x + ops["o"](attn)
            gate, up = ops["gate_up"](F.rms_norm(x, (h,), self.mlp_norm, self.eps)).chunk(2, dim=-1)
            return x + ops["down"](F.silu(gate) * up), k, v
        x = x + F.linear(attn, self.o_weight)
        normed = F.rms_norm(x, (h,), self.mlp_norm, self.eps)
        x = x + F.linear(F.silu(F.linear(normed, self.gate_weight)) * F.linear(normed, self.up_weight),
                         self.down_weight)
        return x, k, v

    def sequence_features(self, features: torch.Tensor, next_ids: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
        """Teacher-forced over whole sequences: `features` `[B, T, H]` (f_t) and `next_ids` `[B, T]`
        (token t+1) -> output features `[B, T, H]` (g_t, imitating f_{t+1}). Right padding changes nothing
        before it (causal attention)."""
        batch, length = next_ids.shape
        positions = torch.arange(length, device=next_ids.device)[None].expand(batch, length)
        return self.layer(self.fuse(features, next_ids, embed), positions)[0]

    def unrolled_features(self, features: torch.Tensor, next_ids: torch.Tensor, embed: torch.Tensor,
                          steps: int) -> list[torch.Tensor]:
        """Teacher-forced drafting `steps` deep at once (EAGLE-3's "training-time test"): step 1 is
        `sequence_features`; at step k >= 2 the pair at position t is (step k-1's output at t-1, token t+1),
        and it sees what a depth-k draft node sees while decoding: the true pairs before t-k+2, then the chain
        of steps 2..k at positions t-k+2..t. Every step's output at t imitates f_{t+1} (its lm_head guess: token
        t+2). Returns the outputs `[B, T, H]` of each step (positions t < k-1 of step k have no chain: junk)."""
        batch, length = next_ids.shape
        device = next_ids.device
        positions = torch.arange(length, device=device)[None].expand(batch, length)
        out, k, v = self.layer(self.fuse(features, next_ids, embed), positions)
        outs, keys, values = [out], [k], [v]
        t = torch.arange(length, device=device)
        for step in range(2, steps + 1):
            previous = torch.cat([outs[-1][:, :1] * 0, outs[-1][:, :-1]], dim=1)  # the last step's output at t-1
            x = self.fuse(previous, next_ids, embed)
            # keys: the true pairs (step 1), then steps 2..step-1, each over all T positions
            seen = [t[None] <= (t[:, None] - step + 1)]  # true pairs p <= t - step + 1
            seen += [t[None] == (t[:, None] - (step - s)) for s in range(2, step)]  # chain node of step s
            out, k, v = self.layer(x, positions, torch.cat(keys, 2), torch.cat(values, 2),
                                   torch.cat(seen, 1)[None], new_visible=torch.eye(length, dtype=torch.bool,
                                                                                    device=device))
            outs.append(out)
            keys.append(k)
            values.append(v)
        return outs

    def feature_logits(self, features: torch.Tensor, lm_head_weight_t: torch.Tensor) -> torch.Tensor:
        """The backbone's lm_head on drafted features: `[..., H]` -> `[..., V']` over the drafter's vocabulary
        (all of it, or `vocab_ids`), in the drafter's dtype."""
        return features @ self._lm_head_t(lm_head_weight_t)

    def projection_rows(self, lm_head_weight_t: torch.Tensor) -> torch.Tensor:
        """The lm_head `[H, V']` over the drafter's vocabulary (what training multiplies by)."""
        return self._lm_head_t(lm_head_weight_t)

    def local_ids(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> their index in the drafter's vocabulary (-1 outside it); the identity without a subset."""
        if self.vocab_ids is None:
            return token_ids
        return self._local_index.to(token_ids.device)[token_ids]

    def draft_logits(self, features: torch.Tensor, backbone, ops: dict | None = None) -> torch.Tensor:
        """`feature_logits` as drafting computes them: through the Q8_0 projection of `ops` when given."""
        if ops is not None:
            return ops["projection"](features)
        return self.feature_logits(features, backbone.lm_head.weight_t)

    def _lm_head_t(self, lm_head_weight_t: torch.Tensor) -> torch.Tensor:
        """The lm_head `[H, V']` in the drafter's dtype, restricted to `vocab_ids` (a copy made once; keyed by
        the weight's storage, as callers may pass a fresh view)."""
        dtype = self.fuse_weight.dtype
        if lm_head_weight_t.dtype == dtype and self.vocab_ids is None:
            return lm_head_weight_t
        key = (lm_head_weight_t.data_ptr(), lm_head_weight_t.dtype, dtype)
        if self._shared_cache is None or self._shared_cache[0] != key:
            rows = lm_head_weight_t if self.vocab_ids is None else lm_head_weight_t[:, self.vocab_ids]
            self._shared_cache = (key, rows.to(dtype).contiguous())
        return self._shared_cache[1]

    def draft_ops(self, backbone) -> dict | None:
        """The products drafting uses on `backbone`: Q8_0 copies on a quantized one (None: fp32 parameters)."""
        return self._native(backbone) if self._native_lib(backbone) is not None else None

    # -- the drafting contract ---------------------------------------------------------------------------
    def new_state(self, batch_size: int, max_len: int, device=None) -> EagleState:
        """An empty per-sequence cache for `batch_size` rows of `max_len` pairs."""
        return EagleState.zeros(self, batch_size, max_len, device)

    @torch.inference_mode()
    def start(self, state: EagleState, backbone, hidden: torch.Tensor, prompts: list[list[int]],
              roots: torch.Tensor) -> None:
        """After the prefill: the prompts' pairs (`hidden` `[B, L, H]`, right-padded, and each prompt's
        tokens after the first, then its root) fill the rows of `state` from scratch."""
        state.lengths.zero_()
        roots = roots.tolist()
        features = [hidden[b, : len(p)] for b, p in enumerate(prompts)]
        next_ids = [list(p[1:]) + [roots[b]] for b, p in enumerate(prompts)]
        self.append(state, backbone, features, next_ids)

    @torch.inference_mode()
    def advance(self, state: EagleState, backbone, features: list[torch.Tensor | None],
                next_ids: list[list[int]]) -> None:
        """After a step's commit: row b's accepted nodes' features `[a, H]` (root first) and the tokens after
        them (its new tokens, the next root last); rows with no features (inactive) are left alone."""
        self.append(state, backbone, features, next_ids)

    def append(self, state: EagleState, backbone, features: list[torch.Tensor | None],
               next_ids: list[list[int]]) -> None:
        """Run the drafter on new pairs of each row (after the pairs it holds) and keep their keys/values."""
        live = [b for b, f in enumerate(features) if f is not None and f.shape[0] > 0]
        if not live:
            return
        device = state.keys.device
        counts = [len(next_ids[b]) for b in live]
        if any(features[b].shape[0] != c for b, c in zip(live, counts)):
            raise ValueError("one next token per feature")
        n = max(counts)
        h = self.config.hidden_size
        x_features = torch.zeros(len(live), n, h, device=device, dtype=state.last.dtype)
        x_ids = torch.zeros(len(live), n, dtype=torch.long, device=device)
        for i, b in enumerate(live):
            x_features[i, : counts[i]] = features[b].to(device=device, dtype=state.last.dtype)
            x_ids[i, : counts[i]] = torch.tensor(next_ids[b], dtype=torch.long, device=device)
        rows = torch.tensor(live, device=device)
        held = state.lengths[rows]
        if int(held.max()) + n > state.max_len:
            raise DynTreeError(f"the drafter's cache is full ({state.max_len} pairs)")
        past = int(held.max())
        positions = held[:, None] + torch.arange(n, device=device)[None]
        ops = self.draft_ops(backbone)
        x = self.fuse(x_features, x_ids, backbone.embed_tokens, ops)
        visible = torch.arange(past, device=device)[None] < held[:, None]
        out, k, v = self.layer(x, positions, state.keys[rows, :, :past], state.values[rows, :, :past], visible, ops)
        for i, b in enumerate(live):
            start, c = int(held[i]), counts[i]
            state.keys[b, :, start : start + c] = k[i, :, :c]
            state.values[b, :, start : start + c] = v[i, :, :c]
            state.lengths[b] += c
            state.last[b] = out[i, c - 1]

    def draft(self, backbone, last_hidden: torch.Tensor, root: torch.Tensor, topk: int,
              state: EagleState | None = None) -> "EagleDraft":
        """One step's guesses, computed as the tree asks for nodes. Without `state` (a latency measurement
        has no sequence) the drafter sees only the pair (last state, root): the same work per node, less
        context."""
        if state is None:
            state = self.new_state(root.shape[0], 1, last_hidden.device)
            with torch.inference_mode():
                self.append(state, backbone, list(last_hidden[:, None]), [[r] for r in root.tolist()])
        return EagleDraft(self, backbone, state, root, topk)

    @torch.inference_mode()
    def draft_along(self, backbone, states: torch.Tensor, tokens: torch.Tensor, start: int, topk: int) -> "EagleDraft":
        """The drafts of every step of one recorded sequence (offline replay and evaluation; `MedusaHeads.
        draft_along` has the layout): the drafter runs once, teacher-forced, over all the sequence's pairs
        (state i, token i + 1); the step whose root is token j holds the first j pairs, as decoding would."""
        pairs = tokens.numel() - 1
        if states.shape[0] < pairs or start < 1:
            raise ValueError("eagle heads replay from the state of every position before the last")
        device = self.fuse_weight.device
        tokens = tokens.to(device)
        ops = self.draft_ops(backbone)  # the products decoding uses, so replay sees decoding's drafts
        x = self.fuse(states[:pairs].to(device)[None], tokens[1:][None], backbone.embed_tokens, ops)
        out, keys, values = self.layer(x, torch.arange(pairs, device=device)[None], ops=ops)
        roots = tokens[start:]
        held = torch.arange(start, start + roots.numel(), device=device)  # pairs held when token j is the root: j
        count = roots.numel()
        state = EagleState(keys.expand(count, -1, -1, -1), values.expand(count, -1, -1, -1), held, out[0, held - 1])
        return EagleDraft(self, backbone, state, roots.cpu(), topk)

    @torch.inference_mode()
    def logits_along(self, backbone, states: torch.Tensor, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """Every depth's logits `[R, K, V]` at the steps whose roots are `tokens[start:]`, each depth given the
        true tokens before its guess (the drafter's own features, as in decoding): what per-depth accuracy
        reads. Paths past the sequence's end are padded with token 0 (their targets do not exist)."""
        draft = self.draft_along(backbone, states, tokens, start, 1)
        response = tokens[start:].tolist()
        count, depth = len(response), self.num_heads
        padded = response + [0] * depth
        out = []
        for d in range(depth):
            requests = [(k, tuple(padded[k + 1 : k + 1 + d])) for k in range(count)]
            out.append(self.draft_logits(draft.features(requests), backbone, draft.ops).float())
        return torch.stack(out, 1)

    # -- persistence -----------------------------------------------------------------------------------
    def stored_tensors(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        tensors = {name: p.detach().to(dtype).contiguous() for name, p in self.named_parameters()}
        if self.vocab_ids is not None:
            tensors["vocab_ids"] = self.vocab_ids.to(torch.int32).contiguous()
        return tensors

    @torch.no_grad()
    def round_to_storage(self, block_dtype: torch.dtype = torch.float32, int8_projection: bool = False) -> None:
        for p in self.parameters():
            p.copy_(p.to(block_dtype).float())

    def save(self, directory: str | os.PathLike, block_dtype: torch.dtype = torch.float32,
             int8_projection: bool = False) -> Path:
        """heads.json (`head_type: "eagle"`, the layer's shape) + heads.safetensors; no projection is stored."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (HEADS_FILE + ".tmp")
        save_file(self.stored_tensors(block_dtype), str(tmp))
        os.replace(tmp, out / HEADS_FILE)
        meta = {"format": "dyntree-heads", "version": FORMAT_VERSION, **asdict(self.config)}
        (out / HEADS_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor], where) -> None:
        """Fill the weights from a checkpoint's tensors; a missing or misshapen one is a one-line error."""
        for name, p in self.named_parameters():
            got = tensors.get(name)
            if got is None or tuple(got.shape) != tuple(p.shape):
                shape = "missing" if got is None else tuple(got.shape)
                raise DynTreeError(f"corrupt heads checkpoint in {where}: {name} is {shape}, expected {tuple(p.shape)}")
            p.data.copy_(got.float())


class EagleDraft:
    """One step's drafts: `expand` runs the drafter once per depth for every requested node.

    A request (row, path) asks for the top children of the node reached from the row's root by `path`. The
    root's children are the lm_head guess of the row's newest pair (`state.last`); a deeper node is the pair
    (its parent's output feature, its own token) at position held + depth - 1, attending to the row's cache
    and to its drafted ancestors' keys and values, kept per node here.
    """

    ids = probs = None  # no guess exists before its path is chosen

    def __init__(self, heads: EagleHeads, backbone, state: EagleState, root: torch.Tensor, topk: int):
        self.heads, self.backbone, self.state, self.topk = heads, backbone, state, topk
        self.roots = root.tolist()
        # (row, path) -> (output feature [H], key [kv_heads, hd], value [kv_heads, hd]) of drafted nodes
        self._nodes: dict[tuple[int, tuple[int, ...]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._children = ExpandedChildren()  # node -> (rank, prob), for `rank_of`
        self.ops = heads.draft_ops(backbone)

    def features(self, requests: list[tuple[int, tuple[int, ...]]]) -> torch.Tensor:
        """The output features `[N, H]` of the requested nodes (computed, and kept, for depth >= 1)."""
        depth = len(requests[0][1])
        if any(len(path) != depth for _, path in requests):
            raise ValueError("one expand call serves one depth")
        state = self.state
        device = state.last.device
        rows = torch.tensor([b for b, _ in requests], device=device)
        if depth == 0:
            return state.last[rows]
        heads = self.heads
        parents = torch.stack([self._feature(b, path[:-1]) for b, path in requests])
        tokens = torch.tensor([path[-1] for _, path in requests], device=device)
        held = state.lengths[rows]
        past = int(held.max())
        keys, values, visible = state.keys[rows, :, :past], state.values[rows, :, :past], (
            torch.arange(past, device=device)[None] < held[:, None])
        if depth > 1:  # the drafted ancestors below the root, shallowest first
            ancestors = [[self._nodes[(b, path[:j])] for j in range(1, depth)] for b, path in requests]
            keys = torch.cat([keys, torch.stack([torch.stack([a[1] for a in chain], 1) for chain in ancestors])], 2)
            values = torch.cat([values, torch.stack([torch.stack([a[2] for a in chain], 1) for chain in ancestors])], 2)
            visible = torch.cat([visible, visible.new_ones(len(requests), depth - 1)], 1)
        x = heads.fuse(parents, tokens, self.backbone.embed_tokens, self.ops)[:, None]
        positions = (held + depth - 1)[:, None]
        out, k, v = heads.layer(x, positions, keys, values, visible, self.ops)
        for i, (b, path) in enumerate(requests):
            self._nodes[(b, path)] = (out[i, 0], k[i, :, 0], v[i, :, 0])
        return out[:, 0]

    def _feature(self, row: int, path: tuple[int, ...]) -> torch.Tensor:
        return self.state.last[row] if not path else self._nodes[(row, path)][0]

    def expand(self, requests: list[tuple[int, tuple[int, ...]]]) -> list[list[tuple[int, float]]]:
        with torch.inference_mode():
            logits = self.heads.draft_logits(self.features(requests), self.backbone, self.ops)
            probs, ids = torch.softmax(logits.float(), dim=-1).topk(self.topk, dim=-1)
            if self.heads.vocab_ids is not None:
                ids = self.heads.vocab_ids[ids]
        return self._children.record(requests, ids.tolist(), probs.tolist())

    def rank_of(self, row: int, path: tuple[int, ...]) -> tuple[int, float]:
        """A proposed node's rank among its parent's guesses and its conditional probability."""
        return self._children.rank_of(row, path)

    def rows(self, start: int, stop: int) -> "EagleDraft":
        return EagleDraft(self.heads, self.backbone, self.state.rows(start, stop - start),
                          torch.tensor(self.roots[start:stop]), self.topk)

    def grow(self, size: int) -> None:
        """The drafter's work of a `size`-node tree, depth by depth (what latency measurements time)."""
        self.topk = min(self.topk, max(size - 1, 1))
        select_by_depth(self.expand, len(self.roots), size - 1, self.heads.num_heads)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin
