"""Which dtype the backbone runs in: "float32", "bfloat16", or "auto" (bf16 only where it is faster).

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


def auto_dtype(device=None) -> torch.dtype:
    """bf16 on CUDA GPUs that support it; on CPU bf16 only where it measured faster (cached per machine)."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type != "cpu":
        return torch.float32
    return DTYPE_NAMES[cpu_verdict()["dtype"]]


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
    verdict = {**measure_dense_speed(), "key": key}
    if machine_busy():
        return verdict  # timings taken beside other work mislead: use them now, measure again next time
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(verdict, indent=1) + "\n")
    os.replace(tmp, path)
    return verdict


def measure_dense_speed(repeats: int = 5) -> dict:
    """ms for the model-shaped Dense products at 1 and 8 rows, per dtype (minimum over interleaved repeats)."""
    from .kernels import Dense  # noqa: PLC0415

    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=gen) * 0.02 for shape in MEASURED_SHAPES for _ in range(COPIES)]
    layers = {dtype: [Dense(w.to(DTYPE_NAMES[dtype])) for w in weights] for dtype in ("float32", "bfloat16")}
    best = {(dtype, rows): float("inf") for dtype in layers for rows in MEASURED_ROWS}
    for _ in range(repeats):
        for (dtype, rows) in best:
            inputs = [torch.randn(rows, d.in_features, generator=gen).to(DTYPE_NAMES[dtype]) for d in layers[dtype]]
            start = time.perf_counter()
            for dense, x in zip(layers[dtype], inputs):
                dense(x)
            best[(dtype, rows)] = min(best[(dtype, rows)], (time.perf_counter() - start) * 1000)
    cost = {dtype: sum(best[(dtype, rows)] for rows in MEASURED_ROWS) for dtype in layers}
    faster = cost["bfloat16"] <= BF16_WIN * cost["float32"]
    return {"dtype": "bfloat16" if faster else "float32",
            "ms": {f"{dtype}@{rows}": round(ms, 3) for (dtype, rows), ms in best.items()}}


def kernels_version() -> str:
    """A digest of the code that timings depend on (the forward and its kernels): a cached timing of other
    code would mislead after an upgrade, so it is part of every timing cache's key."""
    here = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for name in ("kernels.py", "model.py"):
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
