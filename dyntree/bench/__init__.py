"""`dyntree bench`: every speed claim of the project comes from here.

methods.py   the registry of decoding methods (ours, transformers' greedy and prompt-lookup generate)
llamacpp.py  the optional llama.cpp peer (registers itself as `llama-cpp`)
runner.py    warm-up, round-robin timing, memory, environment
summary.py   raw records -> per-method figures (pure), BLEU against ar included
sweep.py     batch sizes: one run per size, then the speedup-by-batch-size table
report.py    terminal table, results.json, results.md, PNG plots
Prompt files are read by `dyntree.prompts`; the first-token KL of sampling methods is `eval/bench_kl.py`.
"""

from __future__ import annotations

from dataclasses import asdict

from .methods import METHODS, BenchContext, BenchMethod, MethodSpec, build_methods, parse_method_list, \
    register_method
from . import llamacpp  # noqa: F401 - registers the optional `llama-cpp` method, after ours
from ..prompts import BUILTIN, BenchPrompt, load_prompts
from ..eval.bench_kl import measure_first_token_kl, measures_kl, not_measured
from .report import SCHEMA_VERSION, write_outputs
from .runner import BenchRun, BenchSettings, RunRecord, run_benchmark
from .summary import summarize

__all__ = [
    "METHODS", "BenchContext", "BenchMethod", "BenchPrompt", "BenchRun", "BenchSettings", "MethodSpec",
    "RunRecord", "build_methods", "collect_results", "load_prompts", "measure_first_token_kl", "measures_kl",
    "parse_method_list", "register_method", "run_benchmark", "summarize", "write_outputs", "BUILTIN",
]


def exactness_references(methods: list[BenchMethod]) -> dict[str, str]:
    """Per method, the plain greedy decoding (`ar`, or an `ar:weights=...` in the run) on the same weights that
    its tokens are checked against; methods on weights with no such run are checked against `ar`."""
    plain: dict[str, str] = {}
    for m in methods:
        if m.family == "dyntree" and m.greedy and m.name.split(":")[0] == "ar":
            weights = m.settings().get("weights")
            if m.name == "ar" or weights not in plain:  # `ar` itself wins for its own weights
                plain[weights] = m.name
    return {m.name: plain.get(m.settings().get("weights"), "ar") for m in methods}


def logit_gap(context: BenchContext, method: BenchMethod, reference: str, bench: BenchRun, miss: dict):
    """Where a greedy method left plain decoding: the model's logit of plain decoding's token minus that of the
    method's token at that position, in the method's dtype (a tiny gap is a near-tie that rounding can flip;
    a large one is a bug). None when either side had already stopped."""
    import torch

    if miss["ar_token"] is None or miss["method_token"] is None:
        return None
    ref = next(r for r in bench.records if r.method == reference and r.prompt_id == miss["prompt_id"]
               and r.turn == miss["turn"])
    ids = list(bench.inputs[(miss["prompt_id"], miss["turn"])]["token_ids"]) + ref.token_ids[: miss["position"]]
    backbone = context.dyntree(method.settings().get("weights")).model.backbone
    with torch.inference_mode():
        cache = backbone.new_cache(1, len(ids) + 1)
        logits = backbone.logits(backbone.forward(torch.tensor([ids], device=backbone.device), cache)[0, -1])
    return float(logits[miss["ar_token"]] - logits[miss["method_token"]])


def collect_results(bench: BenchRun, context: BenchContext, command: str, prompt_source: str) -> dict:
    """Everything about a run in one JSON-ready dict: settings, environment, summaries and raw records."""
    names = [m.name for m in bench.methods]
    tokenizer = context.tokenizer

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False)

    def text(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    methods = summarize(bench.records, names, {m.name: m.greedy for m in bench.methods}, decode, text,
                        exactness_references(bench.methods))
    references = exactness_references(bench.methods)
    for method in bench.methods:
        for miss in methods[method.name]["mismatches"]:
            miss["logit_gap"] = logit_gap(context, method, references[method.name], bench, miss)
        methods[method.name] = {"family": method.family, "greedy": method.greedy,
                                "settings": method.settings(), **methods[method.name],
                                **(bench.kl.get(method.name) or not_measured(method, bench.settings.kl_samples))}
    runs = []
    for record in bench.records:
        row = record.as_dict()
        row["text"] = tokenizer.decode(record.token_ids, skip_special_tokens=True)
        runs.append(row)
    prompts = [{"prompt_id": p.prompt_id, "category": p.category, "turns": list(p.turns),
                "input_tokens": {str(turn): len(bench.inputs[(pid, turn)]["token_ids"])
                                 for (pid, turn) in bench.inputs if pid == p.prompt_id}}
               for p in bench.prompts]
    dt = context.dyntree()
    return {
        "schema": SCHEMA_VERSION,
        "command": command,
        "model": context.model,
        "model_dir": str(dt.model.model_dir),
        "heads": dt.heads_note,
        "settings": asdict(bench.settings),
        "memory_kind": bench.memory_kind,
        "environment": bench.environment,
        "prompts": {"source": prompt_source, "count": len(bench.prompts), "items": prompts},
        "methods": methods,
        "runs": runs,
    }
