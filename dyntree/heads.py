"""Medusa heads: K small residual MLPs on the backbone's last (normed) hidden state.

Head k (0-based) guesses the token k+2 positions after the hidden state's own position (the backbone's
lm_head guesses k=+1). Each head is L blocks `x + SiLU(W x + b)` and a vocabulary projection, which is either
its own matrix or the backbone's lm_head ("shared"), optionally restricted to a subset of the vocabulary
(`vocab_ids`): on a CPU the projection dominates the heads' cost, and a 8k-token subset is ~7x cheaper than
49k while the heads are rarely right about rare tokens anyway. Losslessness never depends on the heads.

Hydra heads (`HydraHeads`, head_type "hydra", arXiv 2402.05109) also read the embeddings of the tokens on the
drafted path: head k sees the hidden state and the k+1 tokens from the root down to the node it extends, so a
deep node's probability is conditional on its own path instead of a product of independent marginals. Trees
are then built depth by depth (`trees.conditional`), one batched head evaluation per depth.

On disk: ours is `heads.safetensors` + `heads.json` (shape, head type and the backbone fingerprint it was
trained for). `dyntree.interop.load_heads` reads it and FasterDecoding's Medusa v0.1 and vLLM's Medusa
layouts (interop also writes those, Medusa heads only).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .eagle import EagleHeads
from .errors import DynTreeError
from .heads_config import FORMAT_VERSION, HEADS_CONFIG, HEADS_FILE, MEDUSA_FILE, HeadsConfig  # noqa: F401
from .kernels import Dense
from .quantized import q8_dense
from .trees.conditional import ExpandedChildren, select_by_depth



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

    # Whether a head's guess depends on the drafted path (trees are then built depth by depth).
    conditional = False

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
        return self._top_guesses(self.logits(hidden, lm_head.weight_t), k)

    def prepare_for(self, backbone) -> None:
        """Make now, at load, whatever drafting on `backbone` builds on first use (nothing for Medusa heads)."""

    def draft(self, backbone, last_hidden: torch.Tensor, root: torch.Tensor, topk: int,
              state=None) -> "TopkDraft":
        """One step's guesses for the proposer (the one way every kind of heads drafts): `last_hidden` `[B, H]`
        are the states after which each row's `root` `[B]` comes; `state` is what `new_state` made for these
        rows (None for heads that keep none). Medusa heads read the state alone, so every head's top-`topk` is
        computed here, once."""
        return TopkDraft(*self.topk(last_hidden, backbone.lm_head, topk))

    def draft_along(self, backbone, states: torch.Tensor, tokens: torch.Tensor, start: int, topk: int):
        """The drafts of every step of one recorded sequence (offline replay and evaluation): `states` `[L-1, H]`
        (row i: the state after token i, whose lm_head guess is token i + 1) and `tokens` `[L]`; row k of the
        result is the step whose root is token `start + k`. Medusa and Hydra heads read only that step's state."""
        return self.draft(backbone, states[start - 1 : tokens.numel() - 1], tokens[start:], topk)

    # -- per-sequence drafting state: heads that read the context keep one (`eagle.EagleHeads`) -----------------
    # The hooks every kind of heads answers, so that the decoding loop never asks which kind it holds; Medusa and
    # Hydra heads read only the last state (and the path), so they keep nothing and the hooks do nothing.
    def new_state(self, batch_size: int, max_len: int, device=None):
        """The per-sequence state drafting reads (here: none)."""
        return None

    def start(self, state, backbone, hidden: torch.Tensor, prompts: list[list[int]], roots: torch.Tensor) -> None:
        """After the prefill: `hidden` `[B, L, H]` the prompts' states, `roots` `[B]` each row's first token."""

    def advance(self, state, backbone, features: list, next_ids: list[list[int]]) -> None:
        """After a step's commit: per row, its accepted nodes' states `[a, H]` and the a tokens after them."""

    def _top_guesses(self, logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The top-k of logits over the projection's vocabulary, as full-vocabulary ids and probabilities."""
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

    def load_tensors(self, tensors: dict[str, torch.Tensor], where) -> None:
        """Fill the weights from a checkpoint's tensors; a missing or misshapen one is a one-line error."""
        expected = {"block_weight": tuple(self.block_weight.shape), "block_bias": tuple(self.block_bias.shape)}
        for name, tensor in self.extra_tensors(torch.float32).items():
            expected[name] = tuple(tensor.shape)
        if self.projection is not None and "projection_int8" in tensors:
            q, scale = tensors["projection_int8"], tensors.get("projection_scale")
            shape = tuple(self.projection.shape)
            if tuple(q.shape) != shape or scale is None or tuple(scale.shape) != shape[:-1] + (1,):
                raise DynTreeError(f"corrupt heads checkpoint in {where}: int8 projection is {tuple(q.shape)} with scale "
                                   f"{'missing' if scale is None else tuple(scale.shape)}, expected {shape}")
            self.projection.data.copy_(q.float() * scale.float())
        elif self.projection is not None:
            expected["projection"] = tuple(self.projection.shape)
        for name, shape in expected.items():
            if name not in tensors or tuple(tensors[name].shape) != shape:
                got = tuple(tensors[name].shape) if name in tensors else "missing"
                raise DynTreeError(f"corrupt heads checkpoint in {where}: {name} is {got}, expected {shape}")
            _parameter(self, name).data.copy_(tensors[name].float())

    def extra_tensors(self, block_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Tensors a subclass stores beside the Medusa ones (none here)."""
        return {}

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
        tensors.update(self.extra_tensors(block_dtype))
        tmp = out / (HEADS_FILE + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, out / HEADS_FILE)
        meta = {"format": "dyntree-heads", "version": FORMAT_VERSION, **asdict(self.config)}
        (out / HEADS_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        return out


class HydraHeads(MedusaHeads):
    """Path-conditional heads: head k's first block is `x = h + SiLU(A_k h + P_k [e_0; ...; e_k] + b_k)`, where
    e_0..e_k are the (fp32) embeddings of the root and the k drafted tokens after it, then the Medusa blocks and
    projection. With P = 0 a head is exactly the Medusa head with blocks A, b: Medusa heads are a warm start.

    `path_weights[k]` is `[H, (k+1) H]`; the path tokens are read through the backbone's embedding table,
    passed in (`embed`, `[V, H]`) like the lm_head, so the heads store no copy of it.
    """

    conditional = True

    def __init__(self, config: HeadsConfig, vocab_ids: torch.Tensor | None = None):
        config.head_type = "hydra"
        if config.num_layers < 1:
            raise DynTreeError("hydra heads need at least one block (the block that reads the path)")
        super().__init__(config, vocab_ids)
        h = config.hidden_size
        self.path_weights = nn.ParameterList(
            [nn.Parameter(torch.zeros(h, (k + 1) * h)) for k in range(config.num_heads)])

    @classmethod
    def random(cls, backbone_config, num_heads: int = 4, num_layers: int = 1, seed: int = 0, scale: float = 0.05):
        cfg = HeadsConfig(num_heads, num_layers, backbone_config.hidden_size, backbone_config.vocab_size,
                          shared_projection=True, model_type=backbone_config.model_type, head_type="hydra")
        heads = cls(cfg)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in (heads.block_weight, heads.block_bias, *heads.path_weights):
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
        return heads

    @classmethod
    def from_medusa(cls, medusa: MedusaHeads) -> "HydraHeads":
        """Hydra heads that guess exactly as `medusa` does until trained (path weights zero)."""
        config = HeadsConfig(**{**asdict(medusa.config), "head_type": "hydra"})
        heads = cls(config, medusa.vocab_ids)
        with torch.no_grad():
            heads.block_weight.copy_(medusa.block_weight)
            heads.block_bias.copy_(medusa.block_bias)
            if heads.projection is not None:
                heads.projection.copy_(medusa.projection)
        return heads

    def head_logits(self, head: int, hidden: torch.Tensor, path_ids: torch.Tensor, embed: torch.Tensor,
                    lm_head_weight_t: torch.Tensor, native=None) -> torch.Tensor:
        """Logits `[N, V']` of head `head` for N nodes: their sequence's state `hidden` `[N, H]` and the token
        path from the root to the node `path_ids` `[N, head + 1]`. `native`: a quantized backbone's kernel
        library, to draft through Q8_0 copies of the heads' layers (inference only)."""
        dtype = self.block_weight.dtype
        hidden = hidden.to(dtype)
        path = F.embedding(path_ids, embed).to(dtype).flatten(1)  # [N, (head+1) H]
        if not torch.is_grad_enabled():
            return self._fast_head_logits(head, hidden, path, lm_head_weight_t, native)
        pre = torch.addmm(self.block_bias[head, 0], hidden, self.block_weight[head, 0].t())
        x = hidden + F.silu(pre + path @ self.path_weights[head].t())
        for layer in range(1, self.config.num_layers):
            x = x + F.silu(torch.addmm(self.block_bias[head, layer], x, self.block_weight[head, layer].t()))
        if self.projection is None:
            return x @ self._shared_weight_t(lm_head_weight_t)
        return x @ self.projection[head].t()

    def _fast_head_logits(self, head: int, hidden: torch.Tensor, path: torch.Tensor,
                          lm_head_weight_t: torch.Tensor, native=None) -> torch.Tensor:
        """The same product through prepacked `Dense` layers (one per head and block, [A_k | P_k] fused into
        one): drafting runs a few rows per depth, where the generic matmul costs several times more. With
        `native` (the quantized backbone's kernel library) the layers are Q8_0 blocks instead: the heads'
        fp32 weights weigh about as much as the whole 4-bit backbone, and drafting only guesses."""
        first, blocks, projection = self._dense_layers(native)[head]
        x = hidden + F.silu(first(torch.cat([hidden, path], dim=1)))
        for block in blocks:
            x = x + F.silu(block(x))
        if projection is None:
            return x @ self._shared_weight_t(lm_head_weight_t)
        return projection(x)

    def _dense_layers(self, native=None) -> list:
        """Per head: (fused first block, later blocks, own projection or None) as prepacked `Dense` (or Q8_0
        `NativeDense` with `native`); made again whenever a parameter changed (training bumps their versions)."""
        params = [self.block_weight, self.block_bias, *self.path_weights] + (
            [self.projection] if self.projection is not None else [])
        key = (id(native), *((p.data_ptr(), p._version) for p in params))

        def layer(weight, bias=None):
            return Dense(weight, bias) if native is None else q8_dense(weight, bias, native)

        cached = getattr(self, "_dense_cache", None)
        if cached is None or cached[0] != key:
            layers = []
            for k in range(self.num_heads):
                fused = torch.cat([self.block_weight[k, 0], self.path_weights[k]], dim=1).detach()
                first = layer(fused.contiguous(), self.block_bias[k, 0].detach().contiguous())
                blocks = [layer(self.block_weight[k, l].detach().contiguous(),
                                self.block_bias[k, l].detach().contiguous())
                          for l in range(1, self.config.num_layers)]
                projection = None if self.projection is None else layer(self.projection[k].detach().contiguous())
                layers.append((first, blocks, projection))
            object.__setattr__(self, "_dense_cache", (key, layers))
            cached = self._dense_cache
        return cached[1]

    def path_logits(self, hidden: torch.Tensor, path_ids: torch.Tensor, embed: torch.Tensor,
                    lm_head_weight_t: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits of every head `[N, K, V']`: `path_ids` `[N, K]` holds the root and the next
        K-1 tokens of each row's true continuation (head k reads the first k+1)."""
        return torch.stack([self.head_logits(k, hidden, path_ids[:, : k + 1], embed, lm_head_weight_t)
                            for k in range(self.num_heads)], dim=1)

    def logits(self, hidden, lm_head_weight_t):  # noqa: D102 - Medusa's interface has no path
        raise DynTreeError("hydra heads guess from a path: use path_logits / head_logits")

    @torch.inference_mode()
    def topk_given_path(self, head: int, hidden: torch.Tensor, path_ids: torch.Tensor, embed: torch.Tensor,
                        lm_head: Dense, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k guesses `[N, k]` (token ids, probabilities) of head `head` for N paths."""
        return self._top_guesses(self.head_logits(head, hidden, path_ids, embed, lm_head.weight_t,
                                                  getattr(lm_head, "lib", None)), k)

    def prepare_for(self, backbone) -> None:
        """The drafting layers for `backbone` (Q8_0 copies on a quantized one): built here, not in the first
        pass a user times."""
        self._dense_layers(getattr(backbone.lm_head, "lib", None))

    def draft(self, backbone, last_hidden: torch.Tensor, root: torch.Tensor, topk: int,
              state=None) -> "PathDraft":
        """One step's guesses for the proposer: a node's children depend on its path, so nothing is computed
        until the tree asks for nodes (`PathDraft.expand`, depth by depth)."""
        return PathDraft(self, backbone, last_hidden, root, topk)

    @torch.no_grad()
    def round_to_storage(self, block_dtype: torch.dtype = torch.float32, int8_projection: bool = False) -> None:
        super().round_to_storage(block_dtype, int8_projection)
        for p in self.path_weights:
            p.copy_(p.to(block_dtype).float())

    def extra_tensors(self, block_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {f"path_weight.{k}": p.detach().to(block_dtype).contiguous() for k, p in enumerate(self.path_weights)}


# -- drafts: what `heads.draft(...)` gives the proposers ------------------------------------------------------
# Both kinds answer the same questions: `expand` (the top children of requested nodes), `rank_of` (a node's rank
# and probability among its parent's guesses), `rows` (the draft of some rows only) and `grow` (the heads' work
# of a whole tree of a given size, which latency measurements time). `ids` / `probs` `[B, K, k]` are each head's
# own top-k where the guesses do not depend on the path (Medusa heads), else None.
class TopkDraft:
    """Medusa heads' guesses: each head's top-k from the row's state, whatever the path above a node."""

    def __init__(self, ids: torch.Tensor, probs: torch.Tensor):
        self.ids, self.probs = ids, probs
        self._lists = None

    def _as_lists(self):
        if self._lists is None:
            self._lists = (self.ids.tolist(), self.probs.tolist())
        return self._lists

    def expand(self, requests: list[tuple[int, tuple[int, ...]]]) -> list[list[tuple[int, float]]]:
        ids, probs = self._as_lists()
        return [list(zip(ids[b][len(path)], probs[b][len(path)])) for b, path in requests]

    def rank_of(self, row: int, path: tuple[int, ...]) -> tuple[int, float]:
        ids, probs = self._as_lists()
        rank = ids[row][len(path) - 1].index(path[-1])
        return rank, probs[row][len(path) - 1][rank]

    def rows(self, start: int, stop: int) -> "TopkDraft":
        return TopkDraft(self.ids[start:stop], self.probs[start:stop])

    def grow(self, size: int) -> None:
        """Nothing left to compute: the heads ran once in `MedusaHeads.draft`."""


class PathDraft:
    """One step's path-conditional guesses: `expand` runs the heads once per depth for all requested nodes.

    A request (row, path) asks for the top children of the node reached from row's root by `path`; head
    `len(path)` reads the row's state `last_hidden[row]` and the tokens root + path. All requests of one call
    have the same depth (`trees.conditional.select_by_depth` asks depth by depth).
    """

    ids = probs = None  # no guess exists before its path is chosen

    def __init__(self, heads, backbone, last_hidden: torch.Tensor, root: torch.Tensor, topk: int):
        self.heads, self.backbone, self.topk = heads, backbone, topk
        self.last_hidden = last_hidden
        self.roots = root.tolist()
        self._children = ExpandedChildren()  # node -> (rank, prob), for `rank_of`

    def expand(self, requests: list[tuple[int, tuple[int, ...]]]) -> list[list[tuple[int, float]]]:
        depth = len(requests[0][1])
        if any(len(path) != depth for _, path in requests):
            raise ValueError("one expand call serves one depth")
        rows = torch.tensor([b for b, _ in requests], device=self.last_hidden.device)
        path_ids = torch.tensor([[self.roots[b], *path] for b, path in requests], device=rows.device)
        ids, probs = self.heads.topk_given_path(depth, self.last_hidden[rows], path_ids,
                                                self.backbone.embed_tokens, self.backbone.lm_head, self.topk)
        return self._children.record(requests, ids.tolist(), probs.tolist())

    def rank_of(self, row: int, path: tuple[int, ...]) -> tuple[int, float]:
        """A proposed node's rank among its parent's guesses and its conditional probability."""
        return self._children.rank_of(row, path)

    def rows(self, start: int, stop: int) -> "PathDraft":
        return PathDraft(self.heads, self.backbone, self.last_hidden[start:stop],
                         torch.tensor(self.roots[start:stop]), self.topk)

    def grow(self, size: int) -> None:
        """The heads' work of a `size`-node tree: depth by depth, at most `size - 1` children per node (a
        dynamic tree over these heads asks no more)."""
        self.topk = min(self.topk, max(size - 1, 1))
        select_by_depth(self.expand, len(self.roots), size - 1, self.heads.num_heads)


def heads_class(head_type: str):
    """The class for a heads.json `head_type`."""
    classes = {"medusa": MedusaHeads, "hydra": HydraHeads, "eagle": EagleHeads}
    if head_type not in classes:
        raise DynTreeError(f"unknown head type {head_type!r} (dyntree knows {', '.join(classes)})")
    return classes[head_type]


def quantize_rows_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: `weight ~= q * scale`, with `scale` shaped `[..., rows, 1]` (float32)."""
    scale = weight.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0
    q = torch.round(weight.float() / scale).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def load_own_layout(path: Path) -> MedusaHeads:
    """Heads saved by `MedusaHeads.save` (`heads.json` + `heads.safetensors`) in `path`."""
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
    try:
        heads = heads_class(config.head_type)(config, None if vocab_ids is None else vocab_ids.long())
    except (DynTreeError, ValueError, TypeError) as exc:
        raise DynTreeError(f"corrupt heads checkpoint in {path}: {exc}".splitlines()[0]) from exc
    heads.load_tensors(tensors, path)
    return heads


def _parameter(heads: MedusaHeads, name: str) -> torch.Tensor:
    """A stored tensor's parameter: `block_weight`, or `path_weight.{k}` for a hydra head."""
    if name.startswith("path_weight."):
        return heads.path_weights[int(name.split(".")[1])]
    return getattr(heads, name)
