"""How the backbone holds its weights: "gguf" (the file's own 4-bit blocks), float32, bfloat16, or "auto".

Weights ("--weights"): "gguf" keeps the default model's Q4_1/Q8_0 blocks and runs them with dyntree's native
kernels in fp32 (`dyntree.quantized`); "q4" quantizes a float checkpoint to 4-bit groups of 32 (lossy,
opt-in); float32/bfloat16/float16 de-quantize. "auto" takes the file's blocks where the native kernels are
measured faster than the best float dtype on this machine, else that float dtype.

bf16 halves the weight traffic that dominates a decoding pass, but it pays only where the CPU multiplies bf16
natively (avx512_bf16, AMX); on AVX2-only CPUs oneDNN emulates it and it is slower than fp32. Flags alone do
not tell how much faster, so "auto" times the backbone's own Dense kernels once per machine (about a second)
and caches the verdict as JSON under the cache dir, keyed by what changes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

import torch

from .cachedir import cache_root
from .errors import DynTreeError

QUANTIZED = ("gguf", "q4")  # weights kept as blocks and run by the native kernels, in fp32
WEIGHT_CHOICES = "auto, gguf, q4, float32, bfloat16, float16"
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16}  # fp16: for GPUs (a CPU runs it slowly)
ALLOWED = "auto, float32, bfloat16, float16"
BF16_WIN = 0.85  # bf16 must cost at most this share of fp32's time: it also costs precision
MEASURED_ROWS = (1, 8)  # plain decoding and a typical tree pass
MEASURED_SHAPES = ((3072, 576), (576, 1536))  # SmolLM2-135M's gate_up and down: wide and deep products
COPIES = 6  # distinct weights per shape, so the timed products stream from memory as decoding does


def resolve_dtype(value, device=None) -> torch.dtype:
    """A torch dtype from "auto" | "float32" | "bfloat16" | "float16" (also "fp32"/"bf16"/"fp16"), a torch dtype,
    or None (fp32)."""
    if value is None:
        return torch.float32
    if isinstance(value, torch.dtype):
        if value in (torch.float32, torch.bfloat16, torch.float16):
            return value
        raise DynTreeError(f"unsupported dtype {value}: use one of {ALLOWED}")
    name = str(value).strip().lower().removeprefix("torch.")
    if name == "auto":
        return auto_dtype(device)
    if name not in DTYPE_NAMES:
        raise DynTreeError(f"unknown dtype {value!r}: use one of {ALLOWED}")
    return DTYPE_NAMES[name]


def resolve_weights(value, device=None, model="default") -> str:
    """The canonical weights name ("gguf", "q4", "float32", "bfloat16", "float16") for a user's choice.

    "auto" on the CPU picks "gguf" for the default (GGUF) model where this machine's measured verdict says
    the native kernels beat the best float dtype; "q4" is never automatic (it changes the model)."""
    if isinstance(value, str):
        name = value.strip().lower()
        if name in QUANTIZED:
            if torch.device(device or "cpu").type != "cpu":
                raise DynTreeError(f"--weights {name} runs on the CPU only; use a float dtype on {device}")
            if name == "gguf" and str(model) != "default":
                raise DynTreeError(f"--weights gguf runs the default model's GGUF file, not {model}: use --weights "
                                   "q4 to quantize a Hugging Face checkpoint (lossy) or a float dtype")
            return name
        if name == "auto" and str(model) == "default" and torch.device(device or "cpu").type == "cpu":
            verdict = cpu_verdict()
            if verdict.get("weights") == "gguf":
                return "gguf"
            return verdict["dtype"]
        if name not in DTYPE_NAMES and name != "auto":
            raise DynTreeError(f"unknown weights {value!r}: use one of {WEIGHT_CHOICES}")
    return str(resolve_dtype(value, device)).removeprefix("torch.")


def weights_dtype(weights: str) -> torch.dtype:
    """The dtype activations run in for a canonical weights name (fp32 for quantized blocks)."""
    return torch.float32 if weights in QUANTIZED else DTYPE_NAMES[weights]


def auto_dtype(device=None) -> torch.dtype:
    """bf16 on CUDA GPUs that support it; on CPU bf16 only where it measured faster (cached per machine)."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type != "cpu":
        return torch.float32
    return DTYPE_NAMES[cpu_verdict()["dtype"]]


_UNCACHED: dict[str, dict] = {}  # verdicts measured while the machine was busy, for this process only


def cpu_verdict(cache_dir: str | os.PathLike | None = None) -> dict:
    """The cached fp32-vs-bf16 timing of this CPU, measured on the first call."""
    name, flags = cpu_identity()
    key = {"cpu": name, "flags": flags, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "kernels": kernels_version()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) if cache_dir is not None else cache_root() / "precision"
    path = path / f"{digest}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass  # missing or damaged: measure and (over)write
    if str(path) in _UNCACHED and machine_busy():
        return _UNCACHED[str(path)]
    verdict = {**measure_dense_speed(), "key": key}
    verdict.update(measure_native_speed(verdict))
    if machine_busy():
        # Timings taken beside other work mislead: not written, measured again once the machine is quiet;
        # meanwhile this process keeps them, so that its choices agree (one model per weights format).
        _UNCACHED[str(path)] = verdict
        return verdict
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(verdict, indent=1) + "\n")
    os.replace(tmp, path)
    return verdict


def _products_ms(layers: list, rows: int, dtype: torch.dtype, gen: torch.Generator) -> float:
    """ms for one pass of `rows`-row inputs through every layer (fresh inputs, so nothing is cache-resident)."""
    inputs = [torch.randn(rows, layer.in_features, generator=gen).to(dtype) for layer in layers]
    start = time.perf_counter()
    for layer, x in zip(layers, inputs):
        layer(x)
    return (time.perf_counter() - start) * 1000


def measure_dense_speed(repeats: int = 5) -> dict:
    """ms for the model-shaped Dense products at 1 and 8 rows, per dtype (minimum over interleaved repeats)."""
    from .kernels import Dense  # noqa: PLC0415

    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=gen) * 0.02 for shape in MEASURED_SHAPES for _ in range(COPIES)]
    layers = {dtype: [Dense(w.to(DTYPE_NAMES[dtype])) for w in weights] for dtype in ("float32", "bfloat16")}
    best = {(dtype, rows): float("inf") for dtype in layers for rows in MEASURED_ROWS}
    for _ in range(repeats):
        for (dtype, rows) in best:
            best[(dtype, rows)] = min(best[(dtype, rows)], _products_ms(layers[dtype], rows, DTYPE_NAMES[dtype], gen))
    cost = {dtype: sum(best[(dtype, rows)] for rows in MEASURED_ROWS) for dtype in layers}
    faster = cost["bfloat16"] <= BF16_WIN * cost["float32"]
    return {"dtype": "bfloat16" if faster else "float32",
            "ms": {f"{dtype}@{rows}": round(ms, 3) for (dtype, rows), ms in best.items()}}


def measure_native_speed(float_verdict: dict, repeats: int = 5) -> dict:
    """The native kernels' cost on the same products with Q4_1 blocks; "weights": "gguf" where they beat the
    float dtype just chosen (summed over 1 and 8 rows), else the float dtype. Without native kernels, the
    float dtype."""
    from .native import load  # noqa: PLC0415
    from .quantized import NativeDense, QuantMatrix  # noqa: PLC0415

    chosen = float_verdict["dtype"]
    lib, why = load(cache_root())
    if lib is None:
        return {"weights": chosen, "native": why}
    gen = torch.Generator().manual_seed(0)
    layers = [NativeDense(QuantMatrix.quantize_q4_1(torch.randn(shape, generator=gen) * 0.02), lib)
              for shape in MEASURED_SHAPES for _ in range(COPIES)]
    best = {rows: float("inf") for rows in MEASURED_ROWS}
    for _ in range(repeats):
        for rows in MEASURED_ROWS:
            best[rows] = min(best[rows], _products_ms(layers, rows, torch.float32, gen))
    native = sum(best.values())
    floats = sum(float_verdict["ms"][f"{chosen}@{rows}"] for rows in MEASURED_ROWS)
    ms = {f"gguf@{rows}": round(value, 3) for rows, value in best.items()}
    return {"weights": "gguf" if native < floats else chosen, "native_ms": ms}


def kernels_version() -> str:
    """A digest of the code that timings depend on (the forward and its kernels): a cached timing of other
    code would mislead after an upgrade, so it is part of every timing cache's key."""
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for name in ("kernels.py", "model.py", "quantized.py", "heads.py", "trees/latency.py", "native/qkernels.c"):
        digest.update((here / name).read_bytes())
    return digest.hexdigest()[:12]


def machine_busy() -> bool:
    """Whether other work competes for the cores now (1-minute load above the core count). Timings taken then
    are not cached: two processes with a thread per core each can slow one another's products 50-fold."""
    try:
        return os.getloadavg()[0] > (os.cpu_count() or 1)
    except OSError:
        return False


def cpu_identity() -> tuple[str, list[str]]:
    """The CPU's model name and the ISA flags that decide bf16 speed (Linux /proc/cpuinfo; else `platform`)."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx_vnni")
    name, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            field, _, value = line.partition(":")
            if field.strip() == "model name":
                name = value.strip()
            elif field.strip() == "flags":
                present = set(value.split())
                flags = [f for f in wanted if f in present]
                break
    except OSError:
        pass
    return name, flags
