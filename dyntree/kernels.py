"""Dense layers and attention whose per-row results do not depend on how many rows are computed together.

Greedy tree decoding is exact only if a token's hidden state comes out bit-identical whether it is the only
row of a plain decoding pass or one node of an n-node tree pass. Kernels that pick a different code path by
row count break that (MKL gemv for 1 row vs sgemm for more, or oneDNN's own 1-row path: ~1e-4 apart in fp32),
and a near-tie argmax then flips. So, per dtype, on CPU:
- Dense: oneDNN with the weight prepacked once (fp32 and bf16 alike), never called with a single row (one row
  is padded to two). Measured on an AMD EPYC (Zen 5, avx512_bf16, 2 threads), the 120 layer products of
  SmolLM2-135M: fp32 12.2 ms at 1-2 rows and 14.0 at 8 (MKL gemv through `x @ W_t`: 20.3 at 1 row); bf16 6.6 ms
  at 1 row and 7.7 at 8 (plain `F.linear` in bf16 reorders the weight on every call: 10.4 at 8).
- Attention: `attend` below (fp32 whatever the dtype), not `F.scaled_dot_product_attention`, whose CPU
  kernels give a row different bits with 1 query than with 2+ and for a different key count.
tests/test_kernels.py asserts the property on whatever CPU runs it. Elsewhere (CUDA, or a CPU build without
oneDNN) Dense falls back to `F.linear`, still padded to two rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ATTENTION_BLOCK = 64  # keys are reduced in blocks of this many absolute cache slots


MAX_BF16_ROWS = 32  # bf16 products are cut into pieces of at most this many rows (see `Dense.__call__`)


class Dense:
    """y = x @ weight.T (+ bias) with `weight` ``[out_features, in_features]`` in the model's dtype."""

    __slots__ = ("weight", "bias", "packed")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight = weight.contiguous()
        self.bias = bias
        self.packed = _pack_onednn(self.weight)

    @property
    def weight_t(self) -> torch.Tensor:
        """`[in, out]` view (no copy), for callers that multiply by the weight themselves (shared heads)."""
        return self.weight.t()

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        if rows.shape[0] > MAX_BF16_ROWS and self.weight.dtype == torch.bfloat16:
            # On AMX CPUs (Sapphire Rapids) oneDNN's bf16 products take another kernel above 32 rows, which
            # rounds differently: products of at most 32 rows each keep every row's bits.
            pieces = [self(piece) for piece in rows.split(MAX_BF16_ROWS)]
            return torch.cat(pieces).view(*shape[:-1], self.out_features)
        single = rows.shape[0] == 1
        if single:  # the 1-row kernels round differently: always take the 2+-row path
            rows = rows.expand(2, -1).contiguous()
        if self.packed is not None:  # the overload itself: no per-call lookup or overload resolution
            y = _LINEAR_POINTWISE(rows if single or rows.is_contiguous() else rows.contiguous(), self.packed,
                                  self.bias, "none", [], "")
        else:
            y = F.linear(rows, self.weight, self.bias)
        if single:
            y = y[:1]
        return y.view(*shape[:-1], y.shape[-1])


try:
    _LINEAR_POINTWISE = torch.ops.mkldnn._linear_pointwise.default
except (AttributeError, RuntimeError):  # a build without oneDNN: `_pack_onednn` gives None, Dense uses F.linear
    _LINEAR_POINTWISE = None


def _pack_onednn(weight: torch.Tensor):
    """oneDNN-prepacked CPU weight (fp32 or bf16), or None where oneDNN cannot take it."""
    if (weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16)
            or not torch.backends.mkldnn.is_available() or _LINEAR_POINTWISE is None):
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 8)
        probe = torch.ones(2, weight.shape[1], dtype=weight.dtype)
        got = _LINEAR_POINTWISE(probe, packed, None, "none", [], "")
        tolerance = 1e-4 if weight.dtype == torch.float32 else 2e-2
        if not torch.allclose(got.float(), F.linear(probe, weight).float(), rtol=tolerance, atol=tolerance):
            return None
        return packed
    except (RuntimeError, AttributeError):
        return None


MIN_ATTENTION_ROWS = 8  # products with fewer rows (query heads x tokens) take other kernels (1-3 rows here)


_LAYOUTS: dict[int, tuple[int, int]] = {}  # head size -> (rows multiple, value columns) measured per process


def attention_layout(dim: int) -> tuple[int, int]:
    """How this CPU's batched products must be shaped at head size `dim` for a row's bits not to depend on how
    many rows come with it nor where it sits among them: (rows come in a multiple of this, the values carry
    this many columns: `dim` values, the softmax denominator's column of ones, zeros). Measured once per
    process and head size on random data, moving rows to random places among 8-64. A cache of measurements
    only: an AMD Zen 5 gives a row other bits by its place mod 4 with 9 columns (head size 8), none from 12
    columns up; head size 64 needs nothing."""
    if dim not in _LAYOUTS:
        gen = torch.Generator().manual_seed(dim)
        weights = torch.rand(2, 64, 2 * ATTENTION_BLOCK, generator=gen)
        orders = [torch.randperm(64, generator=gen) for _ in range(4)]

        def independent(multiple: int, columns: int) -> bool:
            values = torch.zeros(2, 2 * ATTENTION_BLOCK, columns)
            values[..., : dim + 1] = torch.randn(2, 2 * ATTENTION_BLOCK, dim + 1, generator=gen)
            full = weights @ values
            for rows in range(multiple * -(-MIN_ATTENTION_ROWS // multiple), 65, multiple):
                for order in orders:
                    picked = order[:rows]
                    if not torch.equal(weights[:, picked] @ values, full[:, picked]):
                        return False
            return True

        widths = sorted({dim + 1, *(-(-(dim + 1) // m) * m for m in (4, 8, 16, 32))})
        _LAYOUTS[dim] = next(((m, w) for w in widths for m in (1, 2, 4, 8, 16) if independent(m, w)),
                             (16, widths[-1]))
    return _LAYOUTS[dim]


class AttentionPlan:
    """What every layer's `attend` shares within one forward: the additive mask and the key blocks.

    The weighted sum over keys is cut into blocks of `ATTENTION_BLOCK` *logical* positions (a key's position
    in its own sequence: a tree node at depth d after L committed tokens is position L + d, wherever its slot
    is). Each block is one product and the blocks are summed in order, so a row's bits depend on which keys
    it sees at which positions only, not on the tree around it: a node gets what plain decoding of its path
    gives. Below `split` every visible key sits at its own position (committed tokens, a prefill, a chain)
    and is multiplied block by block; the few blocks above are multiplied through a 0/1 selection of keys
    (the products ignore interleaved zero weights: tests/test_kernels.py checks the outcome).
    """

    __slots__ = ("bias", "split", "tail_blocks", "rows", "columns", "out", "_shape", "_scaled", "_scaled_live",
                 "_grouped", "_scores", "_rowmax", "_augmented", "_augmented_values", "_weight_blocks", "_value_blocks",
                 "_out_grouped", "_dims")

    def __init__(self, mask: torch.Tensor, key_positions: torch.Tensor, split: int, heads: int, kv_heads: int,
                 head_dim: int | None = None):
        """mask `[B, 1, n, T]` (True = visible); key_positions `[B, T]` logical position of every slot (below
        `split` for slots nobody sees); split a multiple of `ATTENTION_BLOCK`; with `head_dim`, the products' rows
        (query heads x tokens) and value columns take the shape this CPU needs at that size (`attention_layout`)."""
        batch, _, n, total = mask.shape
        group = heads // kv_heads
        self.rows = max(n, -(-MIN_ATTENTION_ROWS // group))
        self.columns = None
        if head_dim is not None:  # a row's bits then do not depend on its place nor on the rows around it
            multiple, self.columns = attention_layout(head_dim)
            self.rows = -(-self.rows // multiple) * multiple
        if self.rows > n:  # padding rows (zero queries) see what the last row sees: finite, never read
            mask = torch.cat([mask, mask[:, :, -1:].expand(-1, -1, self.rows - n, -1)], 2)
        bias = torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf"))
        self.bias = bias[:, :, None].expand(batch, kv_heads, group, self.rows, total).reshape(
            batch * kv_heads, group * self.rows, total)
        self.split = split
        # Keys at or above `split` that sit within one block of slots all fall in one logical block (positions
        # lie between `split` and their slot): that block is multiplied like the others, no selection needed.
        self.tail_blocks = None
        if total - split > ATTENTION_BLOCK:
            block = (key_positions[:, split:] - split) // ATTENTION_BLOCK  # [B, T - split]
            count = int(block.max()) + 1 if block.numel() else 0
            selection = block[:, None, :] == torch.arange(count, device=mask.device)[None, :, None]
            self.tail_blocks = selection.float().repeat_interleave(kv_heads, 0) if count else None
        self._shape = None

    def prepare(self, batch: int, heads: int, n: int, dim: int, total: int, dtype: torch.dtype, device) -> None:
        """Allocate what every layer's `run` writes (fp32 scratch, the output `[B, n, H, D]` in `dtype`) and the
        views `run` reads them through, once per forward: per layer only the products remain."""
        kv_heads = self.bias.shape[0] // batch
        group, rows = heads // kv_heads, self.rows
        shape = (batch, heads, n, dim, total, dtype)
        if self._shape == shape:
            return
        self._shape = shape
        self._scaled = torch.zeros(batch, heads, rows, dim, device=device)  # padding rows stay zero: finite weights
        self._scaled_live = self._scaled[:, :, :n]
        self._grouped = self._scaled.view(batch * kv_heads, group * rows, dim)
        self._scores = torch.empty(batch * kv_heads, group * rows, total, device=device)
        self._rowmax = torch.empty(batch * kv_heads, group * rows, 1, device=device)
        columns = max(self.columns or 0, dim + 1)  # values, the softmax denominator's column, zeros
        self._augmented = torch.empty(batch * kv_heads, total, columns, device=device)
        self._augmented[..., dim].fill_(1.0)
        self._augmented[..., dim + 1 :].zero_()
        self._augmented_values = self._augmented[..., :dim]
        blocks = total // ATTENTION_BLOCK if self.tail_blocks is None else self.split // ATTENTION_BLOCK
        width = blocks * ATTENTION_BLOCK
        self._weight_blocks = self._scores[..., :width].unflatten(-1, (blocks, ATTENTION_BLOCK)).transpose(1, 2)
        self._value_blocks = self._augmented[:, :width].unflatten(1, (blocks, ATTENTION_BLOCK))
        self.out = torch.empty(batch, n, heads, dim, device=device, dtype=dtype)
        self._out_grouped = self.out.view(batch, n, kv_heads, group, dim).permute(0, 2, 3, 1, 4)
        self._dims = (batch, kv_heads, group, rows, n, dim, total, columns)

    def run(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """`attend` on the buffers `prepare` made: query `[B, H, n, D]`, keys/values `[B, KV, T, D]`; returns
        the shared output buffer `[B, n, H, D]` (overwritten by the next layer)."""
        batch, kv_heads, group, rows, n, dim, total, columns = self._dims
        torch.mul(query, dim ** -0.5, out=self._scaled_live)
        scores = torch.baddbmm(self.bias, self._grouped, keys.float().reshape(batch * kv_heads, total, dim).mT,
                               out=self._scores)
        weights = scores.sub_(torch.amax(scores, -1, keepdim=True, out=self._rowmax)).exp_()  # [B * KV, R, T]
        self._augmented_values.copy_(values.reshape(batch * kv_heads, total, dim))
        products = self._weight_blocks @ self._value_blocks  # [B * KV, blocks, R, columns]
        if self.tail_blocks is not None:  # [B * KV, blocks, T - split]
            split = self.split
            tail = (weights[:, None, :, split:] * self.tail_blocks[:, :, None]) @ self._augmented[:, None, split:]
            products = torch.cat([products, tail], 1)
        summed = products.cumsum(1)[:, -1].view(batch, kv_heads, group, rows, columns)[:, :, :, :n]  # in order
        torch.div(summed[..., :dim], summed[..., dim : dim + 1], out=self._out_grouped)
        return self.out


def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
    """Masked softmax attention with grouped KV heads, in fp32 whatever the dtype, row-count independent.

    query `[B, H, n, D]`; keys/values `[B, KV, T, D]` with T a multiple of `ATTENTION_BLOCK`. The softmax
    denominator rides along the value products as a column of ones, so it is summed the same way. Returns
    `[B, H, n, D]` in the query's dtype (a view of the plan's output buffer, which the next call overwrites).
    """
    batch, heads, n, dim = query.shape
    plan.prepare(batch, heads, n, dim, keys.shape[2], query.dtype, query.device)
    return plan.run(query, keys, values).transpose(1, 2)


def padded_key_count(total: int) -> int:
    """The key count `attend` reads for `total` live slots: rounded up to whole blocks."""
    return -(-total // ATTENTION_BLOCK) * ATTENTION_BLOCK
