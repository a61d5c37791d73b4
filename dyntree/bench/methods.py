"""Decoding methods the benchmark can time, by name.

A method is a small object with a `name` and `run(prompt_ids, max_new_tokens) -> (token_ids, stats)`, where
`stats` is a `GenerationStats` (or anything with the same fields). The registry maps names to factories,
so a later method (ProPD, sampling modes) is one `@register_method(...)` away and the runner never changes.

A method spec on the command line is `name` or `name:key=value:key=value`, e.g. `dynamic:n=8` or
`hf-lookup:n=5`; the spec string is also the method's name in every report, so variants sit side by side.

Our methods (`ar`, `static`, `dynamic`) also take sampling options: `temperature=`, `top_p=`, `top_k=`,
`seed=`, and for the tree methods `accept=lossless|typical` (with `eps=`, `alpha=` for typical), e.g.
`dynamic:temperature=0.7:accept=typical`. Without `temperature` (or with 0) a method is greedy and is checked
token for token against `ar`.

An optional peer (`llama-cpp`, registered by `llamacpp.py`) needs a package the core install lacks; when it is
missing, or the peer cannot run on this machine, `build_methods` skips it with a one-line note and the other
methods still run.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

import torch

from ..api import DynTree, heads_directory, resolve_heads
from ..config import TreeConfig
from ..decoding import GenerationStats
from ..errors import DynTreeError
from ..eval.kl import build_tree_context, estimate_first_token_kl
from ..precision import resolve_weights, weights_dtype
from ..sampling import SamplingConfig
from ..trees.sizing import find_profile


class BenchMethod(Protocol):
    name: str
    family: str  # "dyntree", "transformers" or "llama.cpp": whose code runs it
    greedy: bool  # greedy methods are checked token for token against `ar`, unless they set
    # `reference_exact = False` (other numerics, e.g. llama.cpp's Q4_1): those are compared by BLEU only

    def run(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], GenerationStats]:
        ...

    def settings(self) -> dict:
        ...


@dataclass(frozen=True)
class MethodSpec:
    """A parsed `name:key=value` spec."""

    text: str
    name: str
    options: dict


@dataclass
class MethodEntry:
    factory: Callable  # (context, spec) -> BenchMethod
    description: str
    options: dict[str, type | tuple] | None = None  # accepted option names and types; None = any
    requires_module: str | None = None  # a module that must exist for the method to be available
    sampling: tuple[str, ...] = ()  # sampling option names the method understands (checked when parsed)
    optional: bool = False  # a missing `requires_module` is no error: the factory raises MethodSkipped


class MethodSkipped(DynTreeError):
    """This machine cannot run an optional method (its package is missing, or it crashed when probed): the run
    goes on without it, and the reason is one line of the output."""


METHODS: dict[str, MethodEntry] = {}


def register_method(name: str, description: str, options: dict[str, type] | None = None,
                    requires_module: str | None = None, sampling: tuple[str, ...] = (), optional: bool = False):
    """Decorator: make `factory(context, spec)` available as method `name`.

    `sampling`: which of SAMPLING_OPTIONS the method takes; they are validated (through `SamplingConfig`) as
    soon as the spec is parsed, before any model is loaded. `optional`: a missing `requires_module` does not
    refuse the run; the factory raises `MethodSkipped` (with the install hint) and the other methods run.
    """

    def wrap(factory):
        allowed = dict(options) if options is not None else None
        if allowed is not None:
            allowed.update({key: SAMPLING_OPTIONS[key] for key in sampling})
        METHODS[name] = MethodEntry(factory, description, allowed, requires_module, tuple(sampling), optional)
        return factory

    return wrap


# -- sampling options ----------------------------------------------------------------------------------------
SAMPLING_OPTIONS: dict[str, type] = {"temperature": float, "top_p": float, "top_k": int, "seed": int,
                                     "accept": str, "eps": float, "alpha": float}
PLAIN_SAMPLING = ("temperature", "top_p", "top_k", "seed")  # plain decoding has no tree to accept from
TREE_SAMPLING = tuple(SAMPLING_OPTIONS)
SAMPLING_ONLY = ("accept", "top_p", "top_k", "eps", "alpha")  # meaningless for greedy decoding


def sampling_from_options(method: str, options: dict, default_seed: int = 0) -> SamplingConfig | None:
    """The `SamplingConfig` a method's options describe, or None for greedy decoding.

    Options that only matter when sampling are refused on a greedy method (so `dynamic:accept=typical`
    cannot silently run greedy); the seed defaults to the run's `--seed`.
    """
    temperature = options.get("temperature", 0.0)
    if temperature == 0:
        stray = [key for key in SAMPLING_ONLY if key in options]
        if stray:
            raise DynTreeError(f"method {method!r}: {', '.join(stray)} only apply when sampling; add "
                               "temperature=T with T > 0")
        return None
    mode = options.get("accept", "lossless")
    if mode != "typical" and ("eps" in options or "alpha" in options):
        raise DynTreeError(f"method {method!r}: eps and alpha only apply to accept=typical")
    try:
        return SamplingConfig.from_options(temperature=temperature, top_p=options.get("top_p"),
                                           top_k=options.get("top_k"), seed=options.get("seed", default_seed),
                                           mode=mode, eps=options.get("eps"), alpha=options.get("alpha"))
    except DynTreeError as exc:
        raise DynTreeError(f"method {method!r}: {exc}") from None


def prompt_seed(seed: int, prompt_ids: list[int]) -> int:
    """The generator seed of one run: fixed by the method's seed and the prompt, so a rerun (or a repeat, or
    the warm-up) of a prompt gives the same tokens while different prompts get different random streams."""
    digest = hashlib.blake2b(repr((seed, [int(t) for t in prompt_ids])).encode(), digest_size=7).digest()
    return int.from_bytes(digest, "big")


def _convert(value: str):
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def parse_method_spec(text: str) -> MethodSpec:
    """`dynamic:n=8:topk=10` -> MethodSpec(name="dynamic", options={"n": 8, "topk": 10})."""
    text = text.strip()
    name, *parts = text.split(":")
    if not name:
        raise DynTreeError(f"empty method name in {text!r}")
    if name not in METHODS:
        raise DynTreeError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    entry = METHODS[name]
    options = {}
    for part in _join_colon_values(parts):
        key, sep, value = part.partition("=")
        if not sep or not key or not value:
            raise DynTreeError(f"bad option {part!r} in method {text!r}: expected key=value")
        if entry.options is not None and key not in entry.options:
            allowed = ", ".join(entry.options) or "none"
            raise DynTreeError(f"method {name!r} has no option {key!r} (options: {allowed})")
        converted = _convert(value)
        wanted = entry.options.get(key) if entry.options else None
        if wanted is None and key in entry.sampling:
            wanted = SAMPLING_OPTIONS[key]
        if wanted is float and isinstance(converted, int) and not isinstance(converted, bool):
            converted = float(converted)  # temperature=1 means 1.0
        kinds = wanted if isinstance(wanted, tuple) else (wanted,)
        if wanted is not None and type(converted) not in kinds:  # exact: true/false is no int
            raise DynTreeError(f"option {key!r} of method {name!r} must be "
                               f"{' or '.join(k.__name__ for k in kinds)}, got {value!r}")
        if key in options:
            raise DynTreeError(f"option {key!r} is given twice in method {text!r}")
        options[key] = converted
    if entry.sampling:
        sampling_from_options(text, options)  # bad values fail here, before anything is loaded
    return MethodSpec(text, name, options)


COLON_VALUED = ("early_prune",)  # options whose value itself holds a colon: `dynamic:early_prune=8:4`


def _join_colon_values(parts: list[str]) -> list[str]:
    """Re-join `early_prune=8` and `4` (split at the spec's colons) into `early_prune=8:4`."""
    joined: list[str] = []
    for part in parts:
        if "=" not in part and joined and joined[-1].partition("=")[0] in COLON_VALUED and \
                joined[-1].count(":") == 0:
            joined[-1] += ":" + part
        else:
            joined.append(part)
    return joined


def parse_method_list(text: str) -> list[MethodSpec]:
    """Parse `--methods` and check every method exists and is available (optional ones may be missing: they
    are skipped when built) before anything is loaded."""
    specs = [parse_method_spec(t) for t in text.split(",") if t.strip()]
    if not specs:
        raise DynTreeError("no method given (--methods)")
    seen = set()
    for spec in specs:
        if spec.text in seen:
            raise DynTreeError(f"method {spec.text!r} is listed twice")
        seen.add(spec.text)
        entry = METHODS[spec.name]
        missing = entry.requires_module and importlib.util.find_spec(entry.requires_module) is None
        if missing and not entry.optional:
            raise DynTreeError(f"method {spec.name!r} is not available in this build: {entry.requires_module} "
                               "is missing")
    return specs


# -- what the methods share: one loaded model, loaded lazily --------------------------------------------------
@dataclass
class BenchContext:
    """The model (and heads) every method runs on, loaded once per weights format and shared."""

    model: str = "default"
    heads: str | None = "auto"
    device: str | None = None
    weights: str | torch.dtype = "auto"  # the run's weights (`--weights`); a method's `weights=` overrides it
    seed: int = 0  # sampling seed of methods that give none (`--seed`)
    early_prune: str | None = None  # `--early-prune`: for the tree methods that set no `early_prune=` themselves
    _dyntrees: dict = field(default_factory=dict, repr=False)  # (weights, heads) -> DynTree without a tree
    _hf_models: dict = field(default_factory=dict, repr=False)  # dtype -> transformers model

    def resolved_weights(self, weights=None) -> str:
        """The weights a method runs on ("gguf", "float32", ...): its own `weights=` option, else the run's
        (`auto` resolved)."""
        return resolve_weights(self.weights if weights is None else weights, self.device, self.model)

    def dyntree(self, weights=None):
        """Our `DynTree` on the model with `weights`, with the run's heads (if any) and no tree."""
        key = (self.resolved_weights(weights), None)
        if key not in self._dyntrees:
            self._dyntrees[key] = DynTree.from_pretrained(self.model, heads=self.heads, tree="ar",
                                                          device=self.device, weights=key[0])
        return self._dyntrees[key]

    def with_heads(self, heads: str, weights=None):
        """The shared model with other heads (a directory, 'auto', 'random' or 'none'); loaded once each."""
        key = (self.resolved_weights(weights), heads)
        if key not in self._dyntrees:
            base = self.dyntree(weights)
            heads_obj, note = resolve_heads(heads, base.model)
            profile = None
            if heads_obj is not None:
                heads_obj = heads_obj.to(base.model.backbone.device)
                profile = find_profile(heads_directory(heads, base.model))
            self._dyntrees[key] = DynTree(base.model, heads_obj, note, "ar", tree_profile=profile)
        return self._dyntrees[key]

    @property
    def tokenizer(self):
        return self.dyntree().tokenizer

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return tuple(self.dyntree().model.config.eos_token_ids)

    @property
    def torch_device(self) -> torch.device:
        return self.dyntree().model.backbone.device

    def hf_model(self, weights=None):
        """The same weights through transformers (what users run today): in the float dtype `weights` names,
        fp32 for quantized weights (transformers de-quantizes GGUF files)."""
        from ..loading import resolve_model_dir

        dtype = weights_dtype(self.resolved_weights(weights))
        if dtype not in self._hf_models:
            from transformers import AutoModelForCausalLM
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # keep the terminal for our own progress and table
            model_dir = resolve_model_dir(self.model, float_weights=True)
            try:
                model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
            except Exception as exc:  # noqa: BLE001 - report the loader's reason in one line
                raise DynTreeError(f"transformers cannot load {model_dir}: {exc}".splitlines()[0]) from exc
            self._hf_models[dtype] = model.to(self.torch_device).eval()
        return self._hf_models[dtype]


# -- our decoding ---------------------------------------------------------------------------------------------
class DynTreeMethod:
    """Our decoding loop with one tree policy (`ar` = no tree), greedy or sampling.

    When sampling, every run gets its own generator seeded by `prompt_seed(sampling.seed, prompt)`, so the
    tokens depend on the seed and the prompt only (not on the run order, repeats or other methods).
    """

    family = "dyntree"

    def __init__(self, name: str, dyntree, tree_settings: dict, sampling: SamplingConfig | None = None):
        self.name = name
        self.dyntree = dyntree
        self.sampling = sampling if sampling is not None and not sampling.is_greedy else None
        self.greedy = self.sampling is None
        self._decoder = dyntree.decoder()
        self._settings = tree_settings

    def run(self, prompt_ids, max_new_tokens):
        sampling = None
        if self.sampling is not None:
            sampling = replace(self.sampling, seed=prompt_seed(self.sampling.seed or 0, prompt_ids))
        decode = self._decoder.run([list(prompt_ids)], max_new_tokens, stop_at_eos=True, sampling=sampling).consume()
        decode.stats.heads_note = self.dyntree.heads_note
        return decode.tokens[0], decode.stats

    def prepare_batch(self, batch_size: int) -> None:
        """One-off work for runs of `batch_size` sequences (a latency model to measure), before any timing."""
        self.dyntree.proposer.prepare(batch_size)
        self.dyntree.prepare_batch(batch_size)  # a machine-sized tree: its step costs at this batch size

    def run_batch(self, prompts: list[list[int]], max_new_tokens: int):
        """Decode `prompts` together (`--batch-size`): per-sequence tokens and the batch's stats. When sampling,
        the batch's generator is seeded from the method's seed and all its prompts."""
        sampling = None
        if self.sampling is not None:
            sampling = replace(self.sampling, seed=prompt_seed(self.sampling.seed or 0,
                                                               [t for ids in prompts for t in [-1, *ids]]))
        decode = self._decoder.run([list(p) for p in prompts], max_new_tokens, stop_at_eos=True,
                             sampling=sampling).consume()
        decode.stats.heads_note = self.dyntree.heads_note
        return decode.tokens, decode.stats

    def first_token_kl(self, prompts: list[list[int]], num_samples: int):
        """The first-tree-token KL estimate (`eval/kl.py`) of this method's sampling on `prompts`:
        each prompt + its greedy next token is a fixed context; the method's verification is replayed
        `num_samples` times on the tree its proposer builds there."""
        backbone = self.dyntree.model.backbone
        with torch.inference_mode():
            contexts = [build_tree_context(backbone, self.dyntree.heads, self.dyntree.proposer, list(ids))
                        for ids in prompts]
            return estimate_first_token_kl(contexts, self.sampling, num_samples, seed=self.sampling.seed or 0)

    def settings(self) -> dict:
        tree = self.dyntree.proposer.uses_heads
        return {"engine": "dyntree", "proposer": self.dyntree.proposer.name, **self._settings,
                "decoding": decoding_label(self.sampling, tree),
                "sampling": sampling_settings(self.sampling, tree), "heads": self.dyntree.heads_note}


def decoding_label(sampling: SamplingConfig | None, tree: bool) -> str:
    """greedy, sampling(T=..) for plain decoding, lossless(T=..) / typical(T=..) for trees."""
    if sampling is None:
        return "greedy"
    label = sampling.label
    return label if tree else "sampling" + label[label.index("("):]


def sampling_settings(sampling: SamplingConfig | None, tree: bool = True) -> dict | None:
    """What results.json records of a method's sampling (None: greedy; accept None: no tree to accept from)."""
    if sampling is None:
        return None
    out = {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k,
           "seed": sampling.seed, "accept": sampling.mode if tree else None}
    if tree and sampling.mode == "typical":
        out.update(eps=sampling.eps, alpha=sampling.alpha)
    return out


def _tree_method(context: BenchContext, spec: MethodSpec, tree: str) -> DynTreeMethod:
    options = dict(spec.options)
    # `ar:weights=float32` (older name `dtype=`): the same model with its weights held another way
    weights = options.pop("weights", options.pop("dtype", None))
    base = context.dyntree(weights)
    if "heads" in options:  # `dynamic:heads=DIR`: other heads on the same loaded model (compare heads in one run)
        base = context.with_heads(str(options.pop("heads")), weights)
    sampling = sampling_from_options(spec.text, {k: options.pop(k) for k in SAMPLING_OPTIONS if k in options},
                                     default_seed=context.seed)
    if tree != "ar" and base.heads is None:
        raise DynTreeError(f"method {spec.text!r} needs Medusa heads, and none are loaded ({base.heads_note}); "
                           "pass --heads DIR (or --heads random to check exactness only)")
    if tree != "ar" and "early_prune" not in options and context.early_prune is not None:
        options["early_prune"] = context.early_prune
    if "early_prune" in options:
        options["early_prune"] = str(options["early_prune"])  # `early_prune=8` (no K) is refused as text
    measure_prune = options.pop("measure_prune", False)
    tree = options.pop("tree", tree)  # `static:tree=FILE`
    size = options.pop("n", None)  # `static:n=8` (first 8 nodes), `dynamic:n=16`, `dynamic:n=auto:max=24`
    if "max" in options:
        if size != "auto":
            raise DynTreeError(f"method {spec.text!r}: max= only goes with n=auto")
        size = f"auto:{options.pop('max')}"
    try:
        config = TreeConfig.parse(tree, size, **options)
    except DynTreeError as exc:
        raise DynTreeError(f"method {spec.text!r}: {exc}") from None
    try:
        dt = base.with_tree(config)
    except DynTreeError as exc:  # e.g. an early-prune layer past this model's last layer
        raise DynTreeError(f"method {spec.text!r}: {exc}") from None
    if measure_prune:  # analysis: also the unpruned later layers every pass (exact ms saved and tokens lost)
        if dt.pruner is None:
            raise DynTreeError(f"method {spec.text!r}: measure_prune needs early_prune=LAYER:K")
        dt.pruner.measure = True
    settings = dict(config.settings(), weights=dt.model.weights)
    if measure_prune:
        settings["measure_prune"] = True
    return DynTreeMethod(spec.text, dt, settings, sampling)


SAMPLING_HELP = "temperature=T, top_p=P, top_k=K, seed=S"
TREE_SAMPLING_HELP = SAMPLING_HELP + ", accept=lossless|typical, eps=, alpha= (typical)"


@register_method("ar", f"our decoder, plain decoding (no heads, no tree): the baseline; greedy unless "
                       f"temperature > 0 (options: weights=gguf|float32|bfloat16, {SAMPLING_HELP})",
                 options={"weights": str, "dtype": str}, sampling=PLAIN_SAMPLING)
def _ar(context, spec):
    return _tree_method(context, spec, "ar")


@register_method("static", f"our decoder with Medusa's static tree (options: tree=NAME|FILE, n=NODES (the "
                           f"tree's first N nodes), topk=K, heads=DIR (other heads), {TREE_SAMPLING_HELP})",
                 options={"tree": str, "topk": int, "n": int, "heads": str, "weights": str, "dtype": str, "early_prune": (str, int),
                          "measure_prune": bool},
                 sampling=TREE_SAMPLING)
def _static(context, spec):
    return _tree_method(context, spec, "static")


DYNAMIC_OPTIONS = {"n": (int, str), "max": int, "topk": int, "tree_temperature": float, "lookup": int, "recycle": int,
                   "score": str, "calibration": str, "latency": str, "learn": bool, "heads": str, "weights": str, "dtype": str,
                   "early_prune": (str, int), "measure_prune": bool}


@register_method("dynamic", f"our decoder with the dynamic tree (options: n=NODES or n=auto[:max=N], topk=K, "
                            f"tree_temperature=, lookup=N, recycle=N, score=prob|rank|binned, calibration=FILE, "
                            f"latency=FILE, early_prune=LAYER:K|off, measure_prune=true (analysis: also the unpruned "
                            f"pass, for exact ms saved and tokens lost), heads=DIR (other heads), "
                            f"{TREE_SAMPLING_HELP})",
                 options=DYNAMIC_OPTIONS, sampling=TREE_SAMPLING)
def _dynamic(context, spec):
    return _tree_method(context, spec, "dynamic")


def propd_early_prune(backbone) -> str:
    """ProPD's pruning where none is given: on a GPU, where large trees are cheap and the later layers of many
    rows are what a pass saves, after the first quarter of the layers to the early top-8; off on CPUs, where
    the measured losses of the logit lens (15-38% of the accepted tokens on SmolLM2-135M) outweigh the rows
    saved (docs/dynamic-trees.md; benchmarks/early_prune_sweep.py measures both on a machine)."""
    if backbone.device.type != "cuda":
        return "off"
    return f"{max(1, backbone.config.num_layers // 4)}:{PROPD_TOPK}"


PROPD_TOPK = 8


@register_method("propd", f"ProPD: the dynamic tree sized from this machine's measured latency and the heads' "
                          f"acceptance, with early pruning inside the tree pass (defaults: on a GPU, sized every "
                          f"step (n=auto) and pruned after a quarter of the layers to the early top-{PROPD_TOPK}; on "
                          f"a CPU, sized once per machine from the heads' profile (per-step sizing and pruning "
                          f"measured slower there); options: early_prune=LAYER:K|off, n=, max=N, and the dynamic "
                          f"tree's others)",
                 options=DYNAMIC_OPTIONS, sampling=TREE_SAMPLING)
def _propd(context, spec):
    options = dict(spec.options)
    backbone = context.dyntree(options.get("weights", options.get("dtype"))).model.backbone
    if backbone.device.type == "cuda" or "max" in options:
        options.setdefault("n", "auto")
    if "early_prune" not in options and context.early_prune is None:
        options["early_prune"] = propd_early_prune(backbone)
    return _tree_method(context, MethodSpec(spec.text, spec.name, options), "dynamic")


# -- transformers ---------------------------------------------------------------------------------------------
class HFGenerateMethod:
    """transformers `generate`, greedy; optionally prompt-lookup decoding (a draft-free speculative method).

    It exposes no per-pass numbers, so the model's forward calls are counted with a hook: passes after the
    first (prefill) one are decoding passes, comparable to ours.
    """

    family = "transformers"
    greedy = True

    def __init__(self, name: str, context: BenchContext, lookup_tokens: int | None = None,
                 max_ngram: int | None = None, weights=None):
        self.name = name
        self.model = context.hf_model(weights)
        self.device = context.torch_device
        self.eos = list(context.eos_token_ids)
        self.lookup_tokens = lookup_tokens
        self.max_ngram = max_ngram
        self._forward_calls = 0
        self.model.register_forward_pre_hook(self._count)

    def _count(self, module, args):
        self._forward_calls += 1

    def _generation_config(self, max_new_tokens: int):
        from transformers import GenerationConfig

        extra = {}
        if self.lookup_tokens:
            extra["prompt_lookup_num_tokens"] = self.lookup_tokens
            if self.max_ngram:
                extra["max_matching_ngram_size"] = self.max_ngram
        return GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=0,
                                eos_token_id=self.eos or None, pad_token_id=self.eos[0] if self.eos else 0,
                                **extra)

    @torch.inference_mode()
    def run(self, prompt_ids, max_new_tokens):
        input_ids = torch.tensor([list(prompt_ids)], device=self.device)
        self._forward_calls = 0
        start = time.perf_counter()
        output = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                     generation_config=self._generation_config(max_new_tokens))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        tokens = output[0, input_ids.shape[1]:].tolist()
        stop = "length"
        for i, t in enumerate(tokens):  # nothing should follow EOS; cut defensively so counts compare
            if t in self.eos:
                tokens, stop = tokens[: i + 1], "eos"
                break
        stats = GenerationStats(method=self.name, batch_size=1, prompt_tokens=[len(prompt_ids)], tree_nodes=0,
                                new_tokens=len(tokens), decode_seconds=seconds,
                                decode_passes=max(self._forward_calls - 1, 0), stop_reasons=[stop])
        stats.phase_seconds = {}  # transformers does not split its time; the reports show "n/a"
        return tokens, stats

    def settings(self) -> dict:
        out = {"engine": "transformers", "generate": "greedy",
               "weights": str(self.model.dtype).removeprefix("torch.")}
        if self.lookup_tokens:
            out.update(prompt_lookup_num_tokens=self.lookup_tokens, max_matching_ngram_size=self.max_ngram)
        return out


@register_method("hf", "transformers generate, greedy: what users run today (options: weights=float32|bfloat16)",
                 options={"weights": str, "dtype": str})
def _hf(context, spec):
    return HFGenerateMethod(spec.text, context, weights=spec.options.get("weights", spec.options.get("dtype")))


@register_method("hf-lookup", "transformers prompt-lookup decoding, greedy (options: n=DRAFT_TOKENS, ngram=N, "
                              "weights=float32|bfloat16)",
                 options={"n": int, "ngram": int, "weights": str, "dtype": str})
def _hf_lookup(context, spec):
    return HFGenerateMethod(spec.text, context, lookup_tokens=spec.options.get("n", 10),
                            max_ngram=spec.options.get("ngram", 2),
                            weights=spec.options.get("weights", spec.options.get("dtype")))


def _print_note(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def build_methods(specs: list[MethodSpec], context: BenchContext,
                  note: Callable[[str], None] = _print_note) -> list[BenchMethod]:
    """The methods of `specs`, less the optional ones this machine cannot run (each named by one `note`)."""
    methods = []
    for spec in specs:
        try:
            methods.append(METHODS[spec.name].factory(context, spec))
        except MethodSkipped as exc:
            note(f"skipping {spec.text}: {exc}")
    if not methods:
        raise DynTreeError("no method left to run: every one listed in --methods was skipped")
    return methods
