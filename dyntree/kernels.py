"""Dense layers and attention whose per-row results do not depend on how many rows are computed together.

Greedy tree decoding is exact only if a token's hidden state comes out bit-identical whether it is the only
row of a plain decoding pass or one node of an n-node tree pass. Kernels that pick a different code path by
row count break that (MKL gemv for 1 row vs sgemm for more, or oneDNN's own 1-row path: ~1e-4 apart in fp32),
and a near-tie argmax then flips. So, per dtype, on CPU:
- Dense: oneDNN with the weight prepacked once (fp32 and bf16 alike), never called with a single row (one row
  is padded to two). Measured on an AMD EPYC (Zen 5, avx512_bf16, 2 threads), the 120 layer products of
  SmolLM2-135M: fp32 12.2 ms at 1-2 rows and 14.0 at 8 (MKL gemv through `x @ W_t`: 20.3 at 1 row); bf16 6.6 ms
  at 1 row and 7.7 at 8 (plain `F.linear` in bf16 reorders the weight on every call: 10.4 at 8).
- Attention: `attend` below, not `F.scaled_dot_product_attention`, whose CPU kernels give a row different
  bits with 1 query than with 2+ (and for a different key count).
tests/test_kernels.py asserts the property on whatever CPU runs it. Elsewhere (CUDA, or a CPU build without
oneDNN) Dense falls back to `F.linear`, still padded to two rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ATTENTION_BLOCK = 64  # keys are reduced in blocks of this many absolute cache slots


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
        rows = x.reshape(-1, x.shape[-1])
        single = rows.shape[0] == 1
        if single:  # the 1-row kernels round differently: always take the 2+-row path
            rows = rows.expand(2, -1)
        if self.packed is not None:
            y = torch.ops.mkldnn._linear_pointwise(rows.contiguous(), self.packed, self.bias, "none", [], "")
        else:
            y = F.linear(rows, self.weight, self.bias)
        if single:
            y = y[:1]
        return y.view(*x.shape[:-1], y.shape[-1])


def _pack_onednn(weight: torch.Tensor):
    """oneDNN-prepacked CPU weight (fp32 or bf16), or None where oneDNN cannot take it."""
    if (weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16)
            or not torch.backends.mkldnn.is_available()):
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 8)
        probe = torch.ones(2, weight.shape[1], dtype=weight.dtype)
        got = torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "")
        tolerance = 1e-4 if weight.dtype == torch.float32 else 2e-2
        if not torch.allclose(got.float(), F.linear(probe, weight).float(), rtol=tolerance, atol=tolerance):
            return None
        return packed
    except (RuntimeError, AttributeError):
        return None


def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked softmax attention with grouped KV heads, row-count independent by construction.

    query `[B, H, n, D]`; keys/values `[B, KV, T, D]` with T a multiple of `ATTENTION_BLOCK`; mask `[B, 1, n, T]`
    (True = visible). Scores, the softmax and its sums are fp32. The weighted sum of values is split at fixed
    absolute slots: each `ATTENTION_BLOCK`-slot block is one fixed-size product, and the blocks are added in
    slot order (`cumsum`, sequential), so a row's bits depend only on the keys it sees and where they sit,
    not on how many other queries or trailing masked keys share the pass.
    """
    batch, heads, n, dim = query.shape
    if n == 1:  # same reason as in Dense: the 1-row products round differently
        return attend(query.expand(-1, -1, 2, -1), keys, values, mask.expand(-1, -1, 2, -1))[:, :, :1]
    kv_heads, total = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    blocks = total // ATTENTION_BLOCK
    grouped = query.reshape(batch, kv_heads, group * n, dim)
    scores = (grouped @ keys.transpose(-1, -2)).float().view(batch, kv_heads, group, n, total)
    scores = scores.masked_fill(~mask[:, :, None], float("-inf")) * dim ** -0.5
    weights = torch.exp(scores - scores.amax(-1, keepdim=True)).view(batch, kv_heads, group * n, blocks,
                                                                     ATTENTION_BLOCK)
    denominator = weights.sum(-1).cumsum(-1)[..., -1:]
    per_block = weights.to(values.dtype).transpose(2, 3) @ values.view(batch, kv_heads, blocks, ATTENTION_BLOCK, dim)
    out = per_block.float().cumsum(2)[:, :, -1] / denominator
    return out.to(query.dtype).view(batch, kv_heads, group, n, dim).reshape(batch, heads, n, dim)


def padded_key_count(total: int) -> int:
    """The key count `attend` reads for `total` live slots: rounded up to whole blocks."""
    return -(-total // ATTENTION_BLOCK) * ATTENTION_BLOCK
