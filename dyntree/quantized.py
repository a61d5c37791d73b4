"""The model's weights kept in the GGUF file's own blocks (Q4_1 layers, Q8_0 embedding), run by native kernels.

A GGUF Q4_1 block holds 32 weights as 4-bit codes q with an fp16 scale d and min m: w = d*q + m. Q8_0 holds
int8 codes with a scale: w = d*q. Both products d*q are exact in fp32 (an 11-bit mantissa times a small
integer), so a weight decoded in a register equals, bit for bit, what a de-quantizer writes: the quantized
path multiplies *the same weights* as the fp32-de-quantized model, streaming 0.56 (Q4_1) or 1.06 (Q8_0)
bytes a weight instead of 4. Results differ from that model only by summation order (docs/precision.md).

Layout here: per matrix, `codes` (Q4_1: uint8 `[out, in/2]`, ggml's nibble order per block; Q8_0: int8
`[out, in]`), `scales` and `mins` (fp32 `[out, in/32]`). `QuantMatrix` holds one; `QuantStack` the layers of
a backbone plus the native library that runs them.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import torch

from .cachedir import cache_root
from .errors import DynTreeError
from .model import Transformer
from .native import load

BLOCK = 32
Q4_1, Q8_0 = 0, 1  # the kernel's kinds
GGUF_KIND = {"Q4_1": Q4_1, "Q8_0": Q8_0}


@dataclass
class QuantMatrix:
    """One `[out, in]` weight as blocks of 32 along `in`: y = x @ W.T through the native kernel."""

    kind: int
    codes: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    bias: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.scales.shape[0]

    @property
    def in_features(self) -> int:
        return self.scales.shape[1] * BLOCK

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight `[out, in]`, bit-equal to what a GGUF de-quantizer writes."""
        out, blocks = self.scales.shape
        if self.kind == Q4_1:
            packed = self.codes.view(out, blocks, 16)
            codes = torch.cat([packed & 0x0F, packed >> 4], dim=-1).float()  # low nibbles first
            weight = codes * self.scales[..., None] + self.mins[..., None]
        else:
            weight = self.codes.view(out, blocks, BLOCK).float() * self.scales[..., None]
        return weight.reshape(out, blocks * BLOCK)

    def rows(self, index: torch.Tensor) -> "QuantMatrix":
        """The matrix restricted to output rows `index` (a permutation or a subset)."""
        return QuantMatrix(self.kind, self.codes[index].contiguous(), self.scales[index].contiguous(),
                           None if self.mins is None else self.mins[index].contiguous(),
                           None if self.bias is None else self.bias[index].contiguous())

    @staticmethod
    def concat(parts: list["QuantMatrix"]) -> "QuantMatrix":
        """Output rows of several matrices stacked (fused q/k/v, gate/up)."""
        kinds = {p.kind for p in parts}
        if len(kinds) != 1:
            raise DynTreeError("cannot fuse matrices quantized in different formats")
        biases = [p.bias for p in parts]
        if any(b is None for b in biases) and not all(b is None for b in biases):
            raise DynTreeError("checkpoint has biases for only some of a fused group of matrices")
        return QuantMatrix(parts[0].kind, torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                           None if parts[0].mins is None else torch.cat([p.mins for p in parts]),
                           None if biases[0] is None else torch.cat(biases))

    @classmethod
    def from_gguf(cls, type_name: str, data: np.ndarray, shape: tuple[int, int]) -> "QuantMatrix":
        """From a GGUF tensor's raw bytes (`[out, blocks * bytes_per_block]` uint8) of shape `[out, in]`."""
        if type_name not in GGUF_KIND:
            raise DynTreeError(f"GGUF tensor type {type_name} is not supported by the quantized path")
        out, inner = shape
        if inner % BLOCK:
            raise DynTreeError(f"a {type_name} matrix needs rows of whole {BLOCK}-weight blocks, not {inner}")
        raw = np.ascontiguousarray(data).reshape(out, inner // BLOCK, -1)
        scales = torch.from_numpy(raw[..., 0:2].copy().view(np.float16).astype(np.float32)[..., 0])
        if type_name == "Q4_1":
            mins = torch.from_numpy(raw[..., 2:4].copy().view(np.float16).astype(np.float32)[..., 0])
            codes = torch.from_numpy(raw[..., 4:20].copy()).reshape(out, inner // 2)
            return cls(Q4_1, codes, scales, mins)
        codes = torch.from_numpy(raw[..., 2:34].copy().view(np.int8)).reshape(out, inner)
        return cls(Q8_0, codes, scales, None)

    @classmethod
    def quantize_q4_1(cls, weight: torch.Tensor) -> "QuantMatrix":
        """Round-to-nearest 4-bit groups of 32 (GGUF's Q4_1 rule): lossy, for checkpoints that come in fp."""
        out, inner = weight.shape
        if inner % BLOCK:
            raise DynTreeError(f"4-bit groups need rows of whole {BLOCK}-weight blocks, not {inner}")
        blocks = weight.float().reshape(out, inner // BLOCK, BLOCK)
        low, high = blocks.amin(-1), blocks.amax(-1)
        scales = ((high - low) / 15).half().float()  # stored as fp16, as the file format does
        mins = low.half().float()
        inverse = torch.where(scales > 0, 1 / scales, torch.zeros_like(scales))
        codes = ((blocks - mins[..., None]) * inverse[..., None] + 0.5).floor().clamp(0, 15).to(torch.uint8)
        packed = codes[..., :16] | (codes[..., 16:] << 4)
        return cls(Q4_1, packed.reshape(out, inner // 2).contiguous(), scales.contiguous(), mins.contiguous())

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        tensors = {f"{prefix}.codes": self.codes, f"{prefix}.scales": self.scales}
        if self.mins is not None:
            tensors[f"{prefix}.mins"] = self.mins
        if self.bias is not None:
            tensors[f"{prefix}.bias"] = self.bias
        return tensors

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], prefix: str) -> "QuantMatrix":
        if f"{prefix}.codes" not in state:
            raise DynTreeError(f"quantized weights are missing {prefix!r}")
        mins = state.get(f"{prefix}.mins")
        return cls(Q4_1 if mins is not None else Q8_0, state[f"{prefix}.codes"], state[f"{prefix}.scales"], mins,
                   state.get(f"{prefix}.bias"))


class _QMat(ctypes.Structure):
    _fields_ = [("q", ctypes.c_void_p), ("d", ctypes.c_void_p), ("m", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("out", ctypes.c_int64), ("inner", ctypes.c_int64), ("kind", ctypes.c_int32),
                ("pad", ctypes.c_int32)]

    @classmethod
    def of(cls, matrix: QuantMatrix) -> "_QMat":
        def ptr(t):
            return None if t is None else t.data_ptr()
        return cls(ptr(matrix.codes), ptr(matrix.scales), ptr(matrix.mins), ptr(matrix.bias), matrix.out_features,
                   matrix.in_features, matrix.kind, 0)


class _QLayer(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p), ("qkv", _QMat), ("o", _QMat),
                ("gate_up", _QMat), ("down", _QMat)]


class _QConfig(ctypes.Structure):
    _fields_ = [("hidden", ctypes.c_int64), ("inter", ctypes.c_int64), ("heads", ctypes.c_int64),
                ("kv_heads", ctypes.c_int64), ("head_dim", ctypes.c_int64), ("eps", ctypes.c_float),
                ("pad", ctypes.c_int32), ("rope_cos", ctypes.c_void_p), ("rope_sin", ctypes.c_void_p)]


class NativeDense:
    """A `Dense`-like projection over a quantized matrix (the lm_head): fp32 in, fp32 out, row-independent."""

    __slots__ = ("matrix", "lib", "_struct", "_weight")

    def __init__(self, matrix: QuantMatrix, lib):
        self.matrix, self.lib = matrix, lib
        self._struct = _QMat.of(matrix)
        self._weight = None

    @property
    def weight(self) -> torch.Tensor:
        """The de-quantized fp32 weight, made on first use (heads that share the lm_head, exporters)."""
        if self._weight is None:
            self._weight = self.matrix.dequantize()
        return self._weight

    @property
    def weight_t(self) -> torch.Tensor:
        return self.weight.t()

    @property
    def in_features(self) -> int:
        return self.matrix.in_features

    @property
    def out_features(self) -> int:
        return self.matrix.out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1]).float().contiguous()
        y = torch.empty(rows.shape[0], self.out_features)
        self.lib.dyntree_qmatmul(ctypes.byref(self._struct), rows.data_ptr(), rows.shape[0], y.data_ptr(),
                                 torch.get_num_threads())
        return y.view(*shape[:-1], self.out_features)


class QuantStack:
    """The backbone's layers as quantized matrices and fp32 norms, run by the native `dyntree_run_layers`."""

    def __init__(self, config, layers: list[dict], rope_cos: torch.Tensor, rope_sin: torch.Tensor, lib):
        self.lib = lib
        self.layers = layers  # keeps every tensor the structs point at alive
        self.rope_cos, self.rope_sin = rope_cos.float().contiguous(), rope_sin.float().contiguous()
        self._config = _QConfig(config.hidden_size, config.intermediate_size, config.num_heads, config.num_kv_heads,
                                config.head_dim, config.rms_norm_eps, 0, self.rope_cos.data_ptr(),
                                self.rope_sin.data_ptr())
        self._layers = (_QLayer * len(layers))(*[
            _QLayer(layer["attn_norm"].data_ptr(), layer["mlp_norm"].data_ptr(), _QMat.of(layer["qkv"]),
                    _QMat.of(layer["o"]), _QMat.of(layer["gate_up"]), _QMat.of(layer["down"]))
            for layer in layers])
        self._scratch = torch.empty(0)

    def run(self, hidden: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
            slots: torch.Tensor, mask: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Layers [start, end) on `hidden` `[B, n, H]`: the same contract as `Transformer.run_layers`."""
        batch, n, _ = hidden.shape
        out = hidden.float().contiguous().clone()
        total = mask.shape[-1]
        mask_bytes = mask.reshape(batch * n, total).to(torch.uint8).contiguous()
        positions = positions.reshape(-1).to(torch.int64).contiguous()
        slots = slots.reshape(-1).to(torch.int64).contiguous()
        if keys.dtype != torch.float32 or keys.stride(-1) != 1 or keys.stride() != values.stride():
            raise DynTreeError("the quantized path needs an fp32 KV cache")
        strides = torch.tensor(keys.stride()[:4], dtype=torch.int64)
        threads = torch.get_num_threads()
        need = self.lib.dyntree_scratch_floats(ctypes.byref(self._config), batch * n, total, threads)
        if self._scratch.numel() < need:
            # At least 1 MiB: a small buffer shares the allocator's heap pages with objects the threads touch
            # meanwhile, and a prefill measured 1 s instead of 7 ms through it (a page of its own: no sharing).
            self._scratch = torch.zeros(max(need, 1 << 18))
        self.lib.dyntree_run_layers(ctypes.byref(self._config), self._layers, start, end, out.data_ptr(), batch, n,
                                    positions.data_ptr(), slots.data_ptr(), mask_bytes.data_ptr(), total,
                                    keys.data_ptr(), values.data_ptr(), strides.data_ptr(), self._scratch.data_ptr(),
                                    threads)
        return out


def unpermute_rotary_rows(matrix: QuantMatrix, heads: int) -> QuantMatrix:
    """Undo the GGUF converter's row order for Q/K (it interleaves each head's two rotary halves)."""
    rows = matrix.out_features
    half = rows // heads // 2
    order = torch.arange(rows).reshape(heads, half, 2).transpose(1, 2).reshape(rows)
    return matrix.rows(order)


def quantize_q8_0(weight: torch.Tensor) -> QuantMatrix:
    """Round-to-nearest int8 groups of 32 with an fp16 scale (GGUF's Q8_0 rule)."""
    out, inner = weight.shape
    blocks = weight.float().reshape(out, inner // BLOCK, BLOCK)
    scales = (blocks.abs().amax(-1) / 127).half().float()
    inverse = torch.where(scales > 0, 1 / scales, torch.zeros_like(scales))
    codes = (blocks * inverse[..., None]).round().clamp(-127, 127).to(torch.int8)
    return QuantMatrix(Q8_0, codes.reshape(out, inner).contiguous(), scales.contiguous(), None)


def q8_dense(weight: torch.Tensor, bias: torch.Tensor | None, lib) -> NativeDense:
    """A float `[out, in]` weight as Q8_0 blocks behind the native product: for drafters, whose guesses may
    round (verification decides what is kept), at about a quarter of fp32's bytes."""
    matrix = quantize_q8_0(weight)
    matrix.bias = None if bias is None else bias.float().contiguous()
    return NativeDense(matrix, lib)


@dataclass
class QuantizedParts:
    """What a quantized `Transformer` is made of; `stack` binds the layers to the rotary tables."""

    weights: str  # "gguf" (the file's own blocks) or "q4" (float weights quantized here: lossy)
    embed_tokens: torch.Tensor  # fp32 [V, H]: lookups cost nothing, and heads read path embeddings from it
    norm: torch.Tensor
    lm_head: NativeDense
    layers: list[dict]
    lib: object
    config: object

    def stack(self, rope_cos: torch.Tensor, rope_sin: torch.Tensor) -> QuantStack:
        return QuantStack(self.config, self.layers, rope_cos, rope_sin, self.lib)


def native_library():
    """The native kernels for this machine, or a DynTreeError saying why there are none."""
    lib, why = load(cache_root())
    if lib is None:
        raise DynTreeError(f"quantized weights need dyntree's native kernels: {why}")
    return lib


def supports(config) -> str:
    """Why the native stack cannot run this architecture ("" when it can)."""
    if config.hidden_size % 64 or config.head_dim % 16 or config.intermediate_size % 32 or config.head_dim > 128:
        return "its sizes are not multiples of the kernels' vectors"
    return ""


def load_quantized_backbone(config, state: dict[str, torch.Tensor], weights: str, device=None):
    """A `Transformer` over quantized blocks: the GGUF file's own (`state` from `gguf-blocks.safetensors`),
    or, for "q4", a float Hugging Face state dict quantized here (4-bit groups of 32 for the layers, 8-bit for
    the lm_head: lossy, opt-in)."""
    if torch.device(device or "cpu").type != "cpu":
        raise DynTreeError("quantized weights (--weights gguf|q4) run on the CPU only")
    problem = supports(config)
    if problem:
        raise DynTreeError(f"quantized weights cannot run this model: {problem}")
    lib = native_library()
    if weights == "gguf":
        embed = QuantMatrix.from_state(state, "embed")
        head = QuantMatrix.from_state(state, "lm_head") if "lm_head.codes" in state else embed
        layers = [{"attn_norm": state[f"layers.{i}.attn_norm"], "mlp_norm": state[f"layers.{i}.mlp_norm"],
                   **{part: QuantMatrix.from_state(state, f"layers.{i}.{part}") for part in
                      ("qkv", "o", "gate_up", "down")}} for i in range(config.num_layers)]
        embed_tokens, norm = embed.dequantize(), state["norm.weight"]
    else:
        sd = {k.removeprefix("model."): v for k, v in state.items()}

        def fused(prefix: str, names: list[str]) -> QuantMatrix:
            parts = []
            for name in names:
                key = f"{prefix}{name}.weight"
                if key not in sd:
                    raise DynTreeError(f"checkpoint is missing tensor {key!r}")
                matrix = QuantMatrix.quantize_q4_1(sd[key])
                matrix.bias = sd.get(f"{prefix}{name}.bias")
                parts.append(matrix)
            return QuantMatrix.concat(parts)

        layers = []
        for i in range(config.num_layers):
            p = f"layers.{i}."
            layers.append({"attn_norm": sd[p + "input_layernorm.weight"].float(),
                           "mlp_norm": sd[p + "post_attention_layernorm.weight"].float(),
                           "qkv": fused(p + "self_attn.", ["q_proj", "k_proj", "v_proj"]),
                           "o": fused(p + "self_attn.", ["o_proj"]),
                           "gate_up": fused(p + "mlp.", ["gate_proj", "up_proj"]),
                           "down": fused(p + "mlp.", ["down_proj"])})
        embed_tokens, norm = sd["embed_tokens.weight"].float(), sd["norm.weight"].float()
        tied = config.tie_word_embeddings or "lm_head.weight" not in state
        head = quantize_q8_0(embed_tokens if tied else state["lm_head.weight"])
    for layer in layers:
        for part in ("attn_norm", "mlp_norm"):
            layer[part] = layer[part].float().contiguous()
    parts = QuantizedParts(weights, embed_tokens.contiguous(), norm.float().contiguous(), NativeDense(head, lib),
                           layers, lib, config)
    return Transformer(config, None, device="cpu", dtype=torch.float32, quantized=parts)
