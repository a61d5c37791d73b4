"""Build and load dyntree's native kernels (`qkernels.c`): compiled once per machine with the system C compiler.

The library is plain C (no Python or torch headers), so it builds in about a second; it is compiled with
`-march=native` for the CPU at hand and cached under the cache dir, keyed by the source, the compiler and the
CPU's flags. Where no compiler works, `load()` returns None and callers use the eager torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("qkernels.c")
FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno"]
MARCH = "native"  # the CPU at hand; tests also build "haswell" (AVX2 + FMA, no AVX-512) to check that path

_loaded: dict[str, object] = {}  # cache path -> CDLL (a process loads the same library once)


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def library_path(cache_dir: Path, march: str = MARCH) -> Path | None:
    """Where this machine's build for `-march=march` lives (None without a compiler)."""
    cc = compiler()
    if cc is None:
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(FLAGS), march, _cpu_flags()]).encode())
    return cache_dir / "native" / f"qkernels-{march}-{key.hexdigest()[:16]}.so"


def build(target: Path, march: str = MARCH) -> str | None:
    """Compile the library to `target` (atomically); the compiler's complaint on failure, else None."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        command = [compiler(), *FLAGS, f"-march={march}", "-o", tmp, str(SOURCE), "-lm"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            return next((line for line in lines if "error" in line), lines[-1] if lines else "compiler failed")
        os.replace(tmp, target)
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(cache_dir: Path, march: str = MARCH) -> tuple[object | None, str]:
    """(library, "") or (None, why not). Built on first use; torch must be imported first, so that the
    library shares torch's OpenMP runtime (both name libgomp.so.1) instead of starting a second thread pool."""
    import torch  # noqa: F401,PLC0415 - loads torch's libgomp before ours

    path = library_path(cache_dir, march)
    if path is None:
        return None, "no working C compiler (cc) to build the native kernels"
    key = str(path)
    if key in _loaded:
        return _loaded[key], ""
    if not path.is_file():
        problem = build(path, march)
        if problem:
            return None, f"the native kernels did not build: {problem}"
    try:
        lib = ctypes.CDLL(key)
    except OSError as exc:
        return None, f"the native kernels did not load: {exc}"
    _declare(lib)
    _loaded[key] = lib
    return lib, ""


def _declare(lib) -> None:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.dyntree_qmatmul.argtypes = [p, p, i64, p, i32]
    lib.dyntree_run_layers.argtypes = [p, p, i32, i32, p, i64, i64, p, p, p, i64, p, p, p, p, i32]
    lib.dyntree_scratch_floats.argtypes = [p, i64, i64, i32]
    lib.dyntree_scratch_floats.restype = i64
    lib.dyntree_vector_width.restype = i32
