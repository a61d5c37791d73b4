"""Dense layers laid out for small-batch decoding on CPUs.

Decoding multiplies a handful of rows (1 token, or a tree of 4-64 tokens) by large weight matrices, and
on these CPUs the best kernel depends on the row count (measure with scripts/bench_kernels.py):
- 1 row: MKL's gemv through a contiguous ``[in, out]`` weight (`x @ W_t`);
- 2+ rows: oneDNN with a weight prepacked for its blocked layout, up to 2x faster than MKL's sgemm for
  2-16 rows (lm_head 49152x576 at 4 rows: 6.8 ms vs 12 ms).
So every projection of the backbone is a `Dense` that keeps both forms on CPU. On GPUs plain matmul is used.
"""

from __future__ import annotations

import torch


class Dense:
    """y = x @ weight_t (+ bias); `weight_t` is ``[in_features, out_features]`` and contiguous."""

    __slots__ = ("weight_t", "bias", "packed")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, pack: bool = True):
        # `weight` arrives in the PyTorch/HF convention [out, in].
        self.weight_t = weight.t().contiguous()
        self.bias = bias
        self.packed = _pack_onednn(weight) if pack else None

    @property
    def in_features(self) -> int:
        return self.weight_t.shape[0]

    @property
    def out_features(self) -> int:
        return self.weight_t.shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if self.packed is not None and rows > 1:
            y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, -1), self.packed, self.bias, "none", [], "")
            return y.view(*x.shape[:-1], y.shape[-1])
        y = torch.matmul(x, self.weight_t)
        if self.bias is not None:
            y = y + self.bias
        return y


def _pack_onednn(weight: torch.Tensor):
    """oneDNN-prepacked fp32 CPU weight, or None where oneDNN is unavailable (then MKL/cuBLAS is used)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 8)
        probe = torch.ones(2, weight.shape[1])
        got = torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "")
        if not torch.allclose(got, probe @ weight.t(), rtol=1e-4, atol=1e-4):
            return None
        return packed
    except (RuntimeError, AttributeError):
        return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama RMSNorm, computed in fp32 like the reference implementation."""
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)
