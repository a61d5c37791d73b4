"""The `llama-cpp` bench method: llama.cpp (through llama-cpp-python) on the GGUF file our default model is
converted from, which is what a user who wants this model fast on a CPU runs today.

llama.cpp multiplies in Q4_1 where we run the de-quantised weights in fp32, so its greedy tokens drift from
`ar`'s: the method sets `reference_exact = False` and the summary compares it by BLEU, not token for token.

A native llama.cpp build can kill the process (SIGILL in the AMX tile code on a Sapphire Rapids VM), so the
model is first loaded and run in a subprocess. When that probe dies by a signal it is retried without
llama.cpp's extra buffer types (weight repacking, AMX); when that dies too, the method is skipped with a note.
Only the settings that survived are loaded in-process.
"""

from __future__ import annotations

import importlib.util
import inspect
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..decoding import GenerationStats
from ..errors import DynTreeError
from ..loading import DEFAULT_MODEL, default_gguf_path
from .methods import BenchContext, MethodSkipped, MethodSpec, register_method

INSTALL_HINT = "pip install 'dyntree[llamacpp]'"
PROBE_TIMEOUT_S = 300  # loading torch (through dyntree) and the model on a busy 2-core machine, with room

# Loads through the same function as the bench and evaluates a batch, then one token: both kinds of kernels.
PROBE_SCRIPT = """
import sys
from dyntree.bench.llamacpp import load_llama
llm = load_llama(sys.argv[1], int(sys.argv[2]), 64, {"default": None, "off": False}[sys.argv[3]])
ids = llm.tokenize(b"The quick brown fox jumps over the lazy dog.")
llm.eval(ids)
llm.eval(ids[:1])
"""


def gguf_path(method: str, model: str, gguf: str | None) -> Path:
    """The GGUF file to run: `gguf=` when given, else the file the default model is converted from, else
    `--model` itself when it is a .gguf file."""
    if gguf is not None:
        path = Path(gguf).expanduser()
        if not path.is_file():
            raise DynTreeError(f"method {method!r}: gguf={gguf}: no such file")
        return path
    if model == DEFAULT_MODEL:
        return default_gguf_path()
    if model.endswith(".gguf") and Path(model).is_file():
        return Path(model)
    raise DynTreeError(f"method {method!r} needs the default model or a .gguf file, and --model {model} is "
                       f"neither: add gguf=PATH (the same model as a GGUF file), e.g. {method}:gguf=model.gguf")


# -- loading ---------------------------------------------------------------------------------------------------
def extra_bufts_switch() -> str | None:
    """How this llama-cpp-python lets the extra buffer types be turned off: "argument" when `Llama()` names
    `use_extra_bufts`; "model_params" when only the C struct has the field (0.3.x: `Llama()` swallows unknown
    keywords silently, so passing it there would change nothing); None when neither."""
    import llama_cpp

    if "use_extra_bufts" in inspect.signature(llama_cpp.Llama.__init__).parameters:
        return "argument"
    fields = {name for name, _ in llama_cpp.llama_cpp.llama_model_params._fields_}
    return "model_params" if "use_extra_bufts" in fields else None


@contextmanager
def _default_model_params(**fields):
    """`Llama()` starts from `llama_model_default_params()`; during this block that returns `fields` set."""
    from llama_cpp import llama_cpp as lib

    original = lib.llama_model_default_params

    def with_fields():
        params = original()
        for name, value in fields.items():
            setattr(params, name, value)
        return params

    lib.llama_model_default_params = with_fields
    try:
        yield
    finally:
        lib.llama_model_default_params = original


def load_llama(gguf: str, threads: int, n_ctx: int, extra_bufts: bool | None):
    """A quiet `Llama` on `threads` threads (decoding and prompt alike); `extra_bufts` None keeps llama.cpp's
    default, False turns the extra buffer types off. `n_ctx` 0 means the model's training context."""
    from llama_cpp import Llama

    options = dict(model_path=gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
    if extra_bufts is None:
        return Llama(**options)
    if extra_bufts_switch() == "argument":
        return Llama(**options, use_extra_bufts=extra_bufts)
    with _default_model_params(use_extra_bufts=extra_bufts):
        return Llama(**options)


# -- the probe -------------------------------------------------------------------------------------------------
@dataclass
class ProbeOutcome:
    returncode: int | None  # negative: killed by that signal; None: still running at the timeout
    message: str  # the last line it wrote to stderr


def run_probe(gguf: Path, threads: int, extra_bufts: bool | None) -> ProbeOutcome:
    """Load `gguf` and evaluate a few tokens in a fresh interpreter, so a crash kills that one, not the bench."""
    mode = "default" if extra_bufts is None else "off"
    try:
        done = subprocess.run([sys.executable, "-c", PROBE_SCRIPT, str(gguf), str(threads), mode],
                              capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return ProbeOutcome(None, "")
    lines = done.stderr.strip().splitlines()
    return ProbeOutcome(done.returncode, lines[-1] if lines else "")


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def probe_extra_bufts(gguf: Path, threads: int, can_switch: bool) -> tuple[bool | None, str]:
    """The `extra_bufts` setting (None: llama.cpp's default, False: off) under which a probe loads and runs
    the model, and a note on how it was found. A probe that dies by a signal is retried with the extra buffer
    types off when `can_switch`; MethodSkipped when no setting survives, DynTreeError when the probe fails
    for another reason (a bad file, a broken install)."""
    first = run_probe(gguf, threads, None)
    if first.returncode == 0:
        return None, "ran with llama.cpp's defaults"
    if first.returncode is None:
        raise MethodSkipped(f"llama.cpp did not load and run {gguf.name} within {PROBE_TIMEOUT_S} s in a probe")
    if first.returncode > 0:
        raise DynTreeError(f"llama.cpp cannot run {gguf}: {first.message or f'exit status {first.returncode}'}")
    died = f"llama.cpp died by {_signal_name(first.returncode)} in a probe run of {gguf.name}"
    if not can_switch:
        raise MethodSkipped(f"{died} (this llama-cpp-python cannot turn off use_extra_bufts)")
    second = run_probe(gguf, threads, False)
    if second.returncode == 0:
        return False, f"{died} with llama.cpp's defaults; ran with use_extra_bufts=False"
    if second.returncode is not None and second.returncode < 0:
        raise MethodSkipped(f"{died}, and by {_signal_name(second.returncode)} with use_extra_bufts=False")
    raise MethodSkipped(f"{died}, and its retry with use_extra_bufts=False failed too: "
                        f"{second.message or 'no answer within the timeout'}")


# -- the method ------------------------------------------------------------------------------------------------
class LlamaCppMethod:
    """llama.cpp's greedy generation from the prompt token ids every method gets, stopped at the model's EOS
    ids like the others. It reports no per-pass numbers: every token after the first is one decoding pass."""

    family = "llama.cpp"
    greedy = True
    reference_exact = False  # Q4_1 arithmetic: compared with ar by BLEU only

    def __init__(self, name: str, gguf: Path, eos_token_ids, threads: int, extra_bufts: bool | None,
                 probe_note: str):
        self.name = name
        self.gguf = gguf
        self.eos = set(eos_token_ids)
        self.threads = threads
        self.extra_bufts = extra_bufts
        self.probe_note = probe_note
        self.llm = load_llama(str(gguf), threads, 0, extra_bufts)  # the training context: any prompt fits
        self.n_ctx = self.llm.n_ctx()

    def run(self, prompt_ids, max_new_tokens):
        if len(prompt_ids) + max_new_tokens > self.n_ctx:
            raise DynTreeError(f"method {self.name!r}: {len(prompt_ids)} prompt tokens + {max_new_tokens} new "
                               f"ones exceed llama.cpp's context of {self.n_ctx}")
        self.llm.reset()  # no prefix reuse from an earlier run: every method pays for its own prompt
        tokens, stop = [], "length"
        start = time.perf_counter()
        for token in self.llm.generate(list(prompt_ids), top_k=1, temp=0.0, repeat_penalty=1.0):
            tokens.append(int(token))
            if token in self.eos:
                stop = "eos"
                break
            if len(tokens) >= max_new_tokens:
                break
        seconds = time.perf_counter() - start
        stats = GenerationStats(method=self.name, batch_size=1, prompt_tokens=[len(prompt_ids)], tree_nodes=0,
                                new_tokens=len(tokens), decode_seconds=seconds,
                                decode_passes=max(len(tokens) - 1, 0), stop_reasons=[stop])
        stats.phase_seconds = {}  # llama.cpp does not split its time; the reports show "n/a"
        return tokens, stats

    def settings(self) -> dict:
        import llama_cpp

        return {"engine": "llama.cpp", "llama_cpp_python": llama_cpp.__version__, "gguf": str(self.gguf),
                "generate": "greedy", "threads": self.threads, "n_ctx": self.n_ctx,
                "use_extra_bufts": "default" if self.extra_bufts is None else self.extra_bufts,
                "probe": self.probe_note}


@register_method("llama-cpp", "llama.cpp (llama-cpp-python) on the GGUF file the default model comes from, greedy, "
                              "torch's thread count; Q4_1 numerics, so compared with ar by BLEU, not token for "
                              "token; optional (the llamacpp extra): skipped with a note when llama_cpp is missing "
                              "or crashes in a probe (options: gguf=PATH for a model other than the default)",
                 options={"gguf": str}, requires_module="llama_cpp", optional=True)
def llama_cpp_method(context: BenchContext, spec: MethodSpec) -> LlamaCppMethod:
    """Options first (a user's mistake is an error on any machine), then whether this machine can run it."""
    gguf = gguf_path(spec.text, context.model, spec.options.get("gguf"))
    if importlib.util.find_spec("llama_cpp") is None:
        raise MethodSkipped(f"llama_cpp is not installed ({INSTALL_HINT})")
    threads = torch.get_num_threads()
    extra_bufts, probe_note = probe_extra_bufts(gguf, threads, extra_bufts_switch() is not None)
    return LlamaCppMethod(spec.text, gguf, context.eos_token_ids, threads, extra_bufts, probe_note)
